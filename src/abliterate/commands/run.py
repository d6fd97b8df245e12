"""``abliterate run`` (and ``optimize``): find an edit, evaluate it held out, export the model.

The stages: load the prompt sets (before the model, so a bad file fails in a second), load the
model, choose the edit (a saved direction, a given layer's direction, automatic selection, or
the ``--optimize`` search; :func:`choose_edit`), evaluate the unedited and the edited model on
the held-out evaluation prompts (:func:`evaluate_edit`), and export the edited model.

The model the edit is *measured* on (activations, selection, search) may be quantized
(``--load-in``) or spread over devices with offloaded weights (``--device-map``). Its weights
cannot be edited in place, so the edit is then baked into the same checkpoint loaded again in
full precision on the CPU (in the measurement model's compute dtype), and that model is
evaluated and exported (:func:`full_precision_model`): no quantization error is ever exported,
and the exported model is the one evaluated.

Reasoning models (``--thinking``): every prompt set is formatted with the switch; directions
are measured on those texts, and answers generated from them. The sets whose *next-token*
distributions are read (validation sets for selection and search, the harmless evaluation set
for the KL divergences) are formatted with thinking off instead, so that the token read is the
answer's first and not the reasoning block's opening tag (:data:`SCORED`).

With ``--stream`` (or ``auto`` for a model that does not fit in memory) the model is never
loaded whole: activations, selection and the search run layer-streamed, the edited model is
written by streaming apply, and both models are evaluated with their weights partly offloaded
to disk (:func:`evaluate_streamed`, :mod:`abliterate.commands.streamed`).

The run directory is built under a temporary name beside ``out`` and renamed into place only
when the run succeeds (:func:`~abliterate.commands.rundir.run_directory`). Contents::

    config.json            resolved configuration
    environment.json       versions, model source and revision, prompt-set hashes, seed
    candidates.safetensors harmful and harmless means per layer and site (float64)
    scores.json            per-candidate refusal scores and KL (selection)
    optimization.json      every search trial, the Pareto front and the choice (--optimize)
    edit_spec.json, edit.safetensors, direction.{safetensors,json}   the edit
    abliteration.json      the edit, its provenance and its measured metrics
    report.json, report.md, report.html, plots/*.svg
    model/                 the edited model (safetensors) with abliteration.json
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate import __version__
from abliterate.commands.choice import EditChoice, choose_edit
from abliterate.commands.exports import lora_before_bake, weight_files, write_exports
from abliterate.commands.outcome import (
    EditOutcome,
    evaluate_edit,
    evaluate_streamed,
    full_precision_model,
)
from abliterate.commands.push import plan_upload, upload
from abliterate.commands.rundir import check_output_dir, environment_record, run_directory
from abliterate.commands.runsets import SCORED, format_sets, load_prompt_sets
from abliterate.commands.streamed import (
    load_offloaded,
    open_layerwise,
    resident_minimum,
    stream_source,
)
from abliterate.config import RunConfig, to_dict
from abliterate.edit.export import save_model, verify_export
from abliterate.errors import ConfigError
from abliterate.eval.judges import MarkerJudge
from abliterate.files import write_json
from abliterate.model.anatomy import anatomy_of
from abliterate.model.devices import bake_blockers
from abliterate.model.forward import check_ready
from abliterate.model.layerwise import LayerwiseModel
from abliterate.model.loading import load_model, local_path, resolve_device
from abliterate.model.verify import verify_anatomy
from abliterate.progress import Stages
from abliterate.report.markdown import summary_table, write_reports
from abliterate.report.schema import Report, SelectionScores
from abliterate.search.study import check_study, default_storage, sqlite_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from abliterate.data.chat import ChatSet
    from abliterate.eval.judges import Judge
    from abliterate.model.loading import LoadedModel

log = logging.getLogger(__name__)


def _record(
    loaded: LoadedModel, choice: EditChoice, outcome: EditOutcome, data: dict[str, Any]
) -> dict[str, Any]:
    """``abliteration.json``: the edit, its provenance and its measured metrics."""
    base, edited = outcome.baseline, outcome.edited
    return {
        "abliterate_version": __version__,
        "base_model": {"name": loaded.name, "source": loaded.source, "revision": loaded.revision},
        "edit": choice.edit.to_dict(),
        "selection": None if choice.selection is None else {
            k: v for k, v in choice.selection.to_dict().items() if k != "scores"
        },
        "optimization": None if choice.search is None else {
            k: v for k, v in choice.search.to_dict().items() if k != "trials"
        },
        "data": data,
        "metrics": {
            "baseline_refusal_rate": base.harmful.refusal_rate,
            "refusal_rate": edited.harmful.refusal_rate,
            "kl_divergence": edited.kl_divergence,
            "kl_divergence_multi_token": edited.extra["kl_divergence_multi_token"],
            "judge": base.harmful.judge,
        },
    }  # fmt: skip


def _report(
    config: RunConfig,
    loaded: LoadedModel,
    choice: EditChoice,
    outcome: EditOutcome,
    record: dict[str, Any],
    export_diff: float | None,
    stages: Stages,
    exports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:

    report: dict[str, Any] = {
        "abliterate_version": __version__,
        "command": "optimize" if config.optimize else "run",
        "model": {
            "name": loaded.name,
            "source": loaded.source,
            "revision": loaded.revision,
            "architecture": anatomy_of(loaded.model).anatomy.describe(),
        },
        "data": record["data"],
        "edit": choice.edit.to_dict(),
        "selection": record["selection"],
        "checks": {
            "hooks_vs_weights_max_abs_diff": outcome.hooks_vs_weights,
            "export_reload_max_abs_diff": export_diff,
            "edited_writers": outcome.edited_writers,
            **({"exports": exports} if exports else {}),
        },
        "baseline": outcome.baseline.to_dict(),
        "edited": outcome.edited.to_dict(),
        "n_examples": config.n_examples,
        "timings": stages.to_dict(),
    }
    if choice.search is not None:
        report["optimization"] = choice.search.to_dict()
    return report


def _finish_streamed(config: RunConfig, tmp: Path) -> None:
    """No offloaded weights left behind, and no model with ``--no-save-model`` (it was written
    only to be evaluated)."""
    shutil.rmtree(tmp / ".offload", ignore_errors=True)
    if not config.save_model:
        shutil.rmtree(tmp / "model")


def placement_record(loaded: LoadedModel) -> dict[str, Any]:
    """How the model is placed, for ``environment.json``: the device map (modules per device)
    and the quantization, where there are any."""
    out: dict[str, Any] = {}
    placed = getattr(loaded.model, "hf_device_map", None)
    if placed:
        counts: dict[str, int] = {}
        for device in placed.values():
            counts[str(device)] = counts.get(str(device), 0) + 1
        out["device_map"] = counts
    quantization = getattr(loaded.model.config, "quantization_config", None)
    if quantization is not None:
        out["quantization"] = quantization.to_dict()
    return out


def run_inputs(config: RunConfig) -> list[str | Path | None]:
    """Everything a run reads: ``--out`` may not be or contain any of it."""
    study = (config.storage or default_storage(config.out)) if config.optimize else None
    return [
        local_path(config.model), config.harmful, config.harmless, config.eval_harmful,
        config.eval_harmless, config.direction,
        config.direction.with_suffix(".json") if config.direction is not None else None,
        sqlite_path(study) if study else None,
    ]  # fmt: skip


def _checked_source(config: RunConfig, extra_inputs: Sequence[str | Path]) -> Path | None:
    """Everything that can be checked without the model, before it is loaded; returns the
    checkpoint the run streams, or None when it loads the model."""
    check_output_dir(config.out, config.overwrite, [*run_inputs(config), *extra_inputs])
    resolve_device(config.device)
    if config.optimize:
        check_study(config)
    source = stream_source(config)
    if source is not None and config.export:
        raise ConfigError(
            f"--export {','.join(config.export)} converts the edited model held in memory, and "
            "this run streams the model layer by layer (--stream); drop --export, or apply the "
            "run's edit to a GGUF of the model afterwards (abliterate apply --direction OUT)."
        )
    return source


def _load(
    config: RunConfig, source: Path | None, tmp: Path
) -> tuple[LoadedModel, PreTrainedModel | LayerwiseModel]:
    """The loaded model, and the model measured on: the same, or (``--stream``) the
    layer-streamed checkpoint beside an offloaded original for the evaluation."""
    if source is None:
        loaded = load_model(
            config.model,
            revision=config.revision,
            device=config.device,
            dtype=config.dtype,
            trust_remote_code=config.trust_remote_code,
            **config.placement(),
        )
        return loaded, loaded.model
    measured = open_layerwise(config, source)
    loaded = load_offloaded(config.model, config, tmp / ".offload" / "original",
                            resident_minimum(measured))  # fmt: skip
    return loaded, measured


@dataclass
class _Finished:
    """What the evaluation and export of an edit leave for the report."""

    loaded: LoadedModel  # the model evaluated (a full-precision copy if measured on another)
    outcome: EditOutcome
    record: dict[str, Any]  # abliteration.json
    export_diff: float | None = None
    exports: list[dict[str, Any]] | None = None
    measured_on: str | None = None


def _evaluate_and_export(
    config: RunConfig,
    loaded: LoadedModel,
    choice: EditChoice,
    chats: dict[str, ChatSet],
    judge: Judge,
    stages: Stages,
    tmp: Path,
    data: dict[str, Any],
) -> _Finished:
    """Evaluate the in-memory model before and after the edit, and export it (``OUT/model``
    and the ``--export`` formats)."""
    measured_on = bake_blockers(loaded.model)
    if measured_on is not None:
        loaded = full_precision_model(config, loaded, measured_on, stages)
    adapter = lora_before_bake(config, loaded, choice.edit)  # needs the unedited weights
    outcome = evaluate_edit(config, loaded, choice.edit, chats, judge, stages)
    done = _Finished(loaded, outcome, _record(loaded, choice, outcome, data),
                     measured_on=measured_on)  # fmt: skip
    if measured_on is not None:
        done.record["measured_on"] = measured_on
    probe = chats[SCORED["eval_harmless"]].texts[:4]
    if config.save_model:
        with stages.stage("export"):
            save_model(loaded.model, loaded.tokenizer, tmp / "model", done.record)
            done.export_diff = verify_export(loaded.model, loaded.tokenizer, tmp / "model", probe)
    if config.export:
        with stages.stage("further exports"):
            done.exports = write_exports(config, loaded, adapter, tmp, probe)
    return done


def run(config: RunConfig, extra_inputs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Run the whole pipeline and return the report (also written to ``config.out``).

    ``extra_inputs``: further files the caller read for this run (the CLI's ``--config``
    file), which ``--out`` must not contain either.
    """
    import torch

    source = _checked_source(config, extra_inputs)
    torch.manual_seed(config.seed)
    sets = load_prompt_sets(config)
    data = {k: {"name": s.name, "n": len(s), "sha256": s.sha256} for k, s in sets.items()}
    stages = Stages()
    judge = MarkerJudge()
    command = "optimize" if config.optimize else "run"
    with run_directory(config.out, config.overwrite, command) as tmp:
        write_json(tmp / "config.json", to_dict(config))
        with stages.stage("load model"):
            loaded, measured = _load(config, source, tmp)
        log.info("model: %s", anatomy_of(loaded.model).anatomy.describe())
        with stages.stage("verify anatomy"):
            verify_anatomy(loaded.model, loaded.tokenizer)
        chats = format_sets(config, loaded.tokenizer, sets)
        check_ready(loaded.model, loaded.tokenizer, list(chats.values()), loaded.name)
        env = {**environment_record(str(loaded.device), config.seed, data),
               "model": {"name": loaded.name, "source": loaded.source,
                         "revision": loaded.revision},
               "dtype": str(loaded.model.dtype), "streamed": source is not None,
               **placement_record(loaded)}  # fmt: skip
        write_json(tmp / "environment.json", env)
        choice = choose_edit(config, loaded, chats, data, judge, stages, tmp, measured)
        choice.edit.save(tmp)
        if isinstance(measured, LayerwiseModel):
            outcome = evaluate_streamed(
                config, loaded, measured, choice.edit, chats, judge, stages, tmp
            )
            done = _Finished(loaded, outcome, _record(loaded, choice, outcome, data))
            _finish_streamed(config, tmp)
        else:
            done = _evaluate_and_export(config, loaded, choice, chats, judge, stages, tmp, data)
        done.record["files"] = weight_files(tmp)
        write_json(tmp / "abliteration.json", done.record)
        if config.save_model:
            write_json(tmp / "model" / "abliteration.json", done.record)
        fields = _report(config, done.loaded, choice, done.outcome, done.record,
                         done.export_diff, stages, done.exports)  # fmt: skip
        if done.measured_on is not None:
            fields["measured_on"] = done.measured_on
        report = Report.model_validate(fields)
        scores = None
        if choice.selection is not None:
            scores = SelectionScores.model_validate(choice.selection.to_dict())
        write_reports(tmp, report, scores)
    print(summary_table(report))
    print(f"\nRun directory: {config.out}")
    if config.push_to_hub is not None:
        plan = plan_upload(config.out, config.push_to_hub)
        print(plan.describe())
        print(f"Uploaded: {upload(plan)}")
    return report.model_dump(mode="json")
