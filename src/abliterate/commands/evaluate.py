"""``abliterate evaluate``: the evaluation that ``run`` performs, for any model and baseline.

For MODEL (reported under ``"edited"``) and, when given, BASE (under ``"baseline"``) it measures:

* refusal rate on harmful prompts and over-refusal rate on harmless but sensitive-sounding
  prompts, by every requested judge (the first decides each completion's ``refused``), with the
  judges' pairwise agreement when several run;
* cross-entropy of the built-in harmless reference answers (:mod:`abliterate.metrics`);
* n-gram fluency of the generated answers;
* lm-evaluation-harness benchmark scores (:mod:`abliterate.benchmarks`);
* with a baseline: first-token and multi-token ``KL(baseline ‖ model)`` on harmless prompts.

The run directory is written atomically (:func:`abliterate.pipeline.run_directory`) and holds
``config.json``, ``environment.json``, ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from abliterate import __version__
from abliterate.config import EvaluateConfig, to_dict
from abliterate.errors import ConfigError

if TYPE_CHECKING:
    from abliterate.data.prompts import PromptSet
    from abliterate.eval.judges import Judge
    from abliterate.eval.metrics import ReferenceAnswers
    from abliterate.eval.refusals import ModelEval, RefusalEval
    from abliterate.model.loading import LoadedModel
    from abliterate.progress import Profiler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSets:
    """The prompt sets every evaluated model sees."""

    harmful: PromptSet
    harmless: PromptSet
    over_refusal: PromptSet
    reference: ReferenceAnswers

    def record(self) -> dict[str, Any]:
        """Names, sizes and content hashes, for ``report.json`` and ``environment.json``."""
        named = {
            "eval_harmful": self.harmful,
            "eval_harmless": self.harmless,
            "over_refusal": self.over_refusal,
        }
        out: dict[str, Any] = {
            k: {"name": s.name, "n": len(s), "sha256": s.sha256} for k, s in named.items()
        }
        out["reference_answers"] = {"name": self.reference.name, "n": len(self.reference)}
        return out


def spread_head(prompts: PromptSet, n: int | None) -> PromptSet:
    """At most ``n`` prompts taken round-robin across categories, in file order within each.

    The over-refusal set is stored category by category, so its first ``n`` prompts would all
    come from one category; a capped evaluation should still cover every category.
    """
    from abliterate.data.prompts import PromptSet

    if n is None or n >= len(prompts) or not prompts.categories:
        return prompts.head(n)
    queues: dict[str, list[int]] = {}
    for i, cat in enumerate(prompts.categories):
        queues.setdefault(cat, []).append(i)
    picked: list[int] = []
    while len(picked) < n:
        for queue in queues.values():
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    picked.sort()
    return PromptSet(
        f"{prompts.name}[spread:{n}]",
        tuple(prompts.prompts[i] for i in picked),
        tuple(prompts.categories[i] for i in picked),
    )


def load_sets(config: EvaluateConfig) -> EvalSets:
    """Every prompt set of the evaluation, capped at ``n_eval`` each."""
    from abliterate.data.prompts import builtin, load_prompts, resolve_prompts
    from abliterate.eval.metrics import reference_answers

    col, n = config.prompt_column, config.n_eval
    over = (
        load_prompts(config.over_refusal, col) if config.over_refusal else builtin("over_refusal")
    )
    return EvalSets(
        harmful=resolve_prompts(config.eval_harmful, "harmful", "eval", col).head(n),
        harmless=resolve_prompts(config.eval_harmless, "harmless", "eval", col).head(n),
        over_refusal=spread_head(over, n),
        reference=reference_answers().head(n),
    )


def judge_responses(
    judges: Sequence[Judge],
    prompts: PromptSet,
    responses: list[str],
) -> tuple[RefusalEval, dict[str, list[str]]]:
    """Run every judge on the responses.

    Returns:
        The evaluation (the first judge decides ``refused``) and, per LLM judge, its raw answers,
        kept so that a judge that answers badly can be seen in the report.
    """
    from abliterate.eval.llm_judge import LLMJudge
    from abliterate.eval.refusals import RefusalEval

    verdicts: dict[str, list[bool]] = {}
    answers: dict[str, list[str]] = {}
    for judge in judges:
        verdicts[judge.name] = judge(prompts.prompts, responses)
        if isinstance(judge, LLMJudge):
            answers[judge.name] = judge.last_answers
    primary = judges[0].name
    evaluation = RefusalEval(
        prompts=list(prompts.prompts),
        responses=responses,
        refused=verdicts[primary],
        categories=list(prompts.categories) if prompts.categories else None,
        judge=primary,
        verdicts=verdicts,
    )
    return evaluation, answers


def _rate(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags)


def _by_category(evaluation: RefusalEval) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for cat, refused in zip(evaluation.categories or [], evaluation.refused, strict=False):
        groups.setdefault(cat or "uncategorized", []).append(refused)
    return {cat: _rate(flags) for cat, flags in sorted(groups.items())}


def assess_model(
    loaded: LoadedModel,
    config: EvaluateConfig,
    sets: EvalSets,
    judges: Sequence[Judge],
    prof: Profiler,
    label: str,
) -> ModelEval:
    """Everything measured on one model without reference to another (no KL)."""
    from abliterate.data.chat import format_chat
    from abliterate.eval.benchmarks import run_benchmarks
    from abliterate.eval.judges import judge_agreement
    from abliterate.eval.llm_judge import parse_yes_no
    from abliterate.eval.metrics import ngram_fluency, reference_cross_entropy
    from abliterate.eval.refusals import ModelEval
    from abliterate.model.forward import generate

    model, tok = loaded.model, loaded.tokenizer
    judged: dict[str, RefusalEval] = {}
    llm_answers: dict[str, dict[str, list[str]]] = {}
    for key, pset in (("harmful", sets.harmful), ("over_refusal", sets.over_refusal)):
        with prof.stage(f"{label}: {key} generations"):
            responses = generate(
                model,
                tok,
                format_chat(tok, pset.prompts, config.system_prompt),
                max_new_tokens=config.max_new_tokens,
                batch_size=config.batch_size,
                desc=f"Generating ({label}, {key})",
            )
        with prof.stage(f"{label}: {key} judging"):
            judged[key], llm_answers[key] = judge_responses(judges, pset, responses)
    harmful, over = judged["harmful"], judged["over_refusal"]

    per_judge: dict[str, dict[str, Any]] = {}
    for judge in judges:
        row: dict[str, Any] = {
            "refusal_rate": _rate((harmful.verdicts or {})[judge.name]),
            "over_refusal_rate": _rate((over.verdicts or {})[judge.name]),
        }
        if judge.name in llm_answers["harmful"]:
            answers = {k: v[judge.name] for k, v in llm_answers.items()}
            row["n_unparsed"] = {
                k: sum(parse_yes_no(a) is None for a in v) for k, v in answers.items()
            }
            row["answers"] = answers
        per_judge[judge.name] = row

    with prof.stage(f"{label}: reference cross-entropy"):
        ce = reference_cross_entropy(
            model,
            tok,
            sets.reference.prompts,
            sets.reference.answers,
            system_prompt=config.system_prompt,
            batch_size=config.batch_size,
        )
    extra: dict[str, Any] = {
        "over_refusal_rate": over.refusal_rate,
        "over_refusal": {
            "n_prompts": len(over.prompts),
            "by_category": _by_category(over),
            "completions": over.completions(),
        },
        "judges": per_judge,
        "reference_cross_entropy": ce,
        "fluency": {
            "harmful": ngram_fluency(harmful.responses),
            "over_refusal": ngram_fluency(over.responses),
        },
    }
    if len(judges) > 1:
        extra["judge_agreement"] = {
            "harmful": judge_agreement(harmful.verdicts or {}),
            "over_refusal": judge_agreement(over.verdicts or {}),
        }
    if config.benchmarks:
        with prof.stage(f"{label}: benchmarks"):
            extra["benchmarks"] = run_benchmarks(
                model,
                tok,
                config.benchmarks,
                limit=config.benchmark_limit,
                batch_size=config.batch_size,
                seed=config.seed,
            )
    return ModelEval(harmful, extra=extra)


def _model_record(loaded: LoadedModel) -> dict[str, Any]:
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


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate ``config.model`` (and ``config.baseline``) and write the run directory.

    Returns:
        The report, also written to ``config.out/report.json`` and ``report.md``.
    """
    import torch

    from abliterate.commands.rundir import check_output_dir, environment_record, run_directory
    from abliterate.data.chat import format_chat
    from abliterate.eval.benchmarks import check_task_names
    from abliterate.eval.judges import JudgeOptions, build_judges
    from abliterate.eval.kl import multi_token_kl
    from abliterate.model.loading import load_model
    from abliterate.progress import Profiler
    from abliterate.report.markdown import summary_table, write_reports
    from abliterate.report.schema import Report

    check_output_dir(config.out, config.overwrite)
    torch.manual_seed(config.seed)
    # Everything that can fail fast (prompt files, judge specs, task names) fails before the
    # models are loaded.
    sets = load_sets(config)
    data = sets.record()
    check_task_names(config.benchmarks)
    prof = Profiler()
    with prof.stage("judges"):
        judges = build_judges(
            config.judge, JudgeOptions(device=config.device, batch_size=config.batch_size)
        )

    def load(name: str) -> LoadedModel:
        return load_model(
            name,
            revision=config.revision,
            device=config.device,
            dtype=config.dtype,
            trust_remote_code=config.trust_remote_code,
        )

    with run_directory(config.out, config.overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
        with prof.stage("load model"):
            edited_model = load(config.model)
        env = environment_record(str(edited_model.device), config.seed, data)
        (tmp / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
        edited = assess_model(edited_model, config, sets, judges, prof, "model")

        baseline_dict: dict[str, Any] | None = None
        baseline_record: dict[str, Any] | None = None
        if config.baseline is not None:
            with prof.stage("load baseline"):
                base_model = load(config.baseline)
            _check_same_vocabulary(base_model, edited_model)
            baseline = assess_model(base_model, config, sets, judges, prof, "baseline")
            with prof.stage("KL divergence"):
                kl_multi, kl_first = multi_token_kl(
                    base_model.model,
                    base_model.tokenizer,
                    format_chat(base_model.tokenizer, sets.harmless.prompts, config.system_prompt),
                    model_q=edited_model.model,
                    n_tokens=config.kl_tokens,
                    batch_size=config.batch_size,
                )
            edited.kl_divergence = kl_first
            edited.extra["kl_divergence_multi_token"] = kl_multi
            edited.extra["kl_tokens"] = config.kl_tokens
            baseline_dict = baseline.to_dict()
            baseline_record = _model_record(base_model)

        report: dict[str, Any] = {
            "abliterate_version": __version__,
            "command": "evaluate",
            "model": _model_record(edited_model),
            "baseline_model": baseline_record,
            "data": data,
            "judges": [j.name for j in judges],
            "baseline": baseline_dict,
            "edited": edited.to_dict(),
            "n_examples": config.n_examples,
            "timings": prof.to_dict(),
        }
        typed = Report.model_validate(report)
        write_reports(tmp, typed)
    print(summary_table(typed))
    print(f"\nRun directory: {config.out}")
    return report
