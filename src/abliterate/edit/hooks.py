"""Reversible edits: an :class:`~abliterate.core.edits.Edit` as hooks on a live model.

:func:`edit_hooks` is a context manager: on entry it installs, on every residual writer the
edit changes, a forward pre-hook (the input rescaling of norm-preserving edits, and the input
each writer edit sees) and a forward hook (the output transforms, in order); on exit, also on
error, it removes them, so the model is unchanged afterwards.

Experts stacked in one fused tensor share one module. When every expert of the tensor gets the
same plain projection (the usual ablation), one hook on the experts module's output applies
it: the module returns the routed sum ``Σ_e r_e (W_e a_e + b_e)``, and a projection commutes
with that sum, so projecting the sum equals projecting every expert. Other edits of fused
experts (norm-preserving ones rescale each expert's inputs differently) have each expert's
edited weight (and bias) swapped in for the duration of the block and restored after: exact,
at the cost of a copy of the edited experts.

On a model spread over devices or quantized (:mod:`abliterate.model.devices`) the hooks run on
each writer's own device (every tensor an edit adds is moved to the output's device), and the
weight that norm-preserving edits rescale inputs by is read onloaded and dequantized
(:func:`~abliterate.model.devices.dense_weight`). A fused expert tensor that is offloaded or
quantized cannot be swapped in place and is refused.

Composition follows :mod:`abliterate.core.edits`: with writer edits ``e_1 … e_n`` and input
scales ``D_k``, the module sees ``D_1 ⋯ D_n x`` and ``e_k`` receives ``D_{k+1} ⋯ D_n x``, which
makes the hooks equal the weights edited by ``e_1`` then ``e_2`` … for every affine writer edit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from abliterate.core.ablation import ProjectionEdit
from abliterate.core.edits import Edit, WriterEdit
from abliterate.edit.weights import _rewrite
from abliterate.errors import UnsupportedArchitectureError
from abliterate.model.anatomy import BoundAnatomy, BoundWriter, anatomy_of
from abliterate.model.devices import dense_weight, in_place


class _WriterHooks:
    """The pre-hook and hook of one writer for a list of writer edits."""

    def __init__(self, edits: list[WriterEdit], weight: torch.Tensor, embedding: bool) -> None:
        self.edits = edits
        self.embedding = embedding
        self.scales: list[torch.Tensor | None] = [None] * len(edits)
        if not embedding:
            w = weight
            for k, e in enumerate(edits):
                self.scales[k] = e.input_scale(w)
                # Later scales are computed from the weight as edited so far: every edit
                # changes the column norms that a later norm-preserving edit restores, not
                # only the edits that rescale inputs themselves.
                if k + 1 < len(edits):
                    w = e.columns(w, 0)
        self.inputs: list[torch.Tensor | None] = [None] * len(edits)

    @property
    def needs_pre(self) -> bool:
        if self.embedding:
            return False
        rescales = any(s is not None for s in self.scales)
        return rescales or any(e.uses_input for e in self.edits)

    def pre(self, _module: Any, inputs: Any) -> Any:
        x = inputs[0]  # (batch, pos, d_in)
        # Edit k sees the input rescaled by the edits after it (module docstring).
        for k in range(len(self.edits) - 1, -1, -1):
            self.inputs[k] = x
            scale = self.scales[k]
            if scale is not None:
                x = x * scale.to(x.device, x.dtype)
        return (x, *inputs[1:])

    def post(self, _module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        y = output  # (batch, pos, d_model)
        for k, e in enumerate(self.edits):
            x = inputs[0] if self.embedding else self.inputs[k]
            y = e.output(y, x)
        self.inputs = [None] * len(self.edits)
        return y


@contextmanager
def _swapped(writer: BoundWriter, edits: list[WriterEdit]) -> Iterator[None]:
    """The writer's edited weight (and bias) in place of the original for the duration of
    the block."""
    if not in_place(writer):
        raise UnsupportedArchitectureError(
            f"{writer.writer.name} is a fused expert tensor that is offloaded or quantized; "
            "hooks swap such a tensor in place, so it must be in memory unquantized (raise "
            "--max-memory or drop --load-in)."
        )
    weight = writer.weight()
    original = weight.detach().clone()
    bias = _bias(writer)
    original_bias = None if bias is None else bias.detach().clone()
    try:
        _rewrite(weight, edits, None)
        if bias is not None:
            new = bias
            for e in edits:
                new = e.bias(new)
            with torch.no_grad():
                bias.copy_(new.to(bias.dtype))
        yield
    finally:
        with torch.no_grad():
            weight.copy_(original)
            if bias is not None and original_bias is not None:
                bias.copy_(original_bias)


def _bias(writer: BoundWriter) -> torch.Tensor | None:
    """The writer's bias (its expert's row of a fused bias), when it has one."""
    w = writer.writer
    if w.bias is None:
        return None
    name = w.bias.rsplit(".", 1)[-1]
    param = getattr(writer.module, name, None)
    if not isinstance(param, torch.Tensor):
        return None  # a Linear built with bias=False
    return param.data if w.expert is None else param.data[w.expert]


def _same_projections(a: list[WriterEdit], b: list[WriterEdit]) -> bool:
    """Whether ``a`` and ``b`` are the same plain projections (output-only, linear)."""
    return len(a) == len(b) and all(
        isinstance(x, ProjectionEdit)
        and isinstance(y, ProjectionEdit)
        and not (x.norm_preserving or y.norm_preserving or x.embedding or y.embedding)
        and x.strength == y.strength
        and torch.equal(x.basis, y.basis)
        for x, y in zip(a, b, strict=True)
    )


def _fused_hooks(stack: ExitStack, group: list[tuple[BoundWriter, list[WriterEdit]]]) -> None:
    """Edit the experts of one fused tensor: one output hook when exact, else swaps."""
    first, edits = group[0]
    n_experts = first.parameter().shape[0]
    if len(group) == n_experts and all(_same_projections(edits, e) for _, e in group[1:]):
        hooks = _WriterHooks(edits, first.weight(), embedding=False)
        stack.callback(first.module.register_forward_hook(hooks.post).remove)
        return
    for writer, writer_edits in group:
        stack.enter_context(_swapped(writer, writer_edits))


@contextmanager
def edit_hooks(
    model: torch.nn.Module, edit: Edit, anatomy: BoundAnatomy | None = None
) -> Iterator[None]:
    """Temporarily apply ``edit`` to ``model`` with hooks (see the module docstring).

    Raises:
        ValueError: the edit does not fit the model's shape.
    """
    bound = anatomy or anatomy_of(model)
    edit.check(bound.d_model, bound.n_layers)
    with ExitStack() as stack:
        fused: dict[str, list[tuple[BoundWriter, list[WriterEdit]]]] = {}
        for writer in bound.writers:
            edits = edit.writer_edits(bound.writer_info(writer))
            if not edits:
                continue
            if writer.writer.expert is not None:
                fused.setdefault(writer.writer.tensor, []).append((writer, edits))
                continue
            embedding = writer.writer.role == "embedding"
            # The embedding's edit never reads its weight (its outputs are its write vectors).
            weight = writer.weight() if embedding else dense_weight(writer)
            hooks = _WriterHooks(edits, weight, embedding)
            if hooks.needs_pre:
                stack.callback(writer.module.register_forward_pre_hook(hooks.pre).remove)
            stack.callback(writer.module.register_forward_hook(hooks.post).remove)
        for group in fused.values():
            _fused_hooks(stack, group)
        yield
