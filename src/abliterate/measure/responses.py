"""Residual activations averaged over the tokens of a given response.

For a chat-formatted prompt followed by a response (:mod:`abliterate.data.pairs`), the residual
state at each layer and site is averaged over the response's token positions only: the prompt,
the padding and anything after the response are left out (the batch is right-padded and the
attention mask covers the real tokens, so padding never influences a real position). One mean
per pair is returned, so a caller can average over a set (behaviour directions) or compare two
responses of one prompt (DINM's toxic-layer location).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from abliterate.data.pairs import pair_batches
from abliterate.measure.activations import site_hooks
from abliterate.model.anatomy import anatomy_of
from abliterate.model.forward import model_device
from abliterate.progress import progress
from abliterate.types import Site

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.inference_mode()
def response_means(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_texts: Sequence[str],
    responses: Sequence[str],
    *,
    sites: Sequence[Site] = ("post",),
    batch_size: int = 16,
    desc: str = "Response activations",
) -> torch.Tensor:
    """Each pair's residual states averaged over its response tokens.

    Args:
        prompt_texts: Chat-formatted prompts (ready for the answer).
        responses: The answer following each prompt.

    Returns:
        ``(n_pairs, n_layers, len(sites), d_model)`` float32 on the CPU, in input order.
    """
    arch = anatomy_of(model)
    device = model_device(model)
    out = torch.zeros(len(responses), arch.n_layers, len(sites), arch.d_model)
    n_batches = -(-len(responses) // batch_size)
    batches = pair_batches(tokenizer, prompt_texts, responses, batch_size)
    for idx, batch in progress(batches, total=n_batches, desc=desc):
        weights = batch.response_mask.float()  # (batch, pos)
        weights = (weights / weights.sum(1, keepdim=True)).to(device)
        rows = torch.tensor(idx)

        def mean(layer: int, site: int, hidden: torch.Tensor, weights: torch.Tensor = weights,
                 rows: torch.Tensor = rows) -> None:  # fmt: skip
            # hidden: (batch, pos, d_model) -> (batch, d_model), the mean over response tokens
            span = torch.einsum("bp,bpd->bd", weights.to(hidden.dtype), hidden)
            out[rows, layer, site] = span.float().cpu()

        with site_hooks(arch, sites, mean):
            arch.body(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
            )
    return out
