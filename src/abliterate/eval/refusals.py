"""Judged refusals: generations on harmful prompts and every judge's verdicts on them.

:class:`RefusalEval` holds one model's answers to a prompt set with each judge's verdicts (the
first judge decides each completion's ``refused``); :func:`judge_responses` runs the judges.
Its completions are the ``report.json`` shape shared by every command::

    [{"prompt": ..., "response": ..., "refused": true|false, "category"?: ..., "judges"?: {...},
      "unfinished"?: true}]

Reasoning models: judges read only the answer after the reasoning block
(:func:`abliterate.eval.text.split_answer`); the report keeps the whole response. A response
whose answer never arrived within the token budget is *unfinished*: it is not judged, counts as
neither refused nor answered, and is left out of every rate's denominator (the refusal rate is
the share of *finished* answers that refuse; ``unfinished_rate`` is the share of all prompts
left unfinished, reported beside it). Every rate of a set with no finished answer is 0, and its
``unfinished_rate`` is 1. Without reasoning nothing is unfinished, and every rate is what it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from abliterate.data.prompts import PromptSet
from abliterate.eval.judges import Judge
from abliterate.eval.llm_judge import LLMJudge
from abliterate.eval.text import Answer

T = TypeVar("T")


@dataclass
class RefusalEval:
    """Judged generations on one prompt set.

    Attributes:
        prompts, responses: The instructions and the model's answers, in order.
        refused: The deciding (first) judge's verdicts.
        categories: One category per prompt, when the set has them.
        judge: Name of the deciding judge.
        verdicts: Every judge's verdicts by judge name (the deciding one included); False for
            an unfinished response, which no judge saw.
        unfinished: Per prompt, whether the answer never arrived (module docstring); None when
            every answer arrived.
        answers: What the judges read (the answers after any reasoning); None: the responses.
    """

    prompts: list[str]
    responses: list[str]
    refused: list[bool]
    categories: list[str] | None = None
    judge: str = "markers"
    verdicts: dict[str, list[bool]] | None = None
    unfinished: list[bool] | None = None
    answers: list[str] | None = None

    @property
    def n_unfinished(self) -> int:
        """Responses whose answer never arrived."""
        return sum(self.unfinished or [])

    @property
    def unfinished_rate(self) -> float:
        """Fraction of all prompts whose answer never arrived."""
        return self.n_unfinished / len(self.prompts)

    def finished(self, values: Sequence[T]) -> list[T]:
        """``values`` (one per prompt) without the unfinished prompts'."""
        if self.unfinished is None:
            return list(values)
        return [v for v, u in zip(values, self.unfinished, strict=True) if not u]

    @property
    def refusal_rate(self) -> float:
        """Fraction of finished answers that refuse."""
        return rate(self.finished(self.refused))

    def rate_by(self, judge: str) -> float:
        """The refusal rate according to ``judge`` (finished answers only)."""
        return rate(self.finished((self.verdicts or {self.judge: self.refused})[judge]))

    def by_category(self) -> dict[str, float]:
        """Refusal rate per category (``uncategorized`` for prompts without one), over finished
        answers; a category none of whose answers finished is left out."""
        groups: dict[str, list[bool]] = {}
        unfinished = self.unfinished or [False] * len(self.refused)
        for cat, refused, u in zip(self.categories or [], self.refused, unfinished, strict=False):
            if not u:
                groups.setdefault(cat or "uncategorized", []).append(refused)
        return {cat: rate(flags) for cat, flags in sorted(groups.items())}

    def finished_verdicts(self) -> dict[str, list[bool]]:
        """Every judge's verdicts on the finished answers (for judge agreement)."""
        return {name: self.finished(v) for name, v in (self.verdicts or {}).items()}

    def completions(self) -> list[dict[str, Any]]:
        """``[{"prompt", "response", "refused"}]`` in prompt order (module docstring)."""
        rows = []
        for i, (p, r, f) in enumerate(zip(self.prompts, self.responses, self.refused, strict=True)):
            row: dict[str, Any] = {"prompt": p, "response": r, "refused": f}
            if self.categories:
                row["category"] = self.categories[i]
            if self.unfinished is not None and self.unfinished[i]:
                row["unfinished"] = True
            elif self.verdicts and len(self.verdicts) > 1:
                row["judges"] = {name: v[i] for name, v in self.verdicts.items()}
            rows.append(row)
        return rows


def rate(flags: Sequence[bool]) -> float:
    """Fraction of true flags (0 for no flags: a set with no finished answer)."""
    return sum(flags) / len(flags) if flags else 0.0


def judge_responses(
    judges: Sequence[Judge],
    prompts: PromptSet,
    responses: list[str],
    answers: Sequence[Answer] | None = None,
) -> tuple[RefusalEval, dict[str, list[str]]]:
    """Run every judge on the finished answers.

    Args:
        answers: Each response's answer (:func:`abliterate.eval.text.split_answer`); None: the
            responses are the answers, all finished.

    Returns:
        The evaluation (the first judge decides ``refused``) and, per LLM judge, its raw
        answers (empty for unfinished responses, which it did not see), so a judge that
        answers badly can be seen in the report.
    """
    if answers is None:
        answers = [Answer(r) for r in responses]
    done = [i for i, a in enumerate(answers) if a.finished]
    texts = [answers[i].text for i in done]
    asked = [prompts.prompts[i] for i in done]
    verdicts: dict[str, list[bool]] = {}
    raw: dict[str, list[str]] = {}
    for judge in judges:
        verdicts[judge.name] = [False] * len(responses)
        got = judge(asked, texts) if done else []
        for i, v in zip(done, got, strict=True):
            verdicts[judge.name][i] = v
        if isinstance(judge, LLMJudge):
            raw[judge.name] = [""] * len(responses)
            for i, a in zip(done, judge.last_answers if done else [], strict=True):
                raw[judge.name][i] = a
    primary = judges[0].name
    unfinished = [not a.finished for a in answers]
    evaluation = RefusalEval(
        prompts=list(prompts.prompts),
        responses=responses,
        refused=verdicts[primary],
        categories=list(prompts.categories) if prompts.categories else None,
        judge=primary,
        verdicts=verdicts,
        unfinished=unfinished if any(unfinished) else None,
        answers=[a.text for a in answers],
    )
    return evaluation, raw
