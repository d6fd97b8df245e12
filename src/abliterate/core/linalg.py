"""The linear algebra of directional edits: orthonormal bases, projections, norm preservation.

Everything here works on plain tensors along their last axis (``(..., d_model)``) in float32,
whatever the input dtype, and returns the input's dtype where it says so. The edit types in
:mod:`abliterate.core.edits` are built from these functions, so hooks and weight edits run the
same arithmetic.
"""

from __future__ import annotations

import torch


def orthonormal_rows(vectors: list[torch.Tensor], tol: float = 1e-6) -> torch.Tensor:
    """Gram-Schmidt (twice, in float64) of ``vectors``, in order: ``(k, d_model)`` float32.

    The first row is the first vector normalised; a vector whose remainder is below ``tol``
    times its norm (already in the span) is dropped.

    Raises:
        ValueError: every vector is zero.
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
    """A ``(d_model,)`` direction or ``(k, d_model)`` orthonormal basis as float32 rows on
    ``like``'s device."""
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


def norm_scales(rows: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Per row, ``|row| / |edited row|``; 1 where the edit left (almost) nothing to rescale.

    A row lying (numerically) inside the removed span keeps only rounding noise; scaling that
    noise back up to the row's full norm would write a random vector, so such rows (edited norm
    below 1e-6 of the original) are left as the projection made them.
    """
    old, new = rows.norm(dim=-1), edited.norm(dim=-1)
    keep = new > 1e-6 * old
    return torch.where(keep, old / new.clamp(min=1e-30), torch.ones_like(new))


def edit_write_vectors(
    rows: torch.Tensor, direction: torch.Tensor, strength: float, norm_preserving: bool
) -> torch.Tensor:
    """Remove ``strength`` times the ``direction`` component from each row, in float32.

    ``rows`` is ``(n, d_model)``, one residual write vector per row; ``direction`` is a unit
    vector or ``(k, d_model)`` orthonormal rows. With ``norm_preserving`` every edited row is
    rescaled to its original norm (a row that the edit reduces to zero stays zero).
    """
    rf = rows.float()
    edited = remove_span(rf, as_basis(direction, rows), strength)
    if norm_preserving:
        edited = edited * norm_scales(rf, edited).unsqueeze(-1)
    return edited
