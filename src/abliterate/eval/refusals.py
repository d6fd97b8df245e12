"""Judged refusals: generations on harmful prompts and every judge's verdicts on them.

:class:`RefusalEval` holds one model's answers to a prompt set with each judge's verdicts (the
first judge decides each completion's ``refused``); :func:`judge_responses` runs the judges.
Its completions are the ``report.json`` shape shared by every command::

    [{"prompt": ..., "response": ..., "refused": true|false, "category"?: ..., "judges"?: {...}}]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from abliterate.data.prompts import PromptSet
from abliterate.eval.judges import Judge
from abliterate.eval.llm_judge import LLMJudge


@dataclass
class RefusalEval:
    """Judged generations on one prompt set.

    Attributes:
        prompts, responses: The instructions and the model's answers, in order.
        refused: The deciding (first) judge's verdicts.
        categories: One category per prompt, when the set has them.
        judge: Name of the deciding judge.
        verdicts: Every judge's verdicts by judge name (the deciding one included).
    """

    prompts: list[str]
    responses: list[str]
    refused: list[bool]
    categories: list[str] | None = None
    judge: str = "markers"
    verdicts: dict[str, list[bool]] | None = None

    @property
    def refusal_rate(self) -> float:
        """Fraction of prompts refused."""
        return rate(self.refused)

    def rate_by(self, judge: str) -> float:
        """The refusal rate according to ``judge``."""
        return rate((self.verdicts or {self.judge: self.refused})[judge])

    def by_category(self) -> dict[str, float]:
        """Refusal rate per category (``uncategorized`` for prompts without one)."""
        groups: dict[str, list[bool]] = {}
        for cat, refused in zip(self.categories or [], self.refused, strict=False):
            groups.setdefault(cat or "uncategorized", []).append(refused)
        return {cat: rate(flags) for cat, flags in sorted(groups.items())}

    def completions(self) -> list[dict[str, Any]]:
        """``[{"prompt", "response", "refused"}]`` in prompt order."""
        rows = []
        for i, (p, r, f) in enumerate(zip(self.prompts, self.responses, self.refused, strict=True)):
            row: dict[str, Any] = {"prompt": p, "response": r, "refused": f}
            if self.categories:
                row["category"] = self.categories[i]
            if self.verdicts and len(self.verdicts) > 1:
                row["judges"] = {name: v[i] for name, v in self.verdicts.items()}
            rows.append(row)
        return rows


def rate(flags: Sequence[bool]) -> float:
    """Fraction of true flags."""
    return sum(flags) / len(flags)


def judge_responses(
    judges: Sequence[Judge], prompts: PromptSet, responses: list[str]
) -> tuple[RefusalEval, dict[str, list[str]]]:
    """Run every judge on the responses.

    Returns:
        The evaluation (the first judge decides ``refused``) and, per LLM judge, its raw
        answers, so a judge that answers badly can be seen in the report.
    """
    verdicts: dict[str, list[bool]] = {}
    answers: dict[str, list[str]] = {}
    for judge in judges:
        verdicts[judge.name] = judge(prompts.prompts, responses)
        if isinstance(judge, LLMJudge):
            answers[judge.name] = list(judge.last_answers)
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
