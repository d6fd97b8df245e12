"""Residual-stream activations at the last prompt token, accumulated as float64 means.

For every layer and site ("pre" = block input, "mid" = between attention and MLP, "post" = block
output) the hidden state at the last position of every prompt is added to a float64 running sum,
batch by batch; no per-prompt activation is kept, so memory stays at
``n_layers × n_sites × d_model`` doubles whatever the number of prompts. On request
(:func:`collect_activations` with ``keep_site``) the per-prompt activations of one site are kept
too, as float32 (``n_prompts × n_layers × d_model``: 11 MB for 128 prompts of a 0.5B model), for
directions beyond the mean difference
(:meth:`abliterate.measure.candidates.Candidates.extra_directions`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import torch

from abliterate.model.anatomy import BoundAnatomy, anatomy_of
from abliterate.model.forward import SharedPrefixScorer
from abliterate.progress import progress
from abliterate.types import SITES, Site

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _hidden(value: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers 5) or a tuple led by it (older versions)."""
    return value[0] if isinstance(value, tuple) else value


@contextmanager
def site_hooks(
    arch: BoundAnatomy, sites: Sequence[Site], on_hidden: Callable[[int, int, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``on_hidden(layer, site_index, hidden)`` with every residual state ``(batch, pos,
    d_model)`` at ``sites`` of every layer while active; the hooks are removed on exit."""
    handles = []
    try:
        for i, layer in enumerate(arch.layers):
            for s, site in enumerate(sites):
                if site == "pre":

                    def pre_hook(_m: Any, args: Any, kwargs: Any, i: int = i, s: int = s) -> None:
                        on_hidden(i, s, args[0] if args else kwargs["hidden_states"])

                    handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
                elif site == "mid":

                    def mid_hook(_m: Any, args: Any, i: int = i, s: int = s) -> None:
                        on_hidden(i, s, args[0])

                    mid = arch.mid_modules[i]
                    if mid is None:
                        raise ValueError(f"'{arch.anatomy.family}' layers have no 'mid' site")
                    handles.append(mid.register_forward_pre_hook(mid_hook))
                else:

                    def post_hook(_m: Any, _a: Any, out: Any, i: int = i, s: int = s) -> None:
                        on_hidden(i, s, _hidden(out))

                    handles.append(layer.register_forward_hook(post_hook))
        yield
    finally:
        for h in handles:
            h.remove()


def capture_last_token(
    arch: BoundAnatomy,
    sites: Sequence[Site],
    sink: torch.Tensor,
    keep: tuple[Site, torch.Tensor] | None = None,
    positions: torch.Tensor | None = None,
) -> AbstractContextManager[None]:
    """Add the last-token residual of each batch to ``sink[layer, site]`` while active.

    ``sink`` is ``(n_layers, len(sites), d_model)`` float64; hooks are removed on exit. The
    last token is the last position (left padding), or ``positions[row]`` of each row (right
    padding). With ``keep = (site, rows)``, the batch's last-token residuals at that site are
    also written into ``rows[:, layer]`` (``rows``: ``(batch, n_layers, d_model)``, one batch).
    """
    keep_index = sites.index(keep[0]) if keep is not None else -1

    def add(layer: int, site_index: int, hidden: torch.Tensor) -> None:
        # hidden: (batch, pos, d_model)
        if positions is None:
            last = hidden[:, -1, :]
        else:
            last = hidden[torch.arange(hidden.shape[0]), positions.to(hidden.device)]
        last = last.detach().to("cpu", torch.float64)
        sink[layer, site_index] += last.sum(0)
        if keep is not None and site_index == keep_index:
            keep[1][:, layer] = last

    return site_hooks(arch, sites, add)


@torch.inference_mode()
def collect_activations(
    model: PreTrainedModel,
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
        ``(means, per_prompt)``: means ``(n_layers, len(sites), d_model)`` float64 on the CPU;
        per_prompt ``(n_prompts, n_layers, d_model)`` float32 at ``keep_site``, or None.
    """

    arch = anatomy_of(model)
    if keep_site is not None and keep_site not in sites:
        raise ValueError(f"keep_site {keep_site!r} is not among the collected sites {sites}")
    total = torch.zeros(arch.n_layers, len(sites), arch.d_model, dtype=torch.float64)
    per_prompt = None
    if keep_site is not None:
        per_prompt = torch.zeros(len(texts), arch.n_layers, arch.d_model, dtype=torch.float32)
    # The chat template's shared opening runs once per batch (see abliterate.model.forward);
    # the hooks are active for the prompts' own suffixes only, so the prefix pass adds nothing.
    scorer = SharedPrefixScorer(model, tokenizer, texts, batch_size)
    n_batches = -(-len(texts) // batch_size)
    for idx, batch, lengths in progress(scorer.batches(), total=n_batches, desc=desc):
        keep: tuple[Site, torch.Tensor] | None = None
        if keep_site is not None:
            keep = (keep_site, torch.zeros(len(idx), arch.n_layers, arch.d_model))

        def hooks(
            keep: tuple[Site, torch.Tensor] | None = keep, positions: torch.Tensor = lengths - 1
        ) -> AbstractContextManager[None]:
            return capture_last_token(arch, sites, total, keep, positions)

        scorer.forward(batch, around_suffix=hooks)
        if per_prompt is not None and keep is not None:
            per_prompt[idx] = keep[1]  # back in text order
    return total / len(texts), per_prompt


def mean_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
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
    means, _ = collect_activations(
        model, tokenizer, texts, sites=sites, batch_size=batch_size, desc=desc
    )
    return means
