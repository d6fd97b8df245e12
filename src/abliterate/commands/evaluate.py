"""``abliterate evaluate``: the evaluation that ``run`` performs, for any model and baseline.

For MODEL (reported under ``"edited"``) and, when given, BASE (under ``"baseline"``) the
evaluator (:mod:`abliterate.eval.evaluator`) measures refusal and over-refusal rates by every
requested judge with their agreement, the cross-entropy of reference answers, n-gram fluency,
lm-evaluation-harness benchmarks, and with a baseline, first-token and multi-token
``KL(baseline ‖ model)`` on harmless prompts, overall and per category of the harmless
prompts. BASE's evaluation is read from the baseline cache (:mod:`abliterate.eval.cache`) when
an entry matches its files, the prompts and the settings. With ``--steer FILE --strength S``
MODEL is measured under that steering (hooks: its weights stay as they are); ``--baseline``
naming the same model then reuses the loaded one, unsteered (its files: cacheable as any other).

The run directory is written atomically (:func:`~abliterate.commands.rundir.run_directory`)
and holds ``config.json``, ``environment.json``, ``report.json``, ``report.md`` and
``report.html``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from abliterate import __version__
from abliterate.commands.rundir import check_output_dir, environment_record, run_directory
from abliterate.config import EvaluateConfig, ModelOptions, ThinkingOptions, to_dict
from abliterate.data.chat import ChatSet
from abliterate.data.prompts import builtin, load_prompts, resolve_prompts
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.steering import read_directions, require_targets
from abliterate.errors import ConfigError
from abliterate.eval.benchmarks import check_task_names
from abliterate.eval.cache import baseline_assessment
from abliterate.eval.evaluator import EvalSets, Evaluator
from abliterate.eval.judges import JudgeOptions, build_judges, judge_sources
from abliterate.eval.metrics import reference_answers
from abliterate.files import write_json
from abliterate.model.anatomy import anatomy_of
from abliterate.model.forward import check_ready
from abliterate.model.loading import load_model, local_path, resolve_device
from abliterate.model.verify import verify_anatomy
from abliterate.progress import Stages
from abliterate.report.markdown import summary_table, write_reports
from abliterate.report.schema import Report

if TYPE_CHECKING:
    from collections.abc import Callable

    from abliterate.core.steering import Steering
    from abliterate.data.prompts import PromptSet
    from abliterate.eval.evaluator import Assessment
    from abliterate.eval.metrics import ReferenceAnswers
    from abliterate.model.loading import LoadedModel
    from abliterate.types import Thinking

log = logging.getLogger(__name__)


class EvalSetOptions(Protocol):
    """Where a command's evaluation sets come from (``evaluate``, ``steer``, ``detox``)."""

    @property
    def eval_harmful(self) -> str | None: ...
    @property
    def eval_harmless(self) -> str | None: ...
    @property
    def over_refusal(self) -> str | None: ...
    @property
    def prompt_column(self) -> str | None: ...
    @property
    def system_prompt(self) -> str | None: ...
    @property
    def n_eval(self) -> int | None: ...


def load_prompt_sets(
    config: EvalSetOptions,
) -> tuple[PromptSet, PromptSet, PromptSet, ReferenceAnswers]:
    """Harmful, harmless, over-refusal prompts and reference answers, capped at ``n_eval``."""

    col, n = config.prompt_column, config.n_eval
    over = (
        load_prompts(config.over_refusal, col) if config.over_refusal else builtin("over_refusal")
    )
    return (
        resolve_prompts(config.eval_harmful, "harmful", "eval", col).head(n),
        resolve_prompts(config.eval_harmless, "harmless", "eval", col).head(n),
        over.spread(n),
        reference_answers().head(n),
    )


def model_record(loaded: LoadedModel) -> dict[str, Any]:
    """The ``report.json`` record of a loaded model (name, source, revision, architecture)."""
    config = loaded.model.config
    n_params = sum(p.numel() for p in loaded.model.parameters())
    return {
        "name": loaded.name,
        "source": loaded.source,
        "revision": loaded.revision,
        "architecture": f"{config.model_type}: {n_params / 1e6:.1f}M parameters",
    }


def _check_same_vocabulary(base: LoadedModel, model: LoadedModel) -> None:
    if base.tokenizer.get_vocab() != model.tokenizer.get_vocab():
        raise ConfigError(
            f"baseline {base.name} and model {model.name} use different tokenizers, so their "
            "next-token distributions (and KL divergence) cannot be compared; pass a baseline "
            "of the same model family."
        )


def format_sets(
    loaded: LoadedModel,
    config: EvalSetOptions,
    raw: tuple[PromptSet, PromptSet, PromptSet, ReferenceAnswers],
    thinking: Thinking = "off",
) -> EvalSets:
    """The evaluation sets chat-formatted for ``loaded``'s tokenizer, with the template's
    thinking switch set to ``thinking`` (the harmless set, read for next-token distributions,
    always with thinking off)."""

    harmful, harmless, over, reference = raw
    tok, system = loaded.tokenizer, config.system_prompt
    # The harmless prompts serve the KL divergences, whose distributions are the answer's:
    # they are formatted with thinking off (see abliterate.commands.run).
    return EvalSets(
        harmful=ChatSet.format(tok, harmful, system, thinking),
        harmless=ChatSet.format(tok, harmless, system, "off"),
        over_refusal=ChatSet.format(tok, over, system, thinking),
        reference=reference,
    )


def reasoning_settings(config: ThinkingOptions) -> dict[str, Any]:
    """The :class:`~abliterate.eval.evaluator.Evaluator`'s reasoning arguments for
    ``--thinking`` and ``--thinking-budget``: the budget (0 with thinking off) and whether the
    answers reason."""
    return {"thinking_budget": config.reasoning_budget, "reasoning": config.thinking == "on"}


def _steering(
    config: EvaluateConfig, loaded: LoadedModel
) -> tuple[Steering | None, Callable[[], AbstractContextManager[Any]]]:
    """The ``--steer`` edit (or None) and the context the evaluated model runs in: its hooks,
    or nothing."""
    if config.steer is None:
        return None, nullcontext
    steering = read_directions(config.steer, config.strength, config.steer_layers or None)
    require_targets(steering, anatomy_of(loaded.model))
    return steering, lambda: edit_hooks(loaded.model, steering)


def evaluate_inputs(config: EvaluateConfig) -> list[str | Path | None]:
    """Everything an evaluation reads: ``--out`` may not be or contain any of it."""
    models = [config.model, *([config.baseline] if config.baseline else [])]
    return [
        *(local_path(m) for m in [*models, *judge_sources(config.judge)]),
        config.eval_harmful, config.eval_harmless, config.over_refusal, config.steer,
    ]  # fmt: skip


def load_checked(config: ModelOptions, name: str | None = None) -> LoadedModel:
    """``name`` (default: ``config.model``) loaded as the config asks (device, dtype, placement
    over several devices, quantization), its anatomy verified."""
    loaded = load_model(
        config.model if name is None else name,
        revision=config.revision,
        device=config.device,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        **config.placement(),
    )
    verify_anatomy(loaded.model, loaded.tokenizer)
    return loaded


def _against_baseline(
    config: EvaluateConfig,
    model: LoadedModel,
    evaluator: Evaluator,
    edited: Assessment,
    stages: Stages,
    steered: Callable[[], AbstractContextManager[Any]],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Evaluate ``config.baseline`` (or read it from the baseline cache) and compare ``edited``
    (the model as ``steered`` runs it) with it (KL divergences); returns the baseline's report
    entry, its model record and the cache record (``None`` when the cache was not used). The
    same model named twice is loaded once: its baseline is itself, unsteered (whose evaluation
    the cache holds under its files, as for any other model)."""
    assert config.baseline is not None
    same = config.baseline == config.model
    with stages.stage("load baseline"):
        base_model = model if same else load_checked(config, config.baseline)
    if not same:
        check_ready(
            base_model.model, base_model.tokenizer, evaluator.sets.chat_sets(), base_model.name
        )
    _check_same_vocabulary(base_model, model)
    with stages.stage("baseline eval"):
        baseline, cached = baseline_assessment(
            evaluator, base_model, config.baseline, use_cache=config.baseline_cache
        )
    with stages.stage("KL divergence"):
        kl = evaluator.kl(
            baseline, base_model.model, model_q=None if same else model.model, q_context=steered
        )
    evaluator.compare(edited, kl)
    return baseline.to_dict(), model_record(base_model), cached


def evaluate(config: EvaluateConfig, extra_inputs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Evaluate ``config.model`` (and ``config.baseline``) and write the run directory.

    ``extra_inputs``: further files the caller read (the CLI's ``--config`` file), which
    ``--out`` must not contain either.

    Returns:
        The report, also written to ``config.out/report.json`` and ``report.md``.
    """
    import torch

    check_output_dir(config.out, config.overwrite, [*evaluate_inputs(config), *extra_inputs])
    resolve_device(config.device)
    torch.manual_seed(config.seed)
    # Everything that can fail fast (prompt files, judge specs, task names) fails before the
    # models are loaded.
    raw_sets = load_prompt_sets(config)
    check_task_names(config.benchmarks)
    stages = Stages()
    with stages.stage("judges"):
        judges = build_judges(
            config.judge, JudgeOptions(device=config.device, batch_size=config.batch_size)
        )

    with run_directory(config.out, config.overwrite, "evaluate") as tmp:
        write_json(tmp / "config.json", to_dict(config))
        with stages.stage("load model"):
            model = load_checked(config, config.model)
        sets = format_sets(model, config, raw_sets, config.thinking)
        check_ready(model.model, model.tokenizer, sets.chat_sets(), model.name)
        steering, steered = _steering(config, model)
        data = sets.record()
        env = environment_record(str(model.device), config.seed, data)
        write_json(tmp / "environment.json", env)
        evaluator = Evaluator(
            model.tokenizer, sets, judges, max_new_tokens=config.max_new_tokens,
            kl_tokens=config.kl_tokens, batch_size=config.batch_size,
            benchmarks=config.benchmarks, benchmark_limit=config.benchmark_limit,
            seed=config.seed, system_prompt=config.system_prompt,
            **reasoning_settings(config),
        )  # fmt: skip
        with stages.stage("model eval"), steered():
            edited = evaluator.assess(model.model, "model")
        baseline_dict: dict[str, Any] | None = None
        baseline_record: dict[str, Any] | None = None
        cached: dict[str, Any] | None = None
        if config.baseline is not None:
            baseline_dict, baseline_record, cached = _against_baseline(
                config, model, evaluator, edited, stages, steered
            )
        report: dict[str, Any] = {
            "abliterate_version": __version__,
            "command": "evaluate",
            "model": model_record(model),
            "baseline_model": baseline_record,
            "data": data,
            "judges": [j.name for j in judges],
            "baseline": baseline_dict,
            "baseline_cache": cached,
            "edited": edited.to_dict(),
            "n_examples": config.n_examples,
            "timings": stages.to_dict(),
            "edit": None if steering is None else steering.to_dict(),
        }
        typed = Report.model_validate(report)
        write_reports(tmp, typed)
    print(summary_table(typed))
    print(f"\nRun directory: {config.out}")
    return typed.model_dump(mode="json")
