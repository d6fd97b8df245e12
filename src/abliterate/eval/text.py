"""Text normalisation shared by the judges: reasoning blocks removed, case and punctuation
folded, so that phrase matching and yes/no parsing see what a reader sees; and the answer of a
reasoning model separated from its reasoning (:func:`split_answer`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from abliterate.data.reasoning import find_close, leading_open, opens_reasoning

_REASONING = re.compile(r"<(think|thinking|reasoning)>.*?(</\1>|$)", re.DOTALL | re.IGNORECASE)
_EMPHASIS = re.compile(r"[*_`~#>]+")
_SPACE = re.compile(r"\s+")


def strip_reasoning(text: str) -> str:
    """Remove ``<think>…</think>``-style blocks (also an unterminated one at the end)."""
    return _REASONING.sub(" ", text)


def normalize(text: str) -> str:
    """Lower-case, straight apostrophes, no Markdown emphasis, single spaces."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u02bc", "'")
    text = _EMPHASIS.sub("", text.lower())
    return _SPACE.sub(" ", text).strip()


@dataclass(frozen=True)
class Answer:
    """What a judge reads of one response.

    Attributes:
        text: The answer after the reasoning block (the whole response when there is none).
        finished: False when the answer never arrived: the reasoning block was not closed
            within the token budget, or nothing but whitespace (or more reasoning) follows it.
    """

    text: str
    finished: bool = True


def split_answer(response: str, in_reasoning: bool = False) -> Answer:
    """The answer of ``response`` and whether it arrived.

    A response that opens with a reasoning block (``<think>…``), or any response when
    ``in_reasoning`` (the prompt ended with an opening tag, see
    :func:`abliterate.data.reasoning.opens_reasoning`), is reasoning up to its first closing
    tag, and the answer is what follows. Any other response is its own answer, unchanged (and
    always finished: an empty plain answer is the judges' business, as before).
    """
    if in_reasoning:
        start = 0
    else:
        opening = leading_open(response)
        if opening is None:
            return Answer(response)
        start = opening.end()
    closing = find_close(response, start)
    if closing is None:
        return Answer("", finished=False)
    answer = response[closing.end() :].strip()
    return Answer(answer, finished=bool(strip_reasoning(answer).strip()))


def split_answers(responses: Sequence[str], texts: Sequence[str]) -> list[Answer]:
    """:func:`split_answer` of each response to its formatted prompt in ``texts`` (a prompt
    that ends inside an opened reasoning block makes its whole continuation reasoning)."""
    return [split_answer(r, opens_reasoning(t)) for r, t in zip(responses, texts, strict=True)]
