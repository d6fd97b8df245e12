"""The tokens a refusal starts with, under a given tokenizer.

The cheap refusal measurements (:func:`abliterate.core.stats.refusal_scores`, the search's
next-token refusal probability) read the next-token probability mass of the first tokens of
common refusal openings; the sharper one reads whole openings that the model itself refuses
with (:class:`RefusalOpenings`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Openings of refusals across common chat models; only their first tokens are used.
REFUSAL_OPENINGS = (
    "I'm sorry",
    "I am sorry",
    "I apologize",
    "I cannot",
    "I can't",
    "Sorry",
    "As an AI",
    "Unfortunately",
    "I'm unable",
    "I must",
)


def refusal_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the first tokens of :data:`REFUSAL_OPENINGS` under this tokenizer."""
    ids = set()
    for opening in REFUSAL_OPENINGS:
        tokens = tokenizer(opening, add_special_tokens=False).input_ids
        if tokens:
            ids.add(int(tokens[0]))
    return sorted(ids)


@dataclass(frozen=True)
class RefusalOpenings:
    """The token sequences a model's own refusals open with, all of one length.

    Built from the model's answers to harmful prompts and a judge's verdicts on them
    (:meth:`from_answers`): the most frequent openings of the refused answers. Scoring an edit
    then asks how likely the edited model still opens its answer with one of them
    (:mod:`abliterate.search.scoring`): a question about several tokens, which tells "I can't"
    from "I can", where the next-token probability of "I" cannot.

    Attributes:
        tokens: The openings, most frequent first (empty: the model refused nothing).
        counts: How many refused answers opened with each.
        n_refused: Refused answers long enough to have an opening.
    """

    tokens: tuple[tuple[int, ...], ...] = ()
    counts: tuple[int, ...] = ()
    n_refused: int = 0

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.counts):
            raise ValueError("one count per opening")
        if len({len(t) for t in self.tokens}) > 1:
            # Openings of one length are disjoint events, so their probabilities add up.
            raise ValueError("refusal openings must all have the same length")

    @classmethod
    def from_answers(
        cls, answers: Sequence[Sequence[int]], refused: Sequence[bool], length: int, top: int
    ) -> RefusalOpenings:
        """The ``top`` most frequent first ``length`` tokens of the refused ``answers`` (token
        ids of each answer, as generated); answers shorter than ``length`` are skipped."""
        if len(answers) != len(refused):
            raise ValueError("one verdict per answer")
        counts = Counter(
            tuple(int(t) for t in a[:length])
            for a, r in zip(answers, refused, strict=True)
            if r and len(a) >= length
        )
        # most_common keeps first-seen order among equal counts: reproducible.
        best = counts.most_common(top)
        return cls(
            tokens=tuple(t for t, _ in best),
            counts=tuple(c for _, c in best),
            n_refused=sum(counts.values()),
        )

    @property
    def coverage(self) -> float:
        """Fraction of the refused answers that open with one of :attr:`tokens`."""
        return sum(self.counts) / self.n_refused if self.n_refused else 0.0

    def to_dict(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """JSON-ready, with each opening's text."""
        return {
            "openings": [
                {"text": tokenizer.decode(list(t)), "tokens": list(t), "count": c}
                for t, c in zip(self.tokens, self.counts, strict=True)
            ],
            "n_refused": self.n_refused,
            "coverage": self.coverage,
        }
