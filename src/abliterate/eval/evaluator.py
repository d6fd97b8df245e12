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
* for a model that others are compared with (``reference=True``: the baseline), its greedy
  continuations of the harmless prompts, the reference of the KL divergences.

Between two models (:meth:`Evaluator.kl`, :meth:`Evaluator.compare`): ``KL(baseline ‖ model)``
per harmless prompt over the baseline's continuations (:mod:`abliterate.eval.kl`), its first
position being the first-token KL; both are reported overall and per category of the harmless
prompts (``kl_by_category``), so a user sees which kind of request an edit hurts.

An :class:`Assessment` is plain data (:meth:`Assessment.to_cache` / :meth:`from_cache`): the
baseline's is what :mod:`abliterate.eval.cache` keeps between runs.

Nothing here installs an edit: a caller that evaluates an edited model through hooks wraps the
call in :func:`abliterate.edit.hooks.edit_hooks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from abliterate.data.chat import ChatSet
from abliterate.eval.judges import Judge, judge_agreement
from abliterate.eval.kl import Context, kl_per_prompt, reference_continuations
from abliterate.eval.llm_judge import parse_yes_no
from abliterate.eval.metrics import ReferenceAnswers, ngram_fluency, reference_cross_entropy
from abliterate.eval.refusals import RefusalEval, judge_responses
from abliterate.eval.text import split_answers
from abliterate.model.forward import generate

if TYPE_CHECKING:
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


@dataclass(frozen=True)
class KLResult:
    """``KL(baseline ‖ model)`` per harmless prompt, in prompt order, in nats.

    Attributes:
        multi_token: Averaged over each prompt's reference continuation.
        first_token: At the continuation's first position (the next-token distributions).
        n_tokens: The longest continuation measured (``--kl-tokens``).
    """

    multi_token: list[float]
    first_token: list[float]
    n_tokens: int

    def by_category(self, categories: Sequence[str]) -> dict[str, dict[str, float | int]]:
        """``{category: {"n", "kl_divergence", "kl_divergence_multi_token"}}``, sorted by name
        (``uncategorized`` for prompts without a category)."""
        groups: dict[str, list[int]] = {}
        for i, cat in enumerate(categories):
            groups.setdefault(cat or "uncategorized", []).append(i)
        return {
            cat: {
                "n": len(idx),
                "kl_divergence": sum(self.first_token[i] for i in idx) / len(idx),
                "kl_divergence_multi_token": sum(self.multi_token[i] for i in idx) / len(idx),
            }
            for cat, idx in sorted(groups.items())
        }


@dataclass
class Assessment:
    """Everything measured on one model, and its KL divergences once compared.

    Attributes:
        harmful: Judged answers to the harmful prompts.
        extra: Further report entries (over-refusal, judges, fluency, cross-entropy, …).
        continuations: The model's greedy continuations of the harmless prompts (token ids, at
            most ``kl_tokens`` each), when it was assessed as a reference (not reported; the
            KL divergences of the models compared with it are measured over them).
        kl_divergence: First-token KL from the baseline, once compared.
    """

    harmful: RefusalEval
    extra: dict[str, Any] = field(default_factory=dict)
    continuations: list[list[int]] | None = None
    kl_divergence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` shape of one model (``baseline`` or ``edited``)."""
        out: dict[str, Any] = {
            "refusal_rate": self.harmful.refusal_rate,
            "n_prompts": len(self.harmful.prompts),
            "judge": self.harmful.judge,
        }
        if self.harmful.late is not None:
            out["late_refusal_rate"] = self.harmful.late_refusal_rate
            out["n_late_refusals"] = self.harmful.n_late
        if self.kl_divergence is not None:
            out["kl_divergence"] = self.kl_divergence
        out.update(self.extra)
        out["completions"] = self.harmful.completions()
        return out

    def to_cache(self) -> dict[str, Any]:
        """Everything this assessment holds, as JSON-ready data (:meth:`from_cache` reads it)."""
        return {
            "harmful": asdict(self.harmful),
            "extra": self.extra,
            "continuations": self.continuations,
            "kl_divergence": self.kl_divergence,
        }

    @classmethod
    def from_cache(cls, data: dict[str, Any]) -> Assessment:
        """The assessment :meth:`to_cache` wrote.

        Raises:
            TypeError, KeyError, ValueError: ``data`` is not what :meth:`to_cache` writes.
        """
        harmful = RefusalEval(**data["harmful"])
        if not len(harmful.prompts) == len(harmful.responses) == len(harmful.refused):
            raise ValueError("one response and one verdict per prompt are needed")
        continuations = data["continuations"]
        if continuations is not None and not all(
            isinstance(c, list) and c and all(isinstance(t, int) for t in c) for c in continuations
        ):
            raise ValueError("continuations must be non-empty lists of token ids")
        if not isinstance(data["extra"], dict):
            raise ValueError("extra must be an object")
        return cls(harmful, dict(data["extra"]), continuations, data["kl_divergence"])


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

    def settings(self) -> dict[str, Any]:
        """Every setting that changes what :meth:`assess` measures (the prompt sets and judges
        aside), for the baseline cache's key."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "thinking_budget": self.thinking_budget,
            "reasoning": self.reasoning,
            "kl_tokens": self.kl_tokens,
            "batch_size": self.batch_size,
            "benchmarks": list(self.benchmarks),
            "benchmark_limit": self.benchmark_limit,
            "seed": self.seed,
            "system_prompt": self.system_prompt,
        }

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
        answers = split_answers(responses, chats.texts)
        return judge_responses(self.judges, chats.prompts, responses, answers)

    def _unfinished(self, judged: RefusalEval) -> dict[str, Any]:
        """The unfinished counts of a set, where there are any or reasoning is expected."""
        if not (self.reasoning or judged.n_unfinished):
            return {}
        return {"n_unfinished": judged.n_unfinished, "unfinished_rate": judged.unfinished_rate}

    def assess(self, model: PreTrainedModel, label: str, *, reference: bool = False) -> Assessment:
        """Everything measured on ``model`` without reference to another (no KL); with
        ``reference``, also its continuations of the harmless prompts, which the models compared
        with it are measured against."""
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
                    "late_refusal_rate": over.late_refusal_rate,
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
        return Assessment(harmful, extra, self.continuations(model) if reference else None)

    def continuations(self, model: PreTrainedModel) -> list[list[int]]:
        """``model``'s greedy continuations of the harmless prompts (token ids, at most
        ``kl_tokens`` each): the reference over which :meth:`kl` compares another model with
        it (an :class:`Assessment` made with ``reference=True`` holds them)."""
        return reference_continuations(
            model, self.tokenizer, self.sets.harmless.texts, n_tokens=self.kl_tokens,
            batch_size=self.batch_size,
        )  # fmt: skip

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

    def kl(
        self,
        baseline: Assessment | list[list[int]],
        model_p: PreTrainedModel,
        *,
        model_q: PreTrainedModel | None = None,
        p_context: Context | None = None,
        q_context: Context | None = None,
    ) -> KLResult:
        """``KL(p ‖ q)`` per harmless prompt over ``baseline``'s continuations (see
        :func:`abliterate.eval.kl.kl_per_prompt`): p is the baseline model (``model_p`` in
        ``p_context``), q the compared one (``model_q``, or ``model_p`` in ``q_context``).

        ``baseline`` is p's assessment made with ``reference=True``, or the continuations
        themselves (:meth:`continuations`) where p's answers are not assessed.
        """
        continuations = baseline if isinstance(baseline, list) else baseline.continuations
        if continuations is None:
            raise ValueError("the baseline was not assessed as a reference (reference=True)")
        multi, first = kl_per_prompt(
            model_p,
            self.tokenizer,
            self.sets.harmless.texts,
            continuations,
            model_q=model_q,
            p_context=p_context or nullcontext,
            q_context=q_context or nullcontext,
            batch_size=self.batch_size,
        )
        return KLResult(multi, first, self.kl_tokens)

    def compare(self, model: Assessment, kl: KLResult) -> None:
        """Record on ``model`` its KL divergences from the baseline (:meth:`kl`): overall and
        per category of the harmless prompts."""
        model.kl_divergence = sum(kl.first_token) / len(kl.first_token)
        model.extra["kl_divergence_multi_token"] = sum(kl.multi_token) / len(kl.multi_token)
        model.extra["kl_tokens"] = kl.n_tokens
        categories = self.sets.harmless.prompts.categories
        if categories:
            model.extra["kl_by_category"] = kl.by_category(categories)
