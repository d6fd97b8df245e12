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

import torch
from torch import nn

from abliterate.core.edits import EditSpec
from abliterate.core.linalg import EditMode, as_basis, edit_write_vectors, project_out
from abliterate.edit.hooks import _check, _edited_linear, _writers
from abliterate.model.anatomy import Architecture, resolve_architecture


def _untie_lm_head(model: nn.Module, arch: Architecture) -> None:
    """Give the output head its own copy of the weights before the embedding is edited."""
    if arch.lm_head.weight is arch.embedding.weight:
        arch.lm_head.weight = nn.Parameter(arch.embedding.weight.detach().clone())
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
        if text_config is not None:
            text_config.tie_word_embeddings = False


@torch.no_grad()
def _orthogonalize_linear(
    linear: nn.Linear, d: torch.Tensor, strength: float, mode: EditMode
) -> None:
    if mode == "plain":
        # weight: (d_model, d_in); the writer's output is W x + b, so project W's columns.
        w = linear.weight.data
        wf = w.float()
        basis = as_basis(d, wf)  # (k, d_model)
        wf -= strength * basis.T @ (basis @ wf)
        w.copy_(wf.to(w.dtype))
        if linear.bias is not None:
            linear.bias.data.copy_(project_out(linear.bias.data, d, strength))
        return
    # The very function the norm-preserving hook uses, so hooks and weights cannot drift.
    weight, bias = _edited_linear(linear, d, strength, mode)
    linear.weight.data.copy_(weight)
    if bias is not None:
        linear.bias.data.copy_(bias)


@torch.no_grad()
def _orthogonalize_embedding(
    emb: nn.Embedding, d: torch.Tensor, strength: float, mode: EditMode
) -> None:
    # weight: (vocab, d_model); each row is a residual write. Chunked so that a large vocabulary
    # never needs a full float32 copy at once.
    w = emb.weight.data
    for start in range(0, w.shape[0], 16384):
        rows = w[start : start + 16384]
        rows.copy_(edit_write_vectors(rows, d, strength, mode).to(rows.dtype))


def orthogonalize_(model: nn.Module, spec: EditSpec) -> None:
    """Permanently apply ``spec`` to the model's weights, in place.

    The result equals running the unedited model under :func:`ablation_hooks` with the same spec.
    When the embedding is edited and tied to the output head, the head is untied first (and
    ``tie_word_embeddings`` set to False) so the output projection keeps its original weights.
    """
    arch = resolve_architecture(model)
    _check(spec, arch)
    if spec.embedding != 0.0:
        _untie_lm_head(model, arch)
    for module, strength, vector in _writers(spec, arch):
        if isinstance(module, nn.Embedding):
            _orthogonalize_embedding(module, vector, strength, spec.mode)
        else:
            _orthogonalize_linear(module, vector, strength, spec.mode)  # type: ignore[arg-type]
