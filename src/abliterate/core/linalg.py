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

from typing import Literal

import torch

EditMode = Literal["plain", "norm_preserving"]


def orthonormal_rows(vectors: list[torch.Tensor], tol: float = 1e-6) -> torch.Tensor:
    """Gram-Schmidt (twice, in float64) of ``vectors``, in order: ``(k, d_model)`` float32.

    The first row is the first vector normalised; a vector whose remainder is below ``tol``
    times its norm (already in the span) is dropped.
    """
    rows: list[torch.Tensor] = []
    for v in vectors:
        w = v.detach().to("cpu", torch.float64).flatten()
        norm = float(w.norm())
        for _ in range(2):  # re-orthogonalising once makes classical Gram-Schmidt stable
            for r in rows:
                w = w - (w @ r) * r
        if norm > 0 and float(w.norm()) > tol * norm:
            rows.append(w / w.norm())
    if not rows:
        raise ValueError("no nonzero direction to build a basis from")
    return torch.stack(rows).float()


def as_basis(direction: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(d_model,)`` direction or ``(k, d_model)`` orthonormal basis as float32 rows."""
    b = direction.to(like.device, torch.float32)
    return b.unsqueeze(0) if b.ndim == 1 else b


def remove_span(xf: torch.Tensor, basis: torch.Tensor, strength: float) -> torch.Tensor:
    """``x - s (x Bᵀ) B`` for float32 ``x`` (..., d_model) and orthonormal rows ``B``."""
    if basis.shape[0] == 1:  # the common case, without a (…, 1) matrix product
        d = basis[0]
        return xf - strength * (xf @ d).unsqueeze(-1) * d
    return xf - strength * (xf @ basis.T) @ basis


def project_out(x: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """``x - strength (x · d) d`` along the last axis (float32 math, result in x's dtype).

    ``direction`` is a unit vector, or ``(k, d_model)`` orthonormal rows whose span is removed.
    """
    return remove_span(x.float(), as_basis(direction, x), strength).to(x.dtype)


def edit_write_vectors(
    rows: torch.Tensor, direction: torch.Tensor, strength: float, mode: EditMode
) -> torch.Tensor:
    """Remove ``strength`` times the ``direction`` component from each row, in float32.

    ``rows`` is ``(n, d_model)``, one residual write vector per row; ``direction`` is a unit
    vector or ``(k, d_model)`` orthonormal rows. In ``norm_preserving`` mode every edited row
    is rescaled to its original norm (a row that the edit reduces to zero stays zero).
    """
    rf = rows.float()
    edited = remove_span(rf, as_basis(direction, rows), strength)
    if mode == "norm_preserving":
        edited = edited * norm_scales(rf, edited).unsqueeze(-1)
    return edited


def norm_scales(rows: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Per row, ``|row| / |edited row|`` (1 where the edit left nothing to rescale)."""
    old, new = rows.norm(dim=-1), edited.norm(dim=-1)
    return torch.where(new > 0, old / new.clamp(min=1e-30), torch.ones_like(new))
