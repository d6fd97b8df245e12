"""The edit variants the edit tests run on, and small helpers they share.

Every variant is built for the conftest models (4 layers, d_model 64) from seeded random unit
directions, so two calls of :func:`build` give equal edits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.core.edits import Composite, Edit

N_LAYERS, D_MODEL = 4, 64  # the conftest models

# Hooks and baked weights run the same arithmetic in a different order (the weight is edited,
# or the output is); over the tiny models' 4 layers the float32 log-probs differ by at most
# about 2e-5 (a composite whose norm-preserving part got the wrong input scale: 0.1).
HOOKS_VS_WEIGHTS_ATOL = 1e-4


def unit(d_model: int, seed: int) -> Direction:
    """A seeded random unit direction."""
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(d_model, generator=g)).normalized()


def build(variant: str, strength: float = 1.0, n: int = N_LAYERS, d: int = D_MODEL) -> Edit:
    """The edit called ``variant``, with every strength multiplied by ``strength``."""
    s = strength
    main, other = unit(d, 1), unit(d, 4)
    per_layer = tuple(unit(d, 10 + i) for i in range(n))
    # Random unit vectors, not orthogonal to the main one (the edit builds each writer's
    # orthonormal basis itself).
    extra = (unit(d, 2), unit(d, 3))
    full = {"embedding": s, "attention": (s,) * n, "mlp": (s,) * n}
    # Uneven strengths: some writers untouched, some over-ablated (1.2); the old partial test's
    # values are kept as "partial".
    partial = {"embedding": 0.5 * s, "attention": (0.0, s, 0.3 * s, 0.0),
               "mlp": (s, 0.0, 0.7 * s, 0.2 * s)}  # fmt: skip
    uneven = {"embedding": 0.5 * s, "attention": tuple(s * x for x in (0.0, 1.2, 0.4, 0.9)),
              "mlp": tuple(s * x for x in (0.7, 0.0, 1.0, 0.3))}  # fmt: skip
    np = "norm_preserving"
    variants: dict[str, Callable[[], Edit]] = {
        "plain": lambda: Ablation(main, **full),
        "partial": lambda: Ablation(main, **partial),
        "per_layer": lambda: Ablation(main, **full, layer_directions=per_layer),
        "extra_directions": lambda: Ablation(main, **full, extra_directions=extra),
        "norm_preserving": lambda: Ablation(main, **full, mode=np),
        "norm_preserving_per_layer_partial": lambda: Ablation(
            main, **uneven, layer_directions=per_layer, mode=np
        ),
        "norm_preserving_per_layer_extra_partial": lambda: Ablation(
            main, **uneven, layer_directions=per_layer, mode=np, extra_directions=extra
        ),
        # Composites: norm preservation rescales the writer's input, first or second.
        "plain_then_norm_preserving": lambda: Ablation(main, **full).then(
            Ablation(other, **full, mode=np)
        ),
        "norm_preserving_then_plain": lambda: Ablation(main, **full, mode=np).then(
            Ablation(other, **full)
        ),
        "norm_preserving_then_norm_preserving_partial": lambda: Ablation(
            main, **full, mode=np
        ).then(Ablation(other, **uneven, layer_directions=per_layer, mode=np)),
        "partial_then_extra_then_norm_preserving": lambda: Ablation(main, **uneven)
        .then(Ablation(other, **full, extra_directions=extra))
        .then(Ablation(unit(d, 5), **uneven, mode=np)),
    }  # fmt: skip
    return variants[variant]()


VARIANTS = (
    "plain",
    "partial",
    "per_layer",
    "extra_directions",
    "norm_preserving",
    "norm_preserving_per_layer_partial",
    "norm_preserving_per_layer_extra_partial",
    "plain_then_norm_preserving",
    "norm_preserving_then_plain",
    "norm_preserving_then_norm_preserving_partial",
    "partial_then_extra_then_norm_preserving",
)
SINGLE = tuple(v for v in VARIANTS if "_then_" not in v)
COMPOSITES = tuple(v for v in VARIANTS if "_then_" in v)
# Plain-mode variants without strengths above 1: projecting twice removes nothing more.
PLAIN_MODE = ("plain", "partial", "per_layer", "extra_directions")


def removed_span(edit: Edit) -> list[torch.Tensor]:
    """Directions the whole residual stream is orthogonal to after ``edit`` ([] if none is).

    A full-strength edit with one direction set for every writer removes it from every write,
    hence from the stream; a composite's last part has the last word on every writer.
    """
    if isinstance(edit, Composite):
        return removed_span(edit.edits[-1])
    assert isinstance(edit, Ablation)
    strengths = (edit.embedding, *edit.attention, *edit.mlp)
    if edit.layer_directions is not None or any(s != 1.0 for s in strengths):
        return []
    return [edit.direction.vector, *(e.vector for e in edit.extra_directions)]


def encode(tokenizer: Any, texts: list[str]) -> Any:
    """Left-padded token ids of chat-formatted texts, as the tool tokenizes them."""
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def logprobs(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Log-probabilities at every position: (batch, pos, vocab)."""
    with torch.no_grad():
        return torch.log_softmax(model(**encode(tokenizer, texts)).logits, dim=-1)


def state(model: Any) -> dict[str, torch.Tensor]:
    """A copy of every tensor of the model's state."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: Any, expected: dict[str, torch.Tensor]) -> None:
    """Every tensor of the model's state is bit-identical to ``expected``'s."""
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k, v in got.items():
        assert torch.equal(v, expected[k]), k


def no_hooks_left(model: Any) -> bool:
    """No module of the model has a forward hook or pre-hook."""
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
