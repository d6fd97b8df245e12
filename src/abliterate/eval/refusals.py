"""Evaluation of a model on held-out prompts: greedy generations, judged refusals and KL.

The shape written to ``report.json`` (shared by every command that evaluates a model) is::

    {"refusal_rate": r, "kl_divergence": k,            # k only for an edited model
     "completions": [{"prompt": ..., "response": ..., "refused": true|false}, ...]}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from abliterate.eval.judges import Judge
from abliterate.model.forward import generate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class RefusalEval:
    """Judged generations on harmful prompts."""

    prompts: list[str]
    responses: list[str]
    refused: list[bool]
    categories: list[str] | None = None
    judge: str = "markers"
    # Every judge's verdicts when several ran (``refused`` is the first judge's), by judge name.
    verdicts: dict[str, list[bool]] | None = None

    @property
    def refusal_rate(self) -> float:
        """Fraction of prompts refused."""
        return sum(self.refused) / len(self.refused)

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


def evaluate_refusals(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    texts: Sequence[str],
    judge: Judge,
    *,
    categories: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    desc: str = "Generating",
) -> RefusalEval:
    """Generate for every harmful prompt and judge the answers."""
    responses = generate(
        model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc
    )
    return RefusalEval(
        prompts=list(prompts),
        responses=responses,
        refused=judge(prompts, responses),
        categories=list(categories) if categories else None,
        judge=judge.name,
    )


@dataclass
class ModelEval:
    """Everything measured for one model (baseline or edited)."""

    refusals: RefusalEval
    kl_divergence: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` shape for one model."""
        out: dict[str, Any] = {
            "refusal_rate": self.refusals.refusal_rate,
            "n_prompts": len(self.refusals.prompts),
            "judge": self.refusals.judge,
        }
        if self.kl_divergence is not None:
            out["kl_divergence"] = self.kl_divergence
        out.update(self.extra)
        out["completions"] = self.refusals.completions()
        return out
