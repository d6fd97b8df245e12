"""Text normalisation shared by the judges: reasoning blocks removed, case and punctuation
folded, so that phrase matching and yes/no parsing see what a reader sees."""

from __future__ import annotations

import re

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
