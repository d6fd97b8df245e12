"""Activation means of a model that does not fit in memory, measured layer by layer.

:func:`collect_activations_streamed` is :func:`~abliterate.measure.activations.collect_activations`
for a :class:`~abliterate.model.layerwise.LayerwiseModel`: the prompts go through the model one
decoder layer at a time (each layer's weights read once for all of them), and the same hooks
(:func:`~abliterate.measure.activations.capture_last_token`) add each layer's last-token
residuals at every site to float64 sums. Prompts are left-padded (the in-memory path reuses the
chat template's shared prefix instead), so the means agree with the in-memory ones to float
rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

from abliterate.data.chat import batches
from abliterate.measure.activations import capture_last_token
from abliterate.types import SITES, Site

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from abliterate.model.layerwise import LayerwiseModel


def collect_activations_streamed(
    model: LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    sites: Sequence[Site] = SITES,
    keep_site: Site | None = None,
    batch_size: int = 32,
    desc: str = "Collecting activations",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean last-token residuals, and optionally one site's per-prompt residuals, in one pass.

    Returns:
        ``(means, per_prompt)`` as :func:`~abliterate.measure.activations.collect_activations`
        returns them: means ``(n_layers, len(sites), d_model)`` float64; per_prompt
        ``(n_prompts, n_layers, d_model)`` float32 at ``keep_site``, or None.
    """
    arch = model.anatomy
    if keep_site is not None and keep_site not in sites:
        raise ValueError(f"keep_site {keep_site!r} is not among the collected sites {sites}")
    total = torch.zeros(arch.n_layers, len(sites), arch.d_model, dtype=torch.float64)
    pieces = list(batches(tokenizer, texts, batch_size))
    kept = [torch.zeros(len(idx), arch.n_layers, arch.d_model) for idx, _ in pieces]

    def per_batch(_layer: int, b: int) -> AbstractContextManager[None]:
        keep = None if keep_site is None else (keep_site, kept[b])
        return capture_last_token(arch, sites, total, keep)  # left padding: the last position

    model.run([enc for _, enc in pieces], per_batch=per_batch, logits=False, desc=desc)
    per_prompt = None
    if keep_site is not None:
        per_prompt = torch.zeros(len(texts), arch.n_layers, arch.d_model)
        for (idx, _), rows in zip(pieces, kept, strict=True):
            per_prompt[idx] = rows
    return total / len(texts), per_prompt
