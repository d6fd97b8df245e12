"""Metrics of a steered behaviour: what a strength sweep measures at each strength.

* ``length``: the mean number of words (``\\w+`` runs) of the greedy answers, for a length
  style such as the built-in terse-vs-verbose direction;
* ``refusal``: the share of answers the deciding judge counts as refusals, for re-added (or
  removed) refusal; on harmless prompts it is the over-refusal a steering causes.

Both read greedy answers to one fixed prompt set, so a sweep compares like with like.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from abliterate.data.chat import ChatSet
from abliterate.eval.judges import Judge
from abliterate.eval.refusals import rate
from abliterate.model.forward import generate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BehaviourMetric = Literal["length", "refusal"]
_WORDS = re.compile(r"\w+")

UNITS: dict[BehaviourMetric, str] = {"length": "words per answer", "refusal": "share refused"}


def mean_words(texts: Sequence[str]) -> float:
    """Mean number of words per text."""
    return sum(len(_WORDS.findall(t)) for t in texts) / len(texts)


def measure_behaviour(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: ChatSet,
    metric: BehaviourMetric,
    judge: Judge,
    *,
    max_new_tokens: int,
    batch_size: int,
    label: str = "",
) -> tuple[float, list[str]]:
    """The metric of ``model``'s greedy answers to ``prompts`` (and the answers)."""
    responses = generate(
        model, tokenizer, prompts.texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        desc=f"Generating ({label or metric})",
    )  # fmt: skip
    if metric == "length":
        return mean_words(responses), responses
    return rate(judge(prompts.prompts.prompts, responses)), responses
