"""Metrics of a steered behaviour: what a strength sweep measures at each strength.

* ``length``: the mean number of words (``\\w+`` runs) of the greedy answers, for a length
  style such as the built-in terse-vs-verbose direction;
* ``refusal``: the share of answers the deciding judge counts as refusals, for re-added (or
  removed) refusal; on harmless prompts it is the over-refusal a steering causes.

Both read greedy answers to one fixed prompt set, so a sweep compares like with like.

Reasoning models (``reasoning``, with ``--thinking on``): the model gets ``thinking_budget``
more tokens, and the metric reads only the answer after the reasoning block, as the
evaluator's judges do (:func:`~abliterate.eval.text.split_answer`); an answer that never
arrived is *unfinished*, left out of the metric (both are over the finished answers, 0 when
none finished) and counted apart. Without reasoning the answers are measured whole, as always.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from abliterate.data.chat import ChatSet
from abliterate.eval.judges import Judge
from abliterate.eval.refusals import judge_responses, rate
from abliterate.eval.text import split_answers
from abliterate.model.forward import generate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BehaviourMetric = Literal["length", "refusal"]
_WORDS = re.compile(r"\w+")

UNITS: dict[BehaviourMetric, str] = {"length": "words per answer", "refusal": "share refused"}


def mean_words(texts: Sequence[str]) -> float:
    """Mean number of words per text (0 for no texts: no answer finished)."""
    return sum(len(_WORDS.findall(t)) for t in texts) / len(texts) if texts else 0.0


@dataclass(frozen=True)
class Behaviour:
    """A metric measured on greedy answers.

    Attributes:
        value: The metric, over the finished answers.
        responses: The whole generations, reasoning included.
        answers: What was measured: the answers after any reasoning (the responses without
            reasoning; see :class:`~abliterate.eval.text.Answer` for an unfinished one's).
        unfinished: Per prompt, whether the answer never arrived; None without reasoning.
    """

    value: float
    responses: list[str]
    answers: list[str]
    unfinished: list[bool] | None = None

    @property
    def unfinished_rate(self) -> float | None:
        """Share of prompts whose answer never arrived (None without reasoning)."""
        return None if self.unfinished is None else rate(self.unfinished)


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
    thinking_budget: int = 0,
    reasoning: bool = False,
) -> Behaviour:
    """The metric of ``model``'s greedy answers to ``prompts`` (module docstring)."""
    responses = generate(
        model, tokenizer, prompts.texts, max_new_tokens=max_new_tokens + thinking_budget,
        batch_size=batch_size, desc=f"Generating ({label or metric})",
    )  # fmt: skip
    if not reasoning:
        if metric == "length":
            return Behaviour(mean_words(responses), responses, responses)
        return Behaviour(rate(judge(prompts.prompts.prompts, responses)), responses, responses)
    split = split_answers(responses, prompts.texts)
    answers = [a.text for a in split]
    unfinished = [not a.finished for a in split]
    if metric == "length":
        value = mean_words([a.text for a in split if a.finished])
    else:
        value = judge_responses([judge], prompts.prompts, responses, split)[0].refusal_rate
    return Behaviour(value, responses, answers, unfinished)
