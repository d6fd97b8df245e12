"""``abliterate run`` (and ``optimize``): find an edit, evaluate it held out, export the model.

The stages: load the prompt sets (before the model, so a bad file fails in a second), load the
model, choose the edit (a saved direction, a given layer's direction, automatic selection, or
the ``--optimize`` search; :func:`choose_edit`), evaluate the unedited and the edited model on
the held-out evaluation prompts (:func:`evaluate_edit`), and export the edited model.

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

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate import __version__
from abliterate.commands.rundir import (
    check_output_dir,
    environment_record,
    file_sha256,
    run_directory,
)
from abliterate.commands.streamed import (
    export_streamed,
    load_offloaded,
    open_layerwise,
    resident_minimum,
    stream_source,
)
from abliterate.config import RunConfig, to_dict
from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.data.chat import ChatSet
from abliterate.data.prompts import resolve_prompts
from abliterate.edit.export import save_model, verify_export
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.weights import bake
from abliterate.errors import ConfigError
from abliterate.eval.evaluator import EvalSets, Evaluator
from abliterate.eval.judges import MarkerJudge
from abliterate.measure.activations import collect_activations
from abliterate.measure.candidates import Candidates
from abliterate.measure.refusal import refusal_token_ids
from abliterate.measure.streamed import collect_activations_streamed
from abliterate.model.anatomy import anatomy_of
from abliterate.model.forward import next_token_logprobs
from abliterate.model.layerwise import LayerwiseModel
from abliterate.model.loading import load_model
from abliterate.progress import Stages
from abliterate.report.markdown import summary_table, write_reports
from abliterate.report.schema import Report, SelectionScores
from abliterate.search.optimize import optimize_edit
from abliterate.search.selection import select_direction
from abliterate.search.streamed import streamed_logprobs
from abliterate.search.study import default_storage

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from abliterate.data.prompts import PromptSet
    from abliterate.eval.evaluator import Assessment
    from abliterate.eval.judges import Judge
    from abliterate.model.loading import LoadedModel
    from abliterate.search.optimize import SearchResult
    from abliterate.search.selection import Selection

log = logging.getLogger(__name__)

TRAIN_SETS = ("train_harmful", "train_harmless")
VAL_SETS = ("val_harmful", "val_harmless")


@dataclass
class EditChoice:
    """The edit a run applies and how it was chosen (selection or search, when either ran)."""

    edit: Ablation
    selection: Selection | None = None
    search: SearchResult | None = None


@dataclass
class EditOutcome:
    """The held-out evaluation of an edit: both models, and the hooks-vs-weights check."""

    baseline: Assessment
    edited: Assessment
    hooks_vs_weights: float
    edited_writers: dict[str, object]


def load_prompt_sets(config: RunConfig) -> dict[str, PromptSet]:
    """The six prompt sets of a run (train, validation and evaluation, harmful and harmless)."""

    col = config.prompt_column
    return {
        "train_harmful": resolve_prompts(config.harmful, "harmful", "train", col).head(
            config.n_train
        ),
        "train_harmless": resolve_prompts(config.harmless, "harmless", "train", col).head(
            config.n_train
        ),
        "val_harmful": resolve_prompts(None, "harmful", "val", col).head(config.n_val),
        "val_harmless": resolve_prompts(None, "harmless", "val", col).head(config.n_val),
        "eval_harmful": resolve_prompts(config.eval_harmful, "harmful", "eval", col).head(
            config.n_eval
        ),
        "eval_harmless": resolve_prompts(config.eval_harmless, "harmless", "eval", col).head(
            config.n_eval
        ),
    }


def _saved_direction(config: RunConfig, d_model: int) -> Direction:

    assert config.direction is not None
    if not config.direction.with_suffix(".json").is_file():
        raise ConfigError(
            f"direction {config.direction} not found (both {config.direction.stem}"
            ".safetensors and .json are needed)."
        )
    direction = Direction.load(config.direction)
    if direction.d_model != d_model:
        raise ConfigError(
            f"direction {config.direction} has d_model={direction.d_model} but the model has "
            f"{d_model}: it was computed for another model."
        )
    return direction


def compute_candidates(
    config: RunConfig,
    loaded: LoadedModel,
    chats: dict[str, ChatSet],
    data: dict[str, Any],
    measured: PreTrainedModel | LayerwiseModel | None = None,
) -> Candidates:
    """Mean activations of the training sets at every layer and site, measured on
    ``measured`` (default: the loaded model; a layer-streamed model with ``--stream``)."""

    model, tok = measured or loaded.model, loaded.tokenizer
    # Per-prompt activations are kept only when the search may use extra directions.
    keep = config.site if config.optimize and config.max_directions > 1 else None
    means = {}
    acts = None
    for key, label in (("train_harmful", "harmful"), ("train_harmless", "harmless")):
        collect = (
            collect_activations_streamed if isinstance(model, LayerwiseModel)
            else collect_activations
        )  # fmt: skip
        means[key], kept = collect(
            model, tok, chats[key].texts, sites=config.sites,  # type: ignore[arg-type]
            keep_site=keep if key == "train_harmful" else None,
            batch_size=config.batch_size, desc=f"Activations ({label})",
        )  # fmt: skip
        acts = acts if kept is None else kept
    return Candidates(
        harmful_mean=means["train_harmful"],
        harmless_mean=means["train_harmless"],
        sites=config.sites,
        model=loaded.name,
        revision=loaded.revision,
        dataset_hashes={k: str(data[k]["sha256"]) for k in TRAIN_SETS},
        harmful_acts=acts,
        acts_site=keep,
    )


def _given_layer(config: RunConfig, candidates: Candidates) -> Direction:
    assert config.layer is not None
    if config.layer >= candidates.n_layers:
        raise ConfigError(
            f"layer {config.layer} is out of range: the model has {candidates.n_layers} layers."
        )
    if candidates.is_degenerate(config.layer, config.site):
        raise ConfigError(
            f"layer {config.layer}, site {config.site!r} has no direction: harmful and harmless "
            "means are identical there; choose another --layer/--site."
        )
    return candidates.direction(config.layer, config.site)


def choose_edit(
    config: RunConfig,
    loaded: LoadedModel,
    chats: dict[str, ChatSet],
    data: dict[str, Any],
    judge: Judge,
    stages: Stages,
    tmp: Path,
    measured: PreTrainedModel | LayerwiseModel | None = None,
) -> EditChoice:
    """The edit to apply: a saved direction's, a given layer's, the automatically selected
    candidate's, or (``--optimize``) the searched one. Activations, scores and trials are
    measured on ``measured`` (default: the loaded model; a layer-streamed one with
    ``--stream``).

    Writes ``candidates.safetensors`` (and ``scores.json`` when selecting,
    ``optimization.json`` when searching) into ``tmp``.
    """

    model, tok = measured or loaded.model, loaded.tokenizer
    n_layers, d_model = anatomy_of(loaded.model).n_layers, anatomy_of(loaded.model).d_model
    if config.direction is not None:
        return EditChoice(Ablation.uniform(_saved_direction(config, d_model), n_layers,
                                           config.strength))  # fmt: skip
    with stages.stage("activations"):
        candidates = compute_candidates(config, loaded, chats, data, model)
        candidates.save(tmp / "candidates.safetensors")
    if config.layer is not None:
        direction = _given_layer(config, candidates)
        return EditChoice(Ablation.uniform(direction, n_layers, config.strength))
    refusal_ids = refusal_token_ids(tok)
    if config.optimize:
        with stages.stage("search"):
            search = _optimize(config, loaded, model, candidates, chats, data, judge, refusal_ids)
        (tmp / "optimization.json").write_text(json.dumps(search.to_dict(), indent=2) + "\n")
        return EditChoice(search.edit, search=search)
    with stages.stage("selection"):
        selection = select_direction(
            model, tok, candidates, chats["val_harmful"].texts, chats["val_harmless"].texts,
            refusal_ids, config,
        )  # fmt: skip
    (tmp / "scores.json").write_text(json.dumps(selection.to_dict(), indent=2) + "\n")
    edit = Ablation.uniform(selection.direction, n_layers, config.strength)
    return EditChoice(edit, selection=selection)


def _optimize(
    config: RunConfig,
    loaded: LoadedModel,
    model: PreTrainedModel | LayerwiseModel,
    candidates: Candidates,
    chats: dict[str, ChatSet],
    data: dict[str, Any],
    judge: Judge,
    refusal_ids: list[int],
) -> SearchResult:
    """The ``--optimize`` search: validation prompts only; the eval split is never passed in."""

    fingerprint = {
        "model": candidates.model,
        "revision": candidates.revision,
        "data": {k: data[k]["sha256"] for k in (*TRAIN_SETS, *VAL_SETS)},
    }
    return optimize_edit(
        model,
        loaded.tokenizer,
        candidates,
        chats["val_harmful"],
        chats["val_harmless"],
        judge,
        config,
        refusal_ids=refusal_ids,
        storage=config.storage or default_storage(config.out),
        fingerprint=fingerprint,
    )


def _evaluator(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase, chats: dict[str, ChatSet], judge: Judge
) -> Evaluator:
    return Evaluator(
        tokenizer,
        EvalSets(chats["eval_harmful"], chats["eval_harmless"]),
        [judge],
        max_new_tokens=config.max_new_tokens,
        kl_tokens=config.kl_tokens,
        batch_size=config.batch_size,
        system_prompt=config.system_prompt,
    )


def evaluate_edit(
    config: RunConfig,
    loaded: LoadedModel,
    edit: Ablation,
    chats: dict[str, ChatSet],
    judge: Judge,
    stages: Stages,
) -> EditOutcome:
    """Evaluate the unedited model, bake ``edit`` into it, and evaluate it again.

    The multi-token KL is measured through hooks before the weights are baked; the hooks and
    the baked weights are then compared on a few prompts, so the evaluated model is the one
    the hooks describe.
    """

    model, tok = loaded.model, loaded.tokenizer
    evaluator = _evaluator(config, tok, chats, judge)
    with stages.stage("baseline eval"):
        baseline = evaluator.assess(model, "baseline")
    with stages.stage("multi-token KL"):
        kl_multi, _ = evaluator.multi_token_kl(model, q_context=lambda: edit_hooks(model, edit))
    with stages.stage("bake edit"):
        probe = chats["eval_harmless"].texts[:4]
        with edit_hooks(model, edit):
            hooked = next_token_logprobs(model, tok, probe, batch_size=config.batch_size)
        summary = bake(model, edit)
        baked = next_token_logprobs(model, tok, probe, batch_size=config.batch_size)
        hooks_vs_weights = float((hooked - baked).abs().max())
    with stages.stage("edited eval"):
        edited = evaluator.assess(model, "abliterated")
        evaluator.compare(baseline, edited, kl_multi)
    return EditOutcome(baseline, edited, hooks_vs_weights, summary.to_dict())


def evaluate_streamed(
    config: RunConfig,
    loaded: LoadedModel,
    measured: LayerwiseModel,
    edit: Ablation,
    chats: dict[str, ChatSet],
    judge: Judge,
    stages: Stages,
    tmp: Path,
) -> tuple[EditOutcome, dict[str, str]]:
    """:func:`evaluate_edit` for a ``--stream`` run (see :mod:`abliterate.commands.streamed`).

    The edited model is the checkpoint that streaming apply writes into ``tmp/model``; both it
    and the original (``loaded``) are evaluated with what does not fit offloaded to disk. The
    hooks-vs-weights check compares the layer-streamed original under the edit's hooks with
    that checkpoint. Returns the outcome and the SHA-256 of each weight file written.
    """
    tok = loaded.tokenizer
    evaluator = _evaluator(config, tok, chats, judge)
    with stages.stage("baseline eval"):
        baseline = evaluator.assess(loaded.model, "baseline")
    with stages.stage("export"):
        summary, files = export_streamed(edit, measured.checkpoint.directory, tmp / "model")
        hashes = {f.name: file_sha256(f) for f in files}
    folder, minimum = tmp / ".offload" / "edited", resident_minimum(measured)
    edited_model = load_offloaded(str(tmp / "model"), config, folder, minimum).model
    with stages.stage("edited eval"):
        edited = evaluator.assess(edited_model, "abliterated")
    with stages.stage("multi-token KL"):
        kl_multi, _ = evaluator.multi_token_kl(loaded.model, model_q=edited_model)
        evaluator.compare(baseline, edited, kl_multi)
    with stages.stage("hooks vs weights"):
        probe = chats["eval_harmless"].texts[:4]
        ((hooked,),) = streamed_logprobs(
            measured, tok, [probe], [edit], batch_size=config.batch_size
        )
        baked = next_token_logprobs(edited_model, tok, probe, batch_size=config.batch_size)
    outcome = EditOutcome(baseline, edited, float((hooked - baked).abs().max()), summary.to_dict())
    return outcome, hashes


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
        },
        "baseline": outcome.baseline.to_dict(),
        "edited": outcome.edited.to_dict(),
        "n_examples": config.n_examples,
        "timings": stages.to_dict(),
    }
    if choice.search is not None:
        report["optimization"] = choice.search.to_dict()
    return report


def _finish_streamed(config: RunConfig, tmp: Path, record: dict[str, Any]) -> None:
    """The exported model's own ``abliteration.json`` (or no model, with ``--no-save-model``:
    it was written only to be evaluated), and no offloaded weights left behind."""
    shutil.rmtree(tmp / ".offload", ignore_errors=True)
    if config.save_model:
        (tmp / "model" / "abliteration.json").write_text(json.dumps(record, indent=2) + "\n")
    else:
        shutil.rmtree(tmp / "model")


def run(config: RunConfig) -> dict[str, Any]:
    """Run the whole pipeline and return the report (also written to ``config.out``)."""
    import torch

    check_output_dir(config.out, config.overwrite)
    torch.manual_seed(config.seed)
    source = stream_source(config)
    sets = load_prompt_sets(config)
    data = {k: {"name": s.name, "n": len(s), "sha256": s.sha256} for k, s in sets.items()}
    stages = Stages()
    judge = MarkerJudge()
    with run_directory(config.out, config.overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
        with stages.stage("load model"):
            if source is None:
                loaded = load_model(
                    config.model,
                    revision=config.revision,
                    device=config.device,
                    dtype=config.dtype,
                    trust_remote_code=config.trust_remote_code,
                )
                measured: PreTrainedModel | LayerwiseModel = loaded.model
            else:  # the original is evaluated offloaded; everything else is layer-streamed
                measured = open_layerwise(config, source)
                loaded = load_offloaded(config.model, config, tmp / ".offload" / "original",
                                        resident_minimum(measured))  # fmt: skip
        log.info("model: %s", anatomy_of(loaded.model).anatomy.describe())
        tok = loaded.tokenizer
        chats = {k: ChatSet.format(tok, s, config.system_prompt) for k, s in sets.items()}
        env = {**environment_record(str(loaded.device), config.seed, data),
               "model": {"name": loaded.name, "source": loaded.source,
                         "revision": loaded.revision},
               "dtype": str(loaded.model.dtype),
               "streamed": source is not None}  # fmt: skip
        (tmp / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
        choice = choose_edit(config, loaded, chats, data, judge, stages, tmp, measured)
        choice.edit.save(tmp)
        export_diff: float | None = None
        if isinstance(measured, LayerwiseModel):
            outcome, hashes = evaluate_streamed(
                config, loaded, measured, choice.edit, chats, judge, stages, tmp
            )
            record = {**_record(loaded, choice, outcome, data), "weight_files": hashes}
            _finish_streamed(config, tmp, record)
        else:
            outcome = evaluate_edit(config, loaded, choice.edit, chats, judge, stages)
            record = _record(loaded, choice, outcome, data)
            if config.save_model:
                with stages.stage("export"):
                    save_model(loaded.model, tok, tmp / "model", record)
                    probe = chats["eval_harmless"].texts[:4]
                    export_diff = verify_export(loaded.model, tok, tmp / "model", probe)
        (tmp / "abliteration.json").write_text(json.dumps(record, indent=2) + "\n")
        report = Report.model_validate(
            _report(config, loaded, choice, outcome, record, export_diff, stages)
        )
        scores = None
        if choice.selection is not None:
            scores = SelectionScores.model_validate(choice.selection.to_dict())
        write_reports(tmp, report, scores)
    print(summary_table(report))
    print(f"\nRun directory: {config.out}")
    return report.model_dump(mode="json")
