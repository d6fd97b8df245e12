"""Marker lists: refusal and moralizing phrases that tell *which* phrase a response used.

The evaluation's :class:`~abliterate.eval.judges.MarkerJudge` answers "refused or not" on
answers to harmful prompts. Filtering an instruction dataset needs more: any response of any
topic is judged, a compliant answer that merely mentions "illegal" or "harmful" must be kept,
and the report counts rows per marker. A :class:`MarkerList` therefore

* holds phrases, never topic words (the shipped lists say so in their headers);
* matches whole words only (``as an ai`` does not match "as an aide"), on the same normalised
  text as the judges (lower case, straight apostrophes, no Markdown emphasis);
* matches a phrase written ``^phrase`` only at the start of a response, so that openings that
  decline there ("I can't …") stay ordinary speech in the middle ("… I can't believe …");
* reports every distinct phrase it found (longest first, non-overlapping).

Two lists ship with the package (``marker_lists/``): ``refusal`` (phrases of declining) and
``broad`` (those plus an assistant describing itself as an AI and lecturing the user). Users
write their own in the same one-phrase-a-line format (:meth:`MarkerList.from_file`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from abliterate.errors import JudgeError
from abliterate.eval.text import normalize, strip_reasoning

SHIPPED_LISTS = {"refusal": ("refusal.txt",), "broad": ("refusal.txt", "moralizing.txt")}
"""The shipped marker lists by name, and the files each is made of."""

EMPTY = "(empty response)"
"""The marker reported for an empty response, which counts as a refusal (as in the judges)."""

# A word character or an apostrophe continues a word ("can't" must not match "can").
_EDGE_BEFORE = r"(?<![\w'])"
_EDGE_AFTER = r"(?![\w'])"


def parse_markers(text: str, source: str) -> tuple[list[str], list[str]]:
    """Phrases (anywhere) and anchored phrases (start of a response) of a marker file.

    Raises:
        JudgeError: the file names no marker at all.
    """
    anywhere: list[str] = []
    anchored: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        target = anchored if line.startswith("^") else anywhere
        phrase = normalize(line.removeprefix("^"))
        if phrase and phrase not in target:
            target.append(phrase)
    if not anywhere and not anchored:
        raise JudgeError(f"marker file {source} holds no markers (one phrase a line).")
    return anywhere, anchored


def _alternation(phrases: Sequence[str]) -> str:
    # Longest first: the regex engine takes the first alternative that matches, so "i cannot
    # provide" must be tried before "i cannot".
    ordered = sorted(phrases, key=lambda p: (-len(p), p))
    return "|".join(re.escape(p) for p in ordered)


class MarkerList:
    """A named list of phrases; :meth:`matches` says which of them a response contains.

    Args:
        name: ``refusal``, ``broad`` or ``markers:PATH``.
        anywhere: Normalised phrases matched anywhere in a response.
        anchored: Normalised phrases matched only at its start.
    """

    def __init__(self, name: str, anywhere: Sequence[str], anchored: Sequence[str] = ()) -> None:
        self.name, self.anywhere, self.anchored = name, tuple(anywhere), tuple(anchored)
        # One compiled alternation per kind: a 100k-row dataset is scanned in seconds.
        self._anywhere_re = (
            re.compile(_EDGE_BEFORE + f"(?:{_alternation(self.anywhere)})" + _EDGE_AFTER)
            if self.anywhere
            else None
        )
        self._anchored_re = (
            re.compile(f"^(?:{_alternation(self.anchored)})" + _EDGE_AFTER)
            if self.anchored
            else None
        )

    @classmethod
    def shipped(cls, name: str) -> MarkerList:
        """The shipped list ``refusal`` or ``broad``.

        Raises:
            JudgeError: no shipped list has that name.
        """
        if name not in SHIPPED_LISTS:
            raise JudgeError(
                f"no shipped marker list '{name}'; choose {' or '.join(SHIPPED_LISTS)}, or give "
                "a file of markers."
            )
        folder = resources.files("abliterate.eval") / "marker_lists"
        text = "\n".join((folder / f).read_text(encoding="utf-8") for f in SHIPPED_LISTS[name])
        anywhere, anchored = parse_markers(text, name)
        return cls(name, tuple(anywhere), tuple(anchored))

    @classmethod
    def from_file(cls, path: Path) -> MarkerList:
        """A user's marker file (the format of the shipped lists).

        Raises:
            JudgeError: the file is missing, unreadable or empty.
        """
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise JudgeError(f"cannot read marker file {path}: {exc}") from exc
        anywhere, anchored = parse_markers(text, str(path))
        return cls(f"markers:{path}", tuple(anywhere), tuple(anchored))

    @classmethod
    def resolve(cls, spec: str) -> MarkerList:
        """``refusal``, ``broad`` or the path of a marker file."""
        return cls.shipped(spec) if spec in SHIPPED_LISTS else cls.from_file(Path(spec))

    @property
    def markers(self) -> list[str]:
        """Every phrase, anchored ones written ``^phrase`` as in the files."""
        return [*(f"^{p}" for p in self.anchored), *self.anywhere]

    def matches(self, response: str) -> list[str]:
        """The distinct markers found in ``response`` (anchored ones as ``^phrase``), in order
        of appearance; ``[EMPTY]`` for a response with no text."""
        text = normalize(strip_reasoning(response))
        if not text:
            return [EMPTY]
        found: list[str] = []
        if self._anchored_re is not None:
            head = self._anchored_re.match(text)
            if head:
                found.append(f"^{head.group(0)}")
        if self._anywhere_re is not None:
            for hit in self._anywhere_re.finditer(text):
                if hit.group(0) not in found:
                    found.append(hit.group(0))
        return found

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
        """The :class:`~abliterate.eval.judges.Judge` protocol: True where a marker matched."""
        if len(prompts) != len(responses):
            raise ValueError("one response per prompt is needed")
        return [bool(self.matches(r)) for r in responses]
