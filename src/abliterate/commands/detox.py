"""``abliterate detox``: DINM detoxification by knowledge editing, evaluated SafeEdit-style.

The stages: read the instances (built-in, a JSONL file or SafeEdit's JSON) and the evaluation
sets before loading anything; load the model and, with ``--edit``, bake an earlier edit (an
abliteration) into it, keeping the original's next-token distributions on the harmless prompts
(for the KL to the original) and on the instances' general-knowledge answers (DINM's KL
reference: the detox holds those answers to the original model, not to the abliterated one)
and the guard (harmless prompts with the original's own short answers, held by every DINM step;
:class:`~abliterate.edit.dinm.Guard`); evaluate the model before detoxification (``baseline``:
refusal and over-refusal rates, read from the baseline cache without ``--edit`` when an entry
matches; SafeEdit-style scores); run DINM (:func:`~abliterate.edit.dinm.run_dinm`,
with the toxic layer of every instance located by
:func:`~abliterate.measure.toxic.locate_toxic_layers`); evaluate the detoxified model through
the learned edit's hooks (``edited``: the same measures, plus KL to the model before); bake the
edit, check the weights against the hooks, and save the edit and the model.

Reasoning models (``--thinking on``): the model is measured reasoning, as ``abliterate
evaluate`` measures it: the evaluation sets' harmful and over-refusal prompts and every
SafeEdit-style input are formatted with the template's thinking switch on, answers get
``--thinking-budget`` more tokens, and judges (and the knowledge check) read only the answer
after the reasoning block, unfinished answers counted apart. What DINM *learns from* stays with
thinking off, so it
edits the answer that follows an empty reasoning block: the instances' prompts with their safe
answers (and the toxic-layer location on them), the general-knowledge answers held by DINM's KL
term, and the guard, whose reference is the model's first ``--guard-tokens`` answer tokens
(with reasoning on they would be the opening of its reasoning, not of an answer, and a guard
answer would need the whole budget at every step). Next-token KL (to the model before, and to
the original with ``--edit``) reads the harmless prompts with thinking off too, so the token
read is the answer's first.

Run directory::

    config.json, environment.json
    edit_spec.json, edit.safetensors   the learned weight delta (composed after --edit)
    report.json, report.md, report.html, plots/*.svg   (plots/detox_losses.svg: DINM's losses)
    model/                             the detoxified model (unless --no-save-model)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate import __version__
from abliterate.commands.baking import apply_prior_edit, bake_checked, save_edited
from abliterate.commands.evaluate import (
    format_sets,
    load_checked,
    load_prompt_sets,
    model_record,
    reasoning_settings,
)
from abliterate.commands.rundir import check_output_dir, environment_record, run_directory
from abliterate.config import DetoxConfig, to_dict
from abliterate.core.stats import kl_divergence
from abliterate.data.chat import format_chat
from abliterate.data.detox import InstanceSet, load_instances
from abliterate.data.prompts import resolve_prompts
from abliterate.edit.dinm import (
    DinmResult,
    DinmSettings,
    Guard,
    build_guard,
    knowledge_references,
    run_dinm,
)
from abliterate.edit.hooks import edit_hooks
from abliterate.eval.cache import baseline_assessment
from abliterate.eval.evaluator import Evaluator
from abliterate.eval.judges import JudgeOptions, build_judges, judge_sources
from abliterate.eval.safeedit import SafeEditSets, knowledge_questions, safeedit_scores
from abliterate.files import write_json
from abliterate.measure.toxic import ToxicLayer, locate_toxic_layers
from abliterate.model.forward import check_ready, generate, next_token_logprobs
from abliterate.model.loading import local_path
from abliterate.progress import Stages
from abliterate.report.markdown import summary_table, write_reports
from abliterate.report.schema import Report

if TYPE_CHECKING:
    import torch

    from abliterate.core.edits import Edit
    from abliterate.eval.evaluator import Assessment
    from abliterate.eval.judges import Judge
    from abliterate.model.loading import LoadedModel

log = logging.getLogger(__name__)


def _scores(
    config: DetoxConfig, loaded: LoadedModel, sets: SafeEditSets, judges: Sequence[Judge]
) -> dict[str, Any]:
    return safeedit_scores(
        loaded.model, loaded.tokenizer, sets, judges, max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size, system_prompt=config.system_prompt,
        thinking=config.thinking, thinking_budget=config.thinking_budget,
    )  # fmt: skip


def _detoxify(
    config: DetoxConfig,
    loaded: LoadedModel,
    instances: InstanceSet,
    references: Sequence[torch.Tensor] | None,
    guard: Guard | None,
) -> DinmResult:
    """DINM on the loaded model, each instance located on the model as it is at that point."""
    model, tok = loaded.model, loaded.tokenizer

    def locate(
        prompts: Sequence[str], safe: Sequence[str], unsafe: Sequence[str]
    ) -> list[ToxicLayer]:
        return locate_toxic_layers(
            model, tok, prompts, safe, unsafe, distance=config.distance,
            layers=config.locate_layers, batch_size=config.batch_size,
        )  # fmt: skip

    settings = DinmSettings(
        steps=config.steps, lr=config.lr, kl_weight=config.kl_weight, mode=config.mode,
        system_prompt=config.system_prompt,
    )  # fmt: skip
    result = run_dinm(model, tok, instances.instances, settings, locate, references, guard)
    layers = [r.layer for r in result.records]
    log.info("DINM tuned layers %s (per instance: %s)", sorted(set(layers)), layers)
    return result


@dataclass(frozen=True)
class _Original:
    """What the original model (MODEL before ``--edit`` is baked) gives the detox: its
    next-token log-probabilities on the harmless prompts (``(n_harmless, vocab)``, for the KL to
    the original) and DINM's KL references on the general-knowledge answers."""

    logprobs: torch.Tensor
    references: Sequence[torch.Tensor]


@dataclass(frozen=True)
class _Detoxed:
    """The evaluations of a detoxification: the model before and after, DINM's result, the
    baseline cache's record (None: not used) and, with ``--edit``, each model's first-token KL
    to the original (``baseline_kl_to_original``, ``kl_to_original``)."""

    baseline: Assessment
    edited: Assessment
    result: DinmResult
    cached: dict[str, Any] | None
    to_original: dict[str, float]


def _guard(config: DetoxConfig, loaded: LoadedModel) -> Guard | None:
    """The guard prompts with the model's own greedy answers (None with ``--n-guard 0``)."""
    if config.n_guard == 0:
        return None
    prompts = resolve_prompts(config.guard, "harmless", "val", config.prompt_column)
    texts = format_chat(loaded.tokenizer, prompts.head(config.n_guard).prompts,
                        config.system_prompt)  # fmt: skip
    answers = generate(
        loaded.model, loaded.tokenizer, texts, max_new_tokens=config.guard_tokens,
        batch_size=config.batch_size,
    )  # fmt: skip
    # A prompt the model ends at once has no answer tokens to hold.
    kept = [(t, a) for t, a in zip(texts, answers, strict=True) if a.strip()]
    if not kept:
        log.warning("the model ended every guard prompt at once: DINM runs without a guard")
        return None
    return build_guard(
        loaded.model, loaded.tokenizer, [t for t, _ in kept], [a for _, a in kept],
        config.guard_batch,
    )  # fmt: skip


def _evaluate_detox(
    config: DetoxConfig,
    loaded: LoadedModel,
    evaluator: Evaluator,
    safe_sets: SafeEditSets | None,
    judges: Sequence[Judge],
    instances: InstanceSet,
    original: _Original | None,
    guard: Guard | None,
    stages: Stages,
) -> _Detoxed:
    """The model before detoxification, DINM, and the model after it (through hooks).

    The model before detoxification is MODEL's files without ``--edit``, so its evaluation (not
    its SafeEdit scores) comes from the baseline cache when an entry matches; with ``--edit`` it
    is measured, as the cache knows models by their files only."""
    model, tok, texts = loaded.model, loaded.tokenizer, evaluator.sets.harmless.texts
    to_original: dict[str, float] = {}
    with stages.stage("baseline eval"):
        use_cache = config.baseline_cache and config.edit is None
        baseline, cached = baseline_assessment(evaluator, loaded, config.model, use_cache=use_cache)
        if safe_sets is not None:
            baseline.extra["safeedit"] = _scores(config, loaded, safe_sets, judges)
        if original is not None:
            before = next_token_logprobs(model, tok, texts, batch_size=config.batch_size)
            to_original["baseline_kl_to_original"] = _kl(original, before)
    with stages.stage("dinm"):
        references = None if original is None else original.references
        result = _detoxify(config, loaded, instances, references, guard)
    with stages.stage("detoxified eval"), edit_hooks(model, result.edit):
        edited = evaluator.assess(model, "detoxified")
        if safe_sets is not None:
            edited.extra["safeedit"] = _scores(config, loaded, safe_sets, judges)
        if original is not None:
            after = next_token_logprobs(model, tok, texts, batch_size=config.batch_size)
            to_original["kl_to_original"] = _kl(original, after)
    with stages.stage("KL divergence"):
        kl = evaluator.kl(baseline, model, q_context=lambda: edit_hooks(model, result.edit))
    evaluator.compare(edited, kl)
    return _Detoxed(baseline, edited, result, cached, to_original)


def _kl(original: _Original, logprobs: torch.Tensor) -> float:
    """First-token ``KL(original ‖ model)`` on the harmless prompts, averaged."""
    return float(kl_divergence(original.logprobs, logprobs).mean())


def _bake_and_save(
    config: DetoxConfig, loaded: LoadedModel, edit: Edit, full: Edit, probe: list[str], tmp: Any
) -> dict[str, Any]:
    """Bake the learned edit; the hooks-vs-weights check; the export and its reload check."""
    checks = bake_checked(loaded, edit, probe)
    if config.save_model:
        checks["export_reload_max_abs_diff"] = save_edited(loaded, full, tmp / "model", probe)
    return checks


def _detox_record(
    config: DetoxConfig,
    instances: InstanceSet,
    result: DinmResult,
    to_original: dict[str, float],
) -> dict[str, Any]:
    """The report's ``detox`` section (``to_original``: the KL of each model to the original,
    with ``--edit``)."""
    record: dict[str, Any] = {
        "instances": {"name": instances.name, "n": len(instances), "sha256": instances.sha256},
        "mode": config.mode,
        "steps": config.steps,
        "lr": config.lr,
        "kl_weight": config.kl_weight,
        "guard_prompts": result.guard_prompts,
        "records": [r.__dict__ for r in result.records],
        "edited_tensors": [t.name for t in result.edit.targets],
    }
    if config.edit is not None:
        record["prior_edit"] = str(config.edit)
        record.update(to_original)
    return record


def _original(
    config: DetoxConfig, loaded: LoadedModel, harmless: Sequence[str], instances: InstanceSet
) -> _Original | None:
    """With ``--edit``, the original model's distributions (harmless next tokens, knowledge
    answers) that the KL to the original is measured against; call before the edit is baked."""
    if config.edit is None:
        return None
    return _Original(
        next_token_logprobs(loaded.model, loaded.tokenizer, harmless, batch_size=config.batch_size),
        knowledge_references(
            loaded.model, loaded.tokenizer, instances.instances, config.system_prompt
        ),
    )


def detox(config: DetoxConfig, extra_inputs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Run ``abliterate detox`` (module docstring); returns the report.

    ``extra_inputs``: further files the caller read (the CLI's ``--config`` file), which
    ``--out`` must not contain either.
    """
    import torch

    models = [config.model, *judge_sources(config.judge)]
    inputs = [
        *map(local_path, models), config.eval_harmful, config.eval_harmless, config.over_refusal,
        config.instances, config.edit, config.other_questions, *extra_inputs,
    ]  # fmt: skip
    check_output_dir(config.out, config.overwrite, inputs)
    torch.manual_seed(config.seed)
    instances = load_instances(config.instances).head(config.n_instances)
    raw_sets = load_prompt_sets(config)
    safe_sets = None
    if config.safeedit:
        others = resolve_prompts(config.other_questions, "harmful", "eval", config.prompt_column)
        safe_sets = SafeEditSets(instances, others, knowledge_questions(config.n_knowledge))
    stages = Stages()
    with stages.stage("judges"):
        judges = build_judges(config.judge, JudgeOptions(config.device, config.batch_size))
    with run_directory(config.out, config.overwrite, "detox") as tmp:
        write_json(tmp / "config.json", to_dict(config))
        with stages.stage("load model"):
            loaded = load_checked(config)
        sets = format_sets(loaded, config, raw_sets, config.thinking)
        check_ready(loaded.model, loaded.tokenizer, sets.chat_sets(), loaded.name)
        original = _original(config, loaded, sets.harmless.texts, instances)
        with stages.stage("guard"):  # answered by the model before any edit
            guard = _guard(config, loaded)
        prior = apply_prior_edit(config.edit, loaded)
        data = {**sets.record(), "instances": {"name": instances.name, "n": len(instances),
                                               "sha256": instances.sha256}}  # fmt: skip
        env = environment_record(str(loaded.device), config.seed, data)
        write_json(tmp / "environment.json", env)
        evaluator = Evaluator(
            loaded.tokenizer, sets, judges, max_new_tokens=config.max_new_tokens,
            kl_tokens=config.kl_tokens, batch_size=config.batch_size, seed=config.seed,
            system_prompt=config.system_prompt, **reasoning_settings(config),
        )  # fmt: skip
        detoxed = _evaluate_detox(
            config, loaded, evaluator, safe_sets, judges, instances, original, guard, stages
        )
        result = detoxed.result
        full = prior.then(result.edit) if prior is not None else result.edit
        full.save(tmp)
        with stages.stage("bake and export"):
            probe = list(sets.harmless.texts[:4])
            checks = _bake_and_save(config, loaded, result.edit, full, probe, tmp)
        report = {
            "abliterate_version": __version__,
            "command": "detox",
            "model": model_record(loaded),
            "data": data,
            "judges": [j.name for j in judges],
            "edit": full.to_dict(),
            "checks": checks,
            "detox": _detox_record(config, instances, result, detoxed.to_original),
            "baseline": detoxed.baseline.to_dict(),
            "baseline_cache": detoxed.cached,
            "edited": detoxed.edited.to_dict(),
            "n_examples": config.n_examples,
            "timings": stages.to_dict(),
        }
        typed = Report.model_validate(report)
        write_reports(tmp, typed)
    print(summary_table(typed))
    _print_safeedit(typed)
    print(f"\nRun directory: {config.out}")
    return typed.model_dump(mode="json")


def _print_safeedit(report: Report) -> None:
    """The SafeEdit-style scores and the KL to the original, before and after."""
    keys = ("defense_success", "dg_average", "knowledge_accuracy")
    for label, model in (("before", report.baseline), ("after", report.edited)):
        scores = model.safeedit if model is not None else None
        if scores is not None:
            values = ", ".join(f"{k} {getattr(scores, k):.1%}" for k in keys)
            print(f"SafeEdit {label}: {values}")
    if report.detox is not None and report.detox.kl_to_original is not None:
        print(f"first-token KL to the original: {report.detox.kl_to_original:.4f}")
