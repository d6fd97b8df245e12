"""Invariants of edits on tiny random models of every supported family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.weights import bake


def unit(d_model: int, seed: int) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(d_model, generator=g)).normalized()


@pytest.mark.parametrize("np_first", [False, True])
def test_composite_hooks_equal_weights_with_norm_preservation_in_either_position(
    np_first: bool, family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    """Regression: a norm-preserving edit after a plain one rescaled the writer's input by the
    scales of the unedited weight (hooks and weights differed by 0.1 in log-probability)."""
    model = make_model(family)
    plain = Ablation.uniform(unit(64, 1), 4)
    np = Ablation(unit(64, 4), 1.0, (1.0,) * 4, (1.0,) * 4, mode="norm_preserving")
    edit = np.then(plain) if np_first else plain.then(np)
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with edit_hooks(model, edit), torch.no_grad():
        hooked = torch.log_softmax(model(**enc).logits, -1)
    bake(model, edit)
    with torch.no_grad():
        baked = torch.log_softmax(model(**enc).logits, -1)
    assert float((hooked - baked).abs().max()) < 1e-4
