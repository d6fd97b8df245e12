"""Edits of the residual stream: the :class:`EditSpec`, reversible hooks and weight edits.

An :class:`EditSpec` says which direction to remove from which residual writers, at which
strength per layer, and how. Two things read it and must agree:

* :func:`ablation_hooks` — a context manager that projects the direction out of the output of
  every selected writer (embedding, attention output, MLP output) and removes its hooks on exit;
* :func:`orthogonalize_` — the permanent, in-place edit of the same writers' weights, so the
  exported model needs no hooks.

For a writer ``y = W x + b`` and unit direction ``d``, removing ``s`` times the projection gives
``y - s d dᵀ y = (W - s d dᵀ W) x + (b - s d dᵀ b)``, so hooks and weights are equal in exact
arithmetic, and with ``s = 1`` every residual write (hence the whole stream) is orthogonal to
``d``. Strength 0 leaves a writer untouched.

Two refinements are part of the spec:

* *per-layer directions*: the writers of layer ``i`` remove ``layer_directions[i]`` instead of
  the one global direction (the embedding always uses the global one);
* *extra directions*: a few more directions removed together with the main one (from every
  writer the spec touches, at the same strength). Each writer then removes the orthogonal
  projection onto the span ``B`` of its direction and the extras: ``y - s B Bᵀ y``, with ``B``
  an orthonormal basis (so one direction is the case ``B = d``);
* *norm-preserving* mode: each residual write vector (a column of a Linear writer's weight, a
  row of the embedding) is projected and then rescaled to its original norm, so the edit only
  rotates what a writer can write instead of also shrinking it. This is no longer a projection
  of the writer's *output* alone: the edited weight is ``(W - s d dᵀW) diag(r)`` with ``r`` the
  per-column rescaling, so its hooks scale the writer's input by ``r`` and project its output.
  Biases are only projected (a bias is one constant offset, not a family of write
  vectors whose relative sizes matter).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from abliterate.core.edits import EditSpec
from abliterate.core.linalg import (
    EditMode,
    as_basis,
    edit_write_vectors,
    norm_scales,
    project_out,
    remove_span,
)
from abliterate.model.anatomy import Architecture, resolve_architecture


def _check(spec: EditSpec, arch: Architecture) -> None:
    if spec.n_layers != arch.n_layers:
        raise ValueError(
            f"the edit spec covers {spec.n_layers} layers but the model has {arch.n_layers}"
        )
    directions = [spec.direction, *(spec.layer_directions or ()), *spec.extra_directions]
    for direction in directions:
        if direction.d_model != arch.d_model:
            raise ValueError(
                f"the direction has d_model={direction.d_model} but the model has {arch.d_model}"
            )


def _writers(spec: EditSpec, arch: Architecture) -> Iterator[tuple[nn.Module, float, torch.Tensor]]:
    """Every (writer module, strength, basis) the spec touches, skipping strength 0.

    The basis is the unit direction (``(d_model,)``) for a one-direction spec, else the
    ``(k, d_model)`` orthonormal rows of :meth:`EditSpec.basis`.
    """

    def basis(layer: int | None) -> torch.Tensor:
        if not spec.extra_directions:
            return (spec.direction if layer is None else spec.direction_of(layer)).vector
        return spec.basis(layer)

    if spec.embedding != 0.0:
        yield arch.embedding, spec.embedding, basis(None)
    for i in range(arch.n_layers):
        if spec.attention[i] == 0.0 and spec.mlp[i] == 0.0:
            continue
        b = basis(i)
        if spec.attention[i] != 0.0:
            yield arch.attn_out[i], spec.attention[i], b
        if spec.mlp[i] != 0.0:
            yield arch.mlp_out[i], spec.mlp[i], b


@torch.no_grad()
def _column_scales(linear: nn.Linear, d: torch.Tensor, strength: float) -> torch.Tensor:
    """``(d_in,)`` norm-preserving rescaling of each write vector (weight column)."""
    columns = linear.weight.detach().T.float()  # (d_in, d_model)
    return norm_scales(columns, remove_span(columns, as_basis(d, columns), strength))


def _edited_linear(
    linear: nn.Linear, d: torch.Tensor, strength: float, mode: EditMode
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The edited weight and bias of a residual writer, in the writer's dtype.

    weight: ``(d_model, d_in)``; its columns are the write vectors, hence the transposes.
    """
    w = linear.weight.detach()
    weight = edit_write_vectors(w.T, d, strength, mode).T.to(w.dtype)
    bias = None
    if linear.bias is not None:
        b = linear.bias.detach()
        bias = edit_write_vectors(b.unsqueeze(0), d, strength, "plain")[0].to(b.dtype)
    return weight.contiguous(), bias


@contextmanager
def ablation_hooks(model: nn.Module, spec: EditSpec) -> Iterator[None]:
    """Temporarily remove ``spec.direction`` from the selected residual writers' outputs.

    The hooks are removed when the block exits, also on error, so the model is unchanged after.
    """
    arch = resolve_architecture(model)
    _check(spec, arch)
    handles = []

    def projecting_hook(vector: torch.Tensor, strength: float) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            return project_out(output, vector, strength)  # (batch, pos, d_model)

        return hook

    def rescaling_hook(vector: torch.Tensor, strength: float) -> Any:
        # An embedding's outputs are rows of its weight, so editing the output rows is the
        # weight edit itself.
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            flat = output.reshape(-1, output.shape[-1])  # (batch * pos, d_model)
            edited = edit_write_vectors(flat, vector, strength, spec.mode)
            return edited.to(output.dtype).view(output.shape)

        return hook

    def input_scaling_hook(scales: torch.Tensor) -> Any:
        def hook(_module: nn.Module, inputs: Any) -> Any:
            return (inputs[0] * scales.to(inputs[0].dtype), *inputs[1:])  # (batch, pos, d_in)

        return hook

    try:
        for module, strength, vector in _writers(spec, arch):
            if spec.mode == "norm_preserving" and isinstance(module, nn.Embedding):
                handles.append(module.register_forward_hook(rescaling_hook(vector, strength)))
                continue
            if spec.mode == "norm_preserving":
                # The norm-preserving weight is (W - s d dᵀW) diag(r), with r the per-column
                # rescaling, so its output is the projection of W (r ⊙ x) (bias included, which
                # is only projected): scale the input, then project the output as in plain mode.
                # No weight copy and no second matrix product.
                handles.append(
                    module.register_forward_pre_hook(
                        input_scaling_hook(_column_scales(module, vector, strength))  # type: ignore[arg-type]
                    )
                )
            handles.append(module.register_forward_hook(projecting_hook(vector, strength)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def maybe_hooks(model: nn.Module, spec: EditSpec | None) -> Iterator[None]:
    """:func:`ablation_hooks` when a spec is given, else nothing (the unedited model)."""
    if spec is None:
        yield
        return
    with ablation_hooks(model, spec):
        yield
