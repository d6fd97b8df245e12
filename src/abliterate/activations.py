"""Residual-stream activations at the last prompt token, accumulated as float64 means.

For every layer and site ("pre" = block input, "mid" = between attention and MLP, "post" = block
output) the hidden state at the last position of every prompt is added to a float64 running sum,
batch by batch; no per-prompt activation is kept, so memory stays at
``n_layers × n_sites × d_model`` doubles whatever the number of prompts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from abliterate.architecture import Architecture
from abliterate.config import SITES, Site
from abliterate.profiling import progress
from abliterate.prompts import batches

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _hidden(value: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers 5) or a tuple led by it (older versions)."""
    return value[0] if isinstance(value, tuple) else value


@contextmanager
def capture_last_token(
    arch: Architecture, sites: Sequence[Site], sink: torch.Tensor
) -> Iterator[None]:
    """Add the last-token residual of each batch to ``sink[layer, site]`` while active.

    ``sink`` is ``(n_layers, len(sites), d_model)`` float64; hooks are removed on exit.
    """
    handles = []

    def add(layer: int, site_index: int, hidden: torch.Tensor) -> None:
        # hidden: (batch, pos, d_model); with left padding the last position is every prompt's
        # last token.
        sink[layer, site_index] += hidden[:, -1, :].detach().to("cpu", torch.float64).sum(0)

    try:
        for i, layer in enumerate(arch.layers):
            for s, site in enumerate(sites):
                if site == "pre":

                    def pre_hook(_m: Any, args: Any, kwargs: Any, i: int = i, s: int = s) -> None:
                        hidden = args[0] if args else kwargs["hidden_states"]
                        add(i, s, hidden)

                    handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
                elif site == "mid":

                    def mid_hook(_m: Any, args: Any, i: int = i, s: int = s) -> None:
                        add(i, s, args[0])

                    handles.append(arch.mid_modules[i].register_forward_pre_hook(mid_hook))
                else:

                    def post_hook(_m: Any, _a: Any, out: Any, i: int = i, s: int = s) -> None:
                        add(i, s, _hidden(out))

                    handles.append(layer.register_forward_hook(post_hook))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def mean_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    arch: Architecture,
    texts: Sequence[str],
    *,
    sites: Sequence[Site] = SITES,
    batch_size: int = 32,
    desc: str = "Collecting activations",
) -> torch.Tensor:
    """Mean last-token residual per layer and site over chat-formatted ``texts``.

    Returns:
        ``(n_layers, len(sites), d_model)`` float64 tensor on the CPU.
    """
    device = next(model.parameters()).device
    total = torch.zeros(arch.n_layers, len(sites), arch.d_model, dtype=torch.float64)
    n_batches = -(-len(texts) // batch_size)
    with capture_last_token(arch, sites, total):
        for _, enc in progress(batches(tokenizer, texts, batch_size), total=n_batches, desc=desc):
            # Only the hooks' side effect is needed: skip the vocabulary projection entirely.
            arch.body(**enc.to(device))
    return total / len(texts)
