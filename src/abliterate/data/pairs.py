"""Prompt + response pairs as right-padded token batches with a mask of the response tokens.

Directions read at the answer (``abliterate direction`` on sets with responses), DINM's toxic
layer location and its losses all need a chat-formatted prompt followed by a given answer, and
to know which positions hold the answer. :func:`encode_pairs` tokenizes the prompt text and the
answer separately and concatenates them (the answer's tokens are then the same whatever the
template's last characters, as in :func:`abliterate.eval.metrics.reference_cross_entropy`), pads
on the right (so every position keeps its natural index) and marks the answer's positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class PairBatch:
    """Prompt + response token ids of a batch.

    Attributes:
        input_ids: ``(batch, pos)`` right-padded token ids.
        attention_mask: ``(batch, pos)`` 1 on real tokens, 0 on padding.
        response_mask: ``(batch, pos)`` bool, True on the response's tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> PairBatch:
        """The same batch on ``device``."""
        return PairBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device)
        )

    def targets(self) -> torch.Tensor:
        """``(batch, pos)`` the next token at every position that predicts a response token,
        -100 elsewhere (``cross_entropy``'s ignore index): position ``t`` predicts ``t + 1``."""
        out = torch.full_like(self.input_ids, -100)
        out[:, :-1] = torch.where(self.response_mask[:, 1:], self.input_ids[:, 1:], -100)
        return out


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, prompt_texts: Sequence[str], responses: Sequence[str]
) -> PairBatch:
    """One right-padded batch of chat-formatted prompts each followed by its response.

    Raises:
        ValueError: the lengths differ, or a response has no tokens.
    """
    if len(prompt_texts) != len(responses) or not responses:
        raise ValueError("one response per prompt, and at least one pair, are needed")
    rows = []
    for prompt, response in zip(prompt_texts, responses, strict=True):
        p_ids = list(tokenizer(prompt, add_special_tokens=False).input_ids)
        r_ids = list(tokenizer(response, add_special_tokens=False).input_ids)
        if not r_ids:
            raise ValueError(f"the response to {prompt[-60:]!r} has no tokens")
        rows.append((p_ids, r_ids))
    width = max(len(p) + len(r) for p, r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros_like(ids)
    in_response = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
        in_response[i, len(p) : len(p) + len(r)] = True
    return PairBatch(ids, mask, in_response)


def pair_batches(
    tokenizer: PreTrainedTokenizerBase,
    prompt_texts: Sequence[str],
    responses: Sequence[str],
    batch_size: int,
) -> Iterator[tuple[list[int], PairBatch]]:
    """:func:`encode_pairs` in batches of similar length: ``(indices, batch)``, where
    ``indices`` are the pairs' positions in the inputs."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_texts, responses, strict=True)]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield (
            idx,
            encode_pairs(tokenizer, [prompt_texts[i] for i in idx], [responses[i] for i in idx]),
        )
