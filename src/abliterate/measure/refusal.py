"""The tokens a refusal starts with, under a given tokenizer.

The cheap refusal measurements (:func:`abliterate.core.stats.refusal_scores`, the search's
refusal probability) read the next-token probability mass of the first tokens of common refusal
openings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
