"""The one evaluator: what ``run``, ``optimize`` and ``evaluate`` measure on a model.

For each model (:meth:`Evaluator.assess`):

* greedy answers to the harmful prompts, judged by every judge (the first decides each
  completion's ``refused``), with per-judge rates and their pairwise agreement; a reasoning
  model gets ``thinking_budget`` more tokens, its judges read only the answer after the
  reasoning, and answers that never arrive are counted apart as *unfinished*
  (:mod:`abliterate.eval.refusals`);
* the same for the harmless-but-sensitive-sounding over-refusal prompts, when the sets have
  them;
* n-gram fluency of the answers; the cross-entropy of reference answers (when given);
  lm-evaluation-harness benchmarks (when asked for);
* the next-token distributions on the harmless prompts, kept for the KL divergences.

Between two models (:meth:`Evaluator.compare`): first-token ``KL(baseline ‖ model)`` from
those distributions, and multi-token KL over the baseline's own continuations
(:func:`abliterate.eval.kl.multi_token_kl`).

Nothing here installs an edit: a caller that evaluates an edited model through hooks wraps the
call in :func:`abliterate.edit.hooks.edit_hooks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from abliterate.core.stats import kl_divergence
from abliterate.data.chat import ChatSet
from abliterate.data.reasoning import opens_reasoning
from abliterate.eval.judges import Judge, judge_agreement
from abliterate.eval.kl import Context, multi_token_kl
from abliterate.eval.llm_judge import parse_yes_no
from abliterate.eval.metrics import ReferenceAnswers, ngram_fluency, reference_cross_entropy
from abliterate.eval.refusals import RefusalEval, judge_responses
from abliterate.eval.text import split_answer
from abliterate.model.forward import generate, next_token_logprobs

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class EvalSets:
    """The prompt sets every evaluated model sees.

    Attributes:
        harmful: Prompts whose refusal rate is measured.
        harmless: Prompts on which the KL divergences are measured (for a reasoning model,
            formatted with thinking off: the distributions compared are the answer's).
        over_refusal: Harmless but sensitive-sounding prompts (over-refusal rate), or None.
        reference: Prompts with reference answers (cross-entropy), or None.
    """

    harmful: ChatSet
    harmless: ChatSet
    over_refusal: ChatSet | None = None
    reference: ReferenceAnswers | None = None

    def chat_sets(self) -> list[ChatSet]:
        """The chat-formatted sets, in the order harmful, harmless, over-refusal."""
        return [s for s in (self.harmful, self.harmless, self.over_refusal) if s is not None]

    def record(self) -> dict[str, Any]:
        """Names, sizes and content hashes, for ``report.json`` and ``environment.json``."""
        named = {"eval_harmful": self.harmful, "eval_harmless": self.harmless}
        if self.over_refusal is not None:
            named["over_refusal"] = self.over_refusal
        out: dict[str, Any] = {
            k: {"name": s.prompts.name, "n": len(s), "sha256": s.prompts.sha256}
            for k, s in named.items()
        }
        if self.reference is not None:
            out["reference_answers"] = {"name": self.reference.name, "n": len(self.reference)}
        return out


@dataclass
class Assessment:
    """Everything measured on one model, and its KL divergences once compared.

    Attributes:
        harmful: Judged answers to the harmful prompts.
        harmless_logprobs: ``(n_harmless, vocab)`` next-token log-probabilities (not reported;
            kept to compare with another model).
        extra: Further report entries (over-refusal, judges, fluency, cross-entropy, …).
        kl_divergence: First-token KL from the baseline, once compared.
    """

    harmful: RefusalEval
    harmless_logprobs: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)
    kl_divergence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` shape of one model (``baseline`` or ``edited``)."""
        out: dict[str, Any] = {
            "refusal_rate": self.harmful.refusal_rate,
            "n_prompts": len(self.harmful.prompts),
            "judge": self.harmful.judge,
        }
        if self.kl_divergence is not None:
            out["kl_divergence"] = self.kl_divergence
        out.update(self.extra)
        out["completions"] = self.harmful.completions()
        return out


class Evaluator:
    """Measures models on fixed prompt sets with fixed judges and settings.

    Args:
        tokenizer: The tokenizer every evaluated model shares.
        sets: The prompt sets (chat-formatted with ``tokenizer``).
        judges: Refusal judges; the first decides.
        max_new_tokens: Tokens generated per answer.
        kl_tokens: Positions of multi-token KL.
        batch_size: Prompts per forward pass.
        benchmarks, benchmark_limit, seed: lm-evaluation-harness tasks, items per task, seed.
        thinking_budget: Tokens for reasoning on top of ``max_new_tokens`` (0: none).
        reasoning: Whether the answers are expected to reason (``--thinking on``): the
            unfinished counts are then reported even when zero.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        sets: EvalSets,
        judges: Sequence[Judge],
        *,
        max_new_tokens: int,
        kl_tokens: int,
        batch_size: int,
        benchmarks: Sequence[str] = (),
        benchmark_limit: int | None = None,
        seed: int = 0,
        system_prompt: str | None = None,
        thinking_budget: int = 0,
        reasoning: bool = False,
    ) -> None:
        if not judges:
            raise ValueError("the evaluator needs at least one judge")
        self.thinking_budget, self.reasoning = thinking_budget, reasoning
        self.tokenizer, self.sets, self.judges = tokenizer, sets, list(judges)
        self.max_new_tokens, self.kl_tokens, self.batch_size = max_new_tokens, kl_tokens, batch_size
        self.benchmarks, self.benchmark_limit, self.seed = tuple(benchmarks), benchmark_limit, seed
        self.system_prompt = system_prompt

    def _judged(
        self, model: PreTrainedModel, chats: ChatSet, label: str
    ) -> tuple[RefusalEval, dict[str, list[str]]]:
        responses = generate(
            model,
            self.tokenizer,
            chats.texts,
            max_new_tokens=self.max_new_tokens + self.thinking_budget,
            batch_size=self.batch_size,
            desc=f"Generating ({label})",
        )
        answers = [
            split_answer(r, opens_reasoning(t)) for r, t in zip(responses, chats.texts, strict=True)
        ]
        return judge_responses(self.judges, chats.prompts, responses, answers)

    def _unfinished(self, judged: RefusalEval) -> dict[str, Any]:
        """The unfinished counts of a set, where there are any or reasoning is expected."""
        if not (self.reasoning or judged.n_unfinished):
            return {}
        return {"n_unfinished": judged.n_unfinished, "unfinished_rate": judged.unfinished_rate}

    def assess(self, model: PreTrainedModel, label: str) -> Assessment:
        """Everything measured on ``model`` without reference to another (no KL)."""
        harmful, answers = self._judged(model, self.sets.harmful, label)
        judged = {"harmful": harmful}
        llm_answers = {"harmful": answers}
        if self.sets.over_refusal is not None:
            over, over_answers = self._judged(
                model, self.sets.over_refusal, f"{label}, over-refusal"
            )
            judged["over_refusal"], llm_answers["over_refusal"] = over, over_answers
            extra: dict[str, Any] = {
                "over_refusal_rate": over.refusal_rate,
                "over_refusal": {
                    "n_prompts": len(over.prompts),
                    **self._unfinished(over),
                    "by_category": over.by_category(),
                    "completions": over.completions(),
                },
            }
        else:
            extra = {}
        extra.update(self._unfinished(harmful))
        extra["judges"] = self._per_judge(judged, llm_answers)
        if len(self.judges) > 1:
            extra["judge_agreement"] = {
                k: judge_agreement(v.finished_verdicts()) if len(v.finished(v.refused)) else []
                for k, v in judged.items()
            }
        # Fluency of what was answered: the answers after any reasoning.
        extra["fluency"] = {k: ngram_fluency(v.answers or v.responses) for k, v in judged.items()}
        if self.sets.reference is not None:
            ref = self.sets.reference
            extra["reference_cross_entropy"] = reference_cross_entropy(
                model, self.tokenizer, ref.prompts, ref.answers,
                system_prompt=self.system_prompt, batch_size=self.batch_size,
            )  # fmt: skip
        if self.benchmarks:
            from abliterate.eval.benchmarks import run_benchmarks

            extra["benchmarks"] = run_benchmarks(
                model, self.tokenizer, self.benchmarks, limit=self.benchmark_limit,
                batch_size=self.batch_size, seed=self.seed,
            )  # fmt: skip
        logprobs = next_token_logprobs(
            model, self.tokenizer, self.sets.harmless.texts, batch_size=self.batch_size
        )
        return Assessment(harmful, logprobs, extra)

    def _per_judge(
        self, judged: dict[str, RefusalEval], llm_answers: dict[str, dict[str, list[str]]]
    ) -> dict[str, dict[str, Any]]:
        """Each judge's rates (and an LLM judge's raw answers with how many were unparsed)."""
        out: dict[str, dict[str, Any]] = {}
        for judge in self.judges:
            row: dict[str, Any] = {"refusal_rate": judged["harmful"].rate_by(judge.name)}
            if "over_refusal" in judged:
                row["over_refusal_rate"] = judged["over_refusal"].rate_by(judge.name)
            if judge.name in llm_answers["harmful"]:
                answers = {k: v[judge.name] for k, v in llm_answers.items()}
                # Unfinished responses were not put to the judge (their raw answer is empty).
                row["n_unparsed"] = {
                    k: sum(parse_yes_no(a) is None for a in judged[k].finished(v))
                    for k, v in answers.items()
                }
                row["answers"] = answers
            out[judge.name] = row
        return out

    def multi_token_kl(
        self,
        model_p: PreTrainedModel,
        *,
        model_q: PreTrainedModel | None = None,
        p_context: Context | None = None,
        q_context: Context | None = None,
    ) -> tuple[float, float]:
        """Multi-token and first-token ``KL(p ‖ q)`` on the harmless prompts (see
        :func:`abliterate.eval.kl.multi_token_kl`)."""
        from contextlib import nullcontext

        return multi_token_kl(
            model_p,
            self.tokenizer,
            self.sets.harmless.texts,
            model_q=model_q,
            p_context=p_context or nullcontext,
            q_context=q_context or nullcontext,
            n_tokens=self.kl_tokens,
            batch_size=self.batch_size,
        )

    def compare(self, baseline: Assessment, model: Assessment, multi_token: float) -> None:
        """Record on ``model`` its KL divergences from ``baseline`` (first-token KL from the
        stored distributions; ``multi_token`` as measured by :meth:`multi_token_kl`)."""

        kl = kl_divergence(baseline.harmless_logprobs, model.harmless_logprobs)
        model.kl_divergence = float(kl.mean())
        model.extra["kl_divergence_multi_token"] = multi_token
        model.extra["kl_tokens"] = self.kl_tokens
