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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate import __version__
from abliterate.commands.rundir import check_output_dir, environment_record, run_directory
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
from abliterate.files import write_json
from abliterate.measure.activations import collect_activations
from abliterate.measure.candidates import Candidates
from abliterate.measure.refusal import refusal_token_ids
from abliterate.model.anatomy import anatomy_of
from abliterate.model.devices import bake_blockers
from abliterate.model.forward import check_ready, next_token_logprobs
from abliterate.model.loading import load_model, local_path, resolve_device
from abliterate.progress import Stages
from abliterate.report.markdown import summary_table, write_reports
from abliterate.report.schema import Report, SelectionScores
from abliterate.search.objective import objective_openings, search_model
from abliterate.search.optimize import optimize_edit
from abliterate.search.selection import select_direction
from abliterate.search.study import check_study, default_storage, sqlite_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from abliterate.data.prompts import PromptSet
    from abliterate.eval.evaluator import Assessment
    from abliterate.eval.judges import Judge
    from abliterate.model.loading import LoadedModel
    from abliterate.search.optimize import SearchResult
    from abliterate.search.selection import Selection

log = logging.getLogger(__name__)

TRAIN_SETS = ("train_harmful", "train_harmless")
VAL_SETS = ("val_harmful", "val_harmless")
SCORED = {"val_harmful": "scored_val_harmful", "val_harmless": "scored_val_harmless",
          "eval_harmless": "scored_eval_harmless"}  # fmt: skip
"""Sets whose next-token distributions are read, and the key of their thinking-off texts."""


def format_sets(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase, sets: dict[str, PromptSet]
) -> dict[str, ChatSet]:
    """Every set chat-formatted with ``--thinking``, plus the :data:`SCORED` sets with thinking
    off (the same texts when thinking is off)."""
    system = config.system_prompt
    chats = {k: ChatSet.format(tokenizer, s, system, config.thinking) for k, s in sets.items()}
    for key, scored in SCORED.items():
        chats[scored] = (
            chats[key]
            if config.thinking == "off"
            else ChatSet.format(tokenizer, sets[key], system, "off")
        )
    return chats


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
    config: RunConfig, loaded: LoadedModel, chats: dict[str, ChatSet], data: dict[str, Any]
) -> Candidates:
    """Mean activations of the training sets at every layer and site."""

    model, tok = loaded.model, loaded.tokenizer
    # Per-prompt activations are kept only when the search may use extra directions.
    keep = config.site if config.optimize and config.max_directions > 1 else None
    means = {}
    acts = None
    for key, label in (("train_harmful", "harmful"), ("train_harmless", "harmless")):
        means[key], kept = collect_activations(
            model, tok, chats[key].texts, sites=config.sites,
            keep_site=keep if key == "train_harmful" else None,
            batch_size=config.batch_size, desc=f"Activations ({label})",
        )  # fmt: skip
        acts = acts if kept is None else kept
    candidates = Candidates(
        harmful_mean=means["train_harmful"],
        harmless_mean=means["train_harmless"],
        sites=config.sites,
        model=loaded.name,
        revision=loaded.revision,
        dataset_hashes={k: str(data[k]["sha256"]) for k in TRAIN_SETS},
        harmful_acts=acts,
        acts_site=keep,
    )
    if not candidates.has_direction():
        raise ConfigError(
            "the harmful and harmless training prompts give identical activations at every "
            "layer, so there is no direction to find; are the two prompt sets the same?"
        )
    return candidates


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
) -> EditChoice:
    """The edit to apply: a saved direction's, a given layer's, the automatically selected
    candidate's, or (``--optimize``) the searched one.

    Writes ``candidates.safetensors`` (and ``scores.json`` when selecting,
    ``optimization.json`` when searching) into ``tmp``.
    """

    model, tok = loaded.model, loaded.tokenizer
    n_layers, d_model = anatomy_of(model).n_layers, anatomy_of(model).d_model
    if config.direction is not None:
        return EditChoice(Ablation.uniform(_saved_direction(config, d_model), n_layers,
                                           config.strength))  # fmt: skip
    with stages.stage("activations"):
        candidates = compute_candidates(config, loaded, chats, data)
        candidates.save(tmp / "candidates.safetensors")
    if config.layer is not None:
        direction = _given_layer(config, candidates)
        return EditChoice(Ablation.uniform(direction, n_layers, config.strength))
    refusal_ids = refusal_token_ids(tok)
    if config.optimize:
        with stages.stage("search"):
            search = _optimize(config, loaded, candidates, chats, data, judge, refusal_ids)
        write_json(tmp / "optimization.json", search.to_dict())
        return EditChoice(search.edit, search=search)
    with stages.stage("selection"):
        harmful = chats[SCORED["val_harmful"]]
        openings = objective_openings(
            model, tok, harmful.texts, chats["val_harmful"].prompts.prompts, judge, config
        )
        # Screening in another precision only when the user names one: 'auto' would make the
        # screened candidates depend on the CPU.
        screening = None if config.search_dtype == "auto" else config.search_dtype
        selection = select_direction(
            model, tok, candidates, harmful.texts, chats[SCORED["val_harmless"]].texts,
            refusal_ids, openings, config,
            None if screening is None else search_model(model, screening),
        )  # fmt: skip
    write_json(tmp / "scores.json", selection.to_dict())
    return EditChoice(selection.edit, selection=selection)


def _optimize(
    config: RunConfig,
    loaded: LoadedModel,
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
        loaded.model,
        loaded.tokenizer,
        candidates,
        chats["val_harmful"],
        chats["val_harmless"],
        judge,
        config,
        refusal_ids=refusal_ids,
        storage=config.storage or default_storage(config.out),
        fingerprint=fingerprint,
        scoring=(chats[SCORED["val_harmful"]].texts, chats[SCORED["val_harmless"]].texts),
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
    evaluator = Evaluator(
        tok,
        EvalSets(chats["eval_harmful"], chats[SCORED["eval_harmless"]]),
        [judge],
        max_new_tokens=config.max_new_tokens,
        kl_tokens=config.kl_tokens,
        batch_size=config.batch_size,
        system_prompt=config.system_prompt,
        thinking_budget=config.thinking_budget if config.thinking == "on" else 0,
        reasoning=config.thinking == "on",
    )
    with stages.stage("baseline eval"):
        baseline = evaluator.assess(model, "baseline")
    with stages.stage("multi-token KL"):
        kl_multi, _ = evaluator.multi_token_kl(model, q_context=lambda: edit_hooks(model, edit))
    with stages.stage("bake edit"):
        probe = chats[SCORED["eval_harmless"]].texts[:4]
        with edit_hooks(model, edit):
            hooked = next_token_logprobs(model, tok, probe, batch_size=config.batch_size)
        summary = bake(model, edit)
        baked = next_token_logprobs(model, tok, probe, batch_size=config.batch_size)
        hooks_vs_weights = float((hooked - baked).abs().max())
    with stages.stage("edited eval"):
        edited = evaluator.assess(model, "abliterated")
        evaluator.compare(baseline, edited, kl_multi)
    return EditOutcome(baseline, edited, hooks_vs_weights, summary.to_dict())


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


def full_precision_model(
    config: RunConfig, measured: LoadedModel, why: str, stages: Stages
) -> LoadedModel:
    """The checkpoint of ``measured`` loaded again in full precision on the CPU, to bake the
    edit into, evaluate and export (see the module docstring); ``measured`` is released first,
    so the two are never held at once.

    ``why`` says why ``measured`` cannot be edited in place; the copy uses the measurement
    model's compute dtype (bfloat16 for a model quantized on a GPU).
    """
    import gc

    import torch

    dtype = str(measured.model.dtype).removeprefix("torch.")
    log.info("the edit is baked into a full-precision copy on the CPU: %s", why)
    measured.model = None  # type: ignore[assignment]  # the caller's reference goes too
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with stages.stage("load full precision"):
        return load_model(
            config.model,
            revision=config.revision,
            device="cpu",
            dtype=dtype,
            trust_remote_code=config.trust_remote_code,
        )


def run_inputs(config: RunConfig) -> list[str | Path | None]:
    """Everything a run reads: ``--out`` may not be or contain any of it."""
    study = (config.storage or default_storage(config.out)) if config.optimize else None
    return [
        local_path(config.model), config.harmful, config.harmless, config.eval_harmful,
        config.eval_harmless, config.direction,
        config.direction.with_suffix(".json") if config.direction is not None else None,
        sqlite_path(study) if study else None,
    ]  # fmt: skip


def run(config: RunConfig, extra_inputs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Run the whole pipeline and return the report (also written to ``config.out``).

    ``extra_inputs``: further files the caller read for this run (the CLI's ``--config``
    file), which ``--out`` must not contain either.
    """
    import torch

    # Everything that can be checked without the model fails before it is loaded.
    check_output_dir(config.out, config.overwrite, [*run_inputs(config), *extra_inputs])
    resolve_device(config.device)
    if config.optimize:
        check_study(config)
    torch.manual_seed(config.seed)
    sets = load_prompt_sets(config)
    data = {k: {"name": s.name, "n": len(s), "sha256": s.sha256} for k, s in sets.items()}
    stages = Stages()
    judge = MarkerJudge()
    command = "optimize" if config.optimize else "run"
    with run_directory(config.out, config.overwrite, command) as tmp:
        write_json(tmp / "config.json", to_dict(config))
        with stages.stage("load model"):
            loaded = load_model(
                config.model,
                revision=config.revision,
                device=config.device,
                dtype=config.dtype,
                trust_remote_code=config.trust_remote_code,
                **config.placement(),
            )
        log.info("model: %s", anatomy_of(loaded.model).anatomy.describe())
        tok = loaded.tokenizer
        chats = format_sets(config, tok, sets)
        check_ready(loaded.model, tok, list(chats.values()), loaded.name)
        env = {**environment_record(str(loaded.device), config.seed, data),
               "model": {"name": loaded.name, "source": loaded.source,
                         "revision": loaded.revision},
               "dtype": str(loaded.model.dtype), **placement_record(loaded)}  # fmt: skip
        write_json(tmp / "environment.json", env)
        choice = choose_edit(config, loaded, chats, data, judge, stages, tmp)
        choice.edit.save(tmp)
        measured_on = bake_blockers(loaded.model)
        if measured_on is not None:
            loaded = full_precision_model(config, loaded, measured_on, stages)
        outcome = evaluate_edit(config, loaded, choice.edit, chats, judge, stages)
        record = _record(loaded, choice, outcome, data)
        if measured_on is not None:
            record["measured_on"] = measured_on
        export_diff: float | None = None
        if config.save_model:
            with stages.stage("export"):
                save_model(loaded.model, tok, tmp / "model", record)
                probe = chats[SCORED["eval_harmless"]].texts[:4]
                export_diff = verify_export(loaded.model, tok, tmp / "model", probe)
        write_json(tmp / "abliteration.json", record)
        report = Report.model_validate(
            _report(config, loaded, choice, outcome, record, export_diff, stages)
            | ({} if measured_on is None else {"measured_on": measured_on})
        )
        scores = None
        if choice.selection is not None:
            scores = SelectionScores.model_validate(choice.selection.to_dict())
        write_reports(tmp, report, scores)
    print(summary_table(report))
    print(f"\nRun directory: {config.out}")
    return report.model_dump(mode="json")
