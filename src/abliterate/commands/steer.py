"""``abliterate steer``: add (or remove) a behaviour direction, measure it, export it.

The stages: read the direction file as a :class:`~abliterate.core.steering.Steering` edit (or,
with ``--remove``, the directional ablation of each chosen layer's direction), optionally on top
of an earlier edit (``--edit``, baked into the in-memory model first); evaluate the model without
and with the steering (hooks) on the usual evaluation sets (refusal and over-refusal rates,
harmless KL per category; without ``--edit`` the unsteered model's evaluation comes from the
baseline cache, :mod:`abliterate.eval.cache`, when an entry matches); measure the behaviour
metric on its own prompts at every ``--sweep`` strength; bake the steering into the in-memory
weights and check that they equal the hooks; write the edit, a llama.cpp control vector and,
when asked and possible, the baked model.

Reasoning models (``--thinking on``): the evaluation sets' harmful and over-refusal prompts and
the metric prompts are formatted with the template's thinking switch on, answers get
``--thinking-budget`` more tokens, and judges (and the sweep's metric) read only the answer
after the reasoning block, as ``abliterate evaluate`` does; unfinished answers are counted apart
(``n_unfinished`` in the evaluations, ``unfinished_rate`` per sweep point). The harmless
prompts, whose next-token distributions give the KL divergences and the hooks-vs-weights check,
stay formatted with thinking off, so the token read is the answer's first.

Run directory::

    config.json, environment.json
    edit_spec.json, edit.safetensors   the steering (composed after --edit, when given)
    control_vector.gguf                for llama.cpp --control-vector (additions at layer outputs)
    report.json, report.md, report.html, plots/*.svg   (plots/steering_sweep.svg: the sweep)
    model/                             with --save-model, where the family allows it
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
from abliterate.config import SteerConfig, to_dict
from abliterate.core.edits import Edit
from abliterate.core.steering import Steering
from abliterate.data.chat import ChatSet
from abliterate.data.prompts import builtin, load_prompts
from abliterate.edit.biases import declare_biases
from abliterate.edit.control_vector import write_control_vector
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.steering import read_directions, removal, require_targets
from abliterate.errors import EditError
from abliterate.eval.behaviour import UNITS, measure_behaviour
from abliterate.eval.cache import baseline_assessment
from abliterate.eval.evaluator import Evaluator
from abliterate.eval.judges import JudgeOptions, build_judges, judge_sources
from abliterate.eval.metrics import ngram_fluency
from abliterate.files import write_json
from abliterate.model.anatomy import anatomy_of
from abliterate.model.forward import check_ready
from abliterate.model.loading import local_path
from abliterate.progress import Stages
from abliterate.report.markdown import summary_table, write_reports
from abliterate.report.schema import Report

if TYPE_CHECKING:
    from abliterate.eval.evaluator import Assessment
    from abliterate.eval.judges import Judge
    from abliterate.model.loading import LoadedModel

log = logging.getLogger(__name__)

CONTROL_VECTOR = "control_vector.gguf"


def _at(steering: Steering, strength: float, remove: bool, n_layers: int) -> Edit:
    """The steering (or removal) at another strength."""
    edit = Steering(steering.directions, strength, steering.layers)
    return removal(edit, n_layers) if remove else edit


@dataclass
class _Steered:
    """The evaluations of a steering: both models, the sweep, the checks and the baseline
    cache's record (None: not used)."""

    baseline: Assessment
    edited: Assessment
    sweep: list[dict[str, Any]]
    checks: dict[str, Any]
    cached: dict[str, Any] | None = None


def _sweep(
    config: SteerConfig, loaded: LoadedModel, steering: Steering, prompts: ChatSet, judge: Judge
) -> list[dict[str, Any]]:
    """The metric at every ``--sweep`` strength (strength 0 is the unsteered model); with
    ``--thinking on`` each point also has its unfinished answers' share."""
    n_layers = anatomy_of(loaded.model).n_layers
    points = []
    for strength in config.sweep:
        with edit_hooks(loaded.model, _at(steering, strength, config.remove, n_layers)):
            measured = measure_behaviour(
                loaded.model, loaded.tokenizer, prompts, config.metric, judge,
                max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                label=f"strength {strength:g}", **reasoning_settings(config),
            )  # fmt: skip
        log.info("strength %g: %s = %.4g", strength, config.metric, measured.value)
        point = {
            "strength": strength, "value": measured.value, "example": measured.responses[0],
            "distinct_3": ngram_fluency(measured.answers)["distinct_3"],
        }  # fmt: skip
        if measured.unfinished_rate is not None:
            point["unfinished_rate"] = measured.unfinished_rate
        points.append(point)
    return points


def _evaluate(
    config: SteerConfig,
    loaded: LoadedModel,
    evaluator: Evaluator,
    edit: Edit,
    stages: Stages,
) -> tuple[Assessment, Assessment, dict[str, Any] | None]:
    """The unsteered and the steered model on the evaluation sets, compared; the third value is
    the baseline cache's record (None: not used).

    The unsteered model is MODEL's files without ``--edit``, so its evaluation comes from the
    baseline cache when an entry matches; with ``--edit`` it is measured, as the cache knows
    models by their files only."""
    model = loaded.model
    with stages.stage("baseline eval"):
        use_cache = config.baseline_cache and config.edit is None
        baseline, cached = baseline_assessment(evaluator, loaded, config.model, use_cache=use_cache)
    with stages.stage("steered eval"), edit_hooks(model, edit):
        edited = evaluator.assess(model, "steered")
    with stages.stage("KL divergence"):
        kl = evaluator.kl(baseline, model, q_context=lambda: edit_hooks(model, edit))
    evaluator.compare(edited, kl)
    return baseline, edited, cached


def _exports(
    config: SteerConfig,
    loaded: LoadedModel,
    steering: Steering,
    full_edit: Edit,
    tmp: Path,
    checks: dict[str, Any],
    probe: list[str],
) -> dict[str, Any]:
    """The control vector and the baked model, each written or refused with its reason."""
    out: dict[str, Any] = {}
    if config.control_vector and not config.remove:
        try:
            hint = str(loaded.model.config.model_type)
            write_control_vector(steering, tmp / CONTROL_VECTOR, hint)
            out["control_vector"] = CONTROL_VECTOR
        except EditError as exc:
            out["control_vector_refused"] = str(exc)
            log.info("no control vector: %s", exc)
    if config.save_model:
        try:
            declare_biases(loaded.model)
        except EditError as exc:
            out["bake_refused"] = str(exc)
            log.warning("model not saved: %s", exc)
            return out
        checks["export_reload_max_abs_diff"] = save_edited(loaded, full_edit, tmp / "model", probe)
    return out


def _report(
    config: SteerConfig,
    loaded: LoadedModel,
    steering: Steering,
    edit: Edit,
    result: _Steered,
    data: dict[str, Any],
    extra: dict[str, Any],
    judges: list[str],
) -> dict[str, Any]:
    metric_record = data.pop("metric_prompts")
    return {
        "abliterate_version": __version__,
        "command": "steer",
        "model": model_record(loaded),
        "data": data,
        "judges": judges,
        "edit": edit.to_dict(),
        "checks": result.checks,
        "steering": {
            "direction": str(config.direction),
            "description": steering.directions.description,
            "site": steering.site,
            "layers": list(steering.steered_layers),
            "strength": steering.strength,
            "mode": "remove" if config.remove else "add",
            "metric": config.metric,
            "metric_unit": UNITS[config.metric],
            "metric_prompts": metric_record,
            "sweep": result.sweep,
            **({"prior_edit": str(config.edit)} if config.edit else {}),
            **extra,
        },
        "baseline": result.baseline.to_dict(),
        "baseline_cache": result.cached,
        "edited": result.edited.to_dict(),
        "n_examples": config.n_examples,
    }


def steer(config: SteerConfig, extra_inputs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Run ``abliterate steer`` (module docstring); returns the report.

    ``extra_inputs``: further files the caller read (the CLI's ``--config`` file), which
    ``--out`` must not contain either.
    """
    import torch

    models = [config.model, *judge_sources(config.judge)]
    inputs = [
        *map(local_path, models), config.eval_harmful, config.eval_harmless, config.over_refusal,
        config.direction, config.edit, config.metric_prompts, *extra_inputs,
    ]  # fmt: skip
    check_output_dir(config.out, config.overwrite, inputs)
    torch.manual_seed(config.seed)
    raw_sets = load_prompt_sets(config)
    metric_set = (
        load_prompts(config.metric_prompts, config.prompt_column)
        if config.metric_prompts
        else builtin("harmless", "eval")
    ).head(config.n_metric)
    stages = Stages()
    with stages.stage("judges"):
        judges = build_judges(config.judge, JudgeOptions(config.device, config.batch_size))
    with run_directory(config.out, config.overwrite, "steer") as tmp:
        write_json(tmp / "config.json", to_dict(config))
        with stages.stage("load model"):
            loaded = load_checked(config)
            prior = apply_prior_edit(config.edit, loaded)
        bound = anatomy_of(loaded.model)
        steering = read_directions(config.direction, config.strength, config.layers or None)
        require_targets(steering, bound)
        edit = removal(steering, bound.n_layers) if config.remove else steering
        tok = loaded.tokenizer
        sets = format_sets(loaded, config, raw_sets, config.thinking)
        check_ready(loaded.model, loaded.tokenizer, sets.chat_sets(), loaded.name)
        metric_chats = ChatSet.format(tok, metric_set, config.system_prompt, config.thinking)
        metric_record = {"name": metric_set.name, "n": len(metric_set), "sha256": metric_set.sha256}
        data = {**sets.record(), "metric_prompts": metric_record}
        env = environment_record(str(loaded.device), config.seed, data)
        write_json(tmp / "environment.json", env)
        evaluator = Evaluator(
            tok, sets, judges, max_new_tokens=config.max_new_tokens, kl_tokens=config.kl_tokens,
            batch_size=config.batch_size, seed=config.seed, system_prompt=config.system_prompt,
            **reasoning_settings(config),
        )  # fmt: skip
        baseline, edited, cached = _evaluate(config, loaded, evaluator, edit, stages)
        with stages.stage("sweep"):
            sweep = _sweep(config, loaded, steering, metric_chats, judges[0])
        full_edit = prior.then(edit) if prior is not None else edit
        full_edit.save(tmp)
        with stages.stage("bake and export"):
            probe = list(sets.harmless.texts[:4])
            checks = bake_checked(loaded, edit, probe)
            extra = _exports(config, loaded, steering, full_edit, tmp, checks, probe)
        result = _Steered(baseline, edited, sweep, checks, cached)
        names = [j.name for j in judges]
        report = _report(config, loaded, steering, edit, result, data, extra, names)
        report["timings"] = stages.to_dict()
        typed = Report.model_validate(report)
        write_reports(tmp, typed)
    print(summary_table(typed))
    for point in sweep:
        print(f"strength {point['strength']:>6g}: {config.metric} = {point['value']:.4g}")
    print(f"\nRun directory: {config.out}")
    return typed.model_dump(mode="json")
