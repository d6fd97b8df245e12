"""Behaviour directions: the difference of mean activations between any two prompt sets.

The refusal direction is the mean residual on harmful prompts minus the mean on harmless ones;
the same difference between any two sets that differ in one behaviour gives that behaviour's
direction (terse minus verbose answers, formal minus casual, refusing minus complying). Per
layer, at one residual site:

* sets of bare prompts are read at each prompt's last token (where the model is about to
  answer), as :func:`~abliterate.measure.activations.collect_activations` does;
* sets whose prompts come with responses are read over the response tokens, averaged per
  pair and then over the set (:func:`~abliterate.measure.responses.response_means`), which
  captures how the model represents *giving* such an answer.

The result is a :class:`~abliterate.core.directions.DirectionSet` of raw mean differences (row
``L`` = positive mean − negative mean at layer ``L``; ``scales`` holds their norms), so
``steer --strength 1`` at one layer moves that layer's residual from one set's mean to the
other's. Layers where the two means coincide carry no direction and are left out, and so is
site ``pre`` of layer 0: it is the token embedding's output (for bare prompts the same template
token everywhere), where no steering can add (:mod:`abliterate.core.steering`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from abliterate.core.directions import DirectionSet
from abliterate.measure.activations import collect_activations
from abliterate.measure.responses import response_means
from abliterate.types import Site

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from abliterate.data.chat import ChatSet


def _set_mean(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    chats: ChatSet,
    site: Site,
    batch_size: int,
    label: str,
) -> torch.Tensor:
    """``(n_layers, d_model)`` float64 mean activation of one set at ``site``."""
    responses = chats.prompts.responses
    if responses is None:
        means, _ = collect_activations(
            model, tokenizer, chats.texts, sites=(site,), batch_size=batch_size,
            desc=f"Activations ({label})",
        )  # fmt: skip
        return means[:, 0]
    per_pair = response_means(
        model, tokenizer, chats.texts, responses, sites=(site,), batch_size=batch_size,
        desc=f"Response activations ({label})",
    )  # fmt: skip
    return per_pair[:, :, 0].double().mean(0)


def behaviour_directions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    positive: ChatSet,
    negative: ChatSet,
    *,
    site: Site = "post",
    batch_size: int = 16,
    model_name: str = "",
    revision: str | None = None,
) -> DirectionSet:
    """Per-layer ``mean(positive) − mean(negative)`` at ``site`` (see the module docstring).

    Raises:
        ValueError: one set has responses and the other does not (their activations would be
            read at different places), or the means coincide at every layer.
    """
    if (positive.prompts.responses is None) != (negative.prompts.responses is None):
        raise ValueError(
            "both prompt sets must have responses, or neither: activations are read at the "
            f"response tokens of a set with responses ({positive.prompts.name} vs "
            f"{negative.prompts.name})"
        )
    pos = _set_mean(model, tokenizer, positive, site, batch_size, "positive")
    neg = _set_mean(model, tokenizer, negative, site, batch_size, "negative")
    diff = pos - neg  # (n_layers, d_model) float64
    norms = diff.norm(dim=-1)
    scale = pos.norm(dim=-1) + neg.norm(dim=-1)
    first = 1 if site == "pre" else 0
    keep = [
        i
        for i in range(first, diff.shape[0])
        if float(norms[i]) > 1e-9 * max(float(scale[i]), 1e-30)
    ]
    if not keep:
        raise ValueError("the two prompt sets have the same mean activation at every layer")
    return DirectionSet(
        vectors=diff[keep].float(),
        layers=tuple(keep),
        site=site,
        scales=tuple(float(norms[i]) for i in keep),
        model=model_name,
        revision=revision,
        dataset_hashes={
            f"positive:{positive.prompts.name}": positive.prompts.sha256,
            f"negative:{negative.prompts.name}": negative.prompts.sha256,
        },
        description=f"{positive.prompts.name} minus {negative.prompts.name}",
    )
