"""Properties of one writer's ablation (:class:`ProjectionEdit`) on random matrices (hypothesis).

For a writer ``y = W x + b`` (``W``: ``(d_model, d_in)``) and an orthonormal basis ``B``:
strength 1 removes the span and is idempotent, strength 0 is the identity, ``s`` keeps ``1 - s``
of the span (plain mode), norm preservation keeps every column's norm, and the hook form
(``output`` of the rescaled input) equals the weight form (``columns`` and ``bias``). A writer
followed by a norm with gain ``g`` (``WriterInfo.norm_gain``) gets an edit after which the
normalised write ``g ⊙ y / rms(y)`` has no component along the removed directions.

The generated matrices are well conditioned for the edit: every column is zero or keeps at
least 1e-3 of its norm outside the span. A column (nearly) inside the span is reduced to
rounding noise, which norm preservation would scale back up to the column's norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from abliterate.core.ablation import Ablation, ProjectionEdit
from abliterate.core.directions import Direction
from abliterate.core.edits import WriterInfo
from abliterate.core.linalg import orthonormal_rows

LAWS = settings(max_examples=50, deadline=None)
ENTRY = st.floats(-4.0, 4.0, width=32, allow_subnormal=False)
STRENGTH = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 1.2]), st.floats(0.0, 1.5))
TOL = 1e-5  # relative to the size of what is compared


@dataclass
class Writer:
    """A random writer, its input, and an orthonormal basis to remove."""

    w: torch.Tensor  # (d_model, d_in)
    b: torch.Tensor  # (d_model,)
    x: torch.Tensor  # (n, d_in)
    basis: torch.Tensor  # (k, d_model) orthonormal rows
    raw: list[torch.Tensor]  # the vectors the basis was built from

    @property
    def direction(self) -> torch.Tensor:
        """The basis as ProjectionEdit takes it: a vector when k = 1."""
        return self.basis[0] if self.basis.shape[0] == 1 else self.basis

    def scale(self) -> float:
        """Size of the writer's numbers, for absolute tolerances."""
        return max(1.0, float(self.w.abs().max()), float(self.b.abs().max()))

    def amplification(self) -> float:
        """Largest |column| / |column outside the span|: how much norm preservation scales
        the rounding error of a projection back up (at most 1e3 here)."""
        outside = (self.w - self.basis.T @ (self.basis @ self.w)).norm(dim=0)
        norms = self.w.norm(dim=0)
        ratios = torch.where(norms > 0, norms / outside.clamp(min=1e-30), torch.ones_like(norms))
        return float(ratios.max())


def _array(draw: st.DrawFn, *shape: int) -> torch.Tensor:
    return torch.from_numpy(draw(arrays(np.float32, shape, elements=ENTRY)))


@st.composite
def writers(draw: st.DrawFn) -> Writer:
    d, d_in, n = draw(st.integers(2, 8)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    k = draw(st.integers(1, min(3, d - 1)))
    raw = [_array(draw, d) for _ in range(k)]
    assume(any(float(v.norm()) > 1e-2 for v in raw))
    basis = orthonormal_rows(raw)
    w = _array(draw, d, d_in)
    # Well conditioned: each column is zero or keeps 1e-3 of its norm outside the span.
    outside = (w - basis.T @ (basis @ w)).norm(dim=0)
    norms = w.norm(dim=0)
    assume(bool(((norms == 0) | (outside > 1e-3 * norms)).all()))
    return Writer(w, _array(draw, d), _array(draw, n, d_in), basis, raw)


def _edit(wr: Writer, strength: float, norm_preserving: bool, embedding: bool) -> ProjectionEdit:
    return ProjectionEdit(wr.direction, strength, norm_preserving, embedding)


def _close(a: torch.Tensor, b: torch.Tensor, scale: float) -> bool:
    return float((a - b).abs().max()) <= TOL * scale


@LAWS
@given(writers(), st.booleans(), st.booleans())
def test_full_strength_removes_the_span_and_is_idempotent(
    wr: Writer, norm_preserving: bool, embedding: bool
) -> None:
    e = _edit(wr, 1.0, norm_preserving, embedding)
    once = e.columns(wr.w, 0)
    assert once.dtype == torch.float32 and once.shape == wr.w.shape
    size = wr.scale() * wr.w.shape[0] * (wr.amplification() if norm_preserving else 1.0)
    assert _close(wr.basis @ once, torch.zeros(()), size)
    assert _close(e.columns(once, 0), once, size)
    assert _close(wr.basis @ e.bias(wr.b), torch.zeros(()), wr.scale())
    assert _close(e.bias(e.bias(wr.b)), e.bias(wr.b), wr.scale())


@LAWS
@given(writers(), st.booleans(), st.booleans())
def test_strength_zero_is_the_identity(wr: Writer, norm_preserving: bool, embedding: bool) -> None:
    e = _edit(wr, 0.0, norm_preserving, embedding)
    assert torch.equal(e.columns(wr.w, 0), wr.w)
    assert torch.equal(e.bias(wr.b), wr.b)
    y = wr.x @ wr.w.T + wr.b  # (n, d_model)
    assert torch.equal(e.output(y, wr.x), y)
    scale = e.input_scale(wr.w)
    if norm_preserving and not embedding:
        assert scale is not None and torch.equal(scale, torch.ones(wr.w.shape[1]))
    else:
        assert scale is None


@LAWS
@given(writers(), STRENGTH)
def test_plain_strength_keeps_one_minus_s_of_the_span(wr: Writer, s: float) -> None:
    e = _edit(wr, s, False, False)
    edited = e.columns(wr.w, 0)
    assert _close(wr.basis @ edited, (1 - s) * (wr.basis @ wr.w), wr.scale() * wr.w.shape[0])
    # Nothing outside the span changes.
    outside = torch.eye(wr.w.shape[0]) - wr.basis.T @ wr.basis
    assert _close(outside @ edited, outside @ wr.w, wr.scale() * wr.w.shape[0])


@LAWS
@given(writers(), STRENGTH, st.booleans())
def test_norm_preserving_keeps_every_column_norm(wr: Writer, s: float, embedding: bool) -> None:
    e = _edit(wr, s, True, embedding)
    edited = e.columns(wr.w, 0)
    norms = wr.w.norm(dim=0)
    assert torch.allclose(edited.norm(dim=0), norms, rtol=1e-5, atol=1e-6)
    # It is the plain edit with each column rescaled by a positive factor (the input scale of
    # a linear writer's hook).
    plain = _edit(wr, s, False, False).columns(wr.w, 0)
    plain_norms = plain.norm(dim=0)
    factor = torch.where(plain_norms > 0, norms / plain_norms.clamp(min=1e-30), 1.0)
    assert _close(edited, plain * factor, wr.scale() * wr.amplification())
    if not embedding:
        scale = e.input_scale(wr.w)
        assert scale is not None and torch.allclose(scale, factor, rtol=1e-5)


@LAWS
@given(writers(), STRENGTH, st.booleans())
def test_hook_output_equals_the_edited_weights_output(
    wr: Writer, s: float, norm_preserving: bool
) -> None:
    """``output(W (r ⊙ x) + b)`` equals ``columns(W) x + bias(b)``, with ``r`` the input scale."""
    e = _edit(wr, s, norm_preserving, False)
    r = e.input_scale(wr.w)
    x_seen = wr.x if r is None else wr.x * r  # what the module sees after the pre-hook
    hooked = e.output(x_seen @ wr.w.T + wr.b, wr.x)  # (n, d_model)
    weights = wr.x @ e.columns(wr.w, 0).T + e.bias(wr.b)
    size = (
        wr.scale()
        * (1 + float(wr.x.abs().max()))
        * wr.w.shape[1]
        * (1 if r is None else float(r.max()))
    )
    assert _close(hooked, weights, size)


@LAWS
@given(writers(), STRENGTH, st.booleans(), st.data())
def test_embedding_output_equals_the_edited_rows(
    wr: Writer, s: float, norm_preserving: bool, data: st.DataObject
) -> None:
    """An embedding's outputs are its write vectors: the hook edits looked-up rows exactly as
    the weight edit edits the table (canonical columns)."""
    e = _edit(wr, s, norm_preserving, True)
    ids = torch.tensor(
        data.draw(st.lists(st.integers(0, wr.w.shape[1] - 1), min_size=1, max_size=5))
    )
    rows = wr.w.T[ids]  # (tokens, d_model), what the embedding module returns
    assert _close(e.output(rows, ids), e.columns(wr.w, 0).T[ids], wr.scale())


@LAWS
@given(writers(), STRENGTH, st.booleans(), st.booleans(), st.data())
def test_columns_edited_in_chunks_equal_the_whole(
    wr: Writer, s: float, norm_preserving: bool, embedding: bool, data: st.DataObject
) -> None:
    """Every write vector is edited on its own (how a large embedding is edited in chunks)."""
    e = _edit(wr, s, norm_preserving, embedding)
    cut = data.draw(st.integers(0, wr.w.shape[1]))
    chunks = torch.cat([e.columns(wr.w[:, :cut], 0), e.columns(wr.w[:, cut:], cut)], dim=1)
    assert _close(chunks, e.columns(wr.w, 0), wr.scale())


# --- post-norm writers -----------------------------------------------------------------------

GAIN = st.one_of(st.floats(0.25, 4.0, width=32), st.floats(-4.0, -0.25, width=32))


def _post_norm(y: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """What a Gemma-2-style post-norm adds to the stream: ``g ⊙ y / rms(y)``."""
    return gain * y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)


@LAWS
@given(writers(), st.booleans(), st.data())
def test_post_norm_writes_have_no_component_along_the_removed_directions(
    wr: Writer, norm_preserving: bool, data: st.DataObject
) -> None:
    d = wr.w.shape[0]
    gain = torch.from_numpy(data.draw(arrays(np.float32, (d,), elements=GAIN)))
    main, *extra = (Direction(v) for v in wr.raw if float(v.norm()) > 0)
    ablation = Ablation(main.normalized(), 1.0, (1.0,), (1.0,),
                        mode="norm_preserving" if norm_preserving else "plain",
                        extra_directions=tuple(extra))  # fmt: skip
    e = ablation.writer_edit(WriterInfo("w", "attention", 0, norm_gain=gain))
    assert isinstance(e, ProjectionEdit)
    removed = ablation.basis(0)  # (k, d_model): the directions the stream must not hold
    gained = orthonormal_rows([gain * v for v in removed])  # what the writer's output loses
    r = e.input_scale(wr.w)
    x_seen = wr.x if r is None else wr.x * r
    y = wr.x @ wr.w.T + wr.b
    hooked = e.output(x_seen @ wr.w.T + wr.b, wr.x)  # (n, d_model)
    weights = wr.x @ e.columns(wr.w, 0).T + e.bias(wr.b)
    # Well conditioned: the output keeps some of itself outside g ⊙ span (else the post-norm
    # scales rounding noise up to unit RMS, edit or no edit).
    assume(bool((hooked.norm(dim=-1) > 1e-3 * y.norm(dim=-1)).all()))
    assume(bool((weights.norm(dim=-1) > 1e-3 * y.norm(dim=-1)).all()))
    seen = float((x_seen @ wr.w.T + wr.b).norm(dim=-1).max()) + 1.0
    for out in (hooked, weights):
        # The writer's output has nothing along g ⊙ span …
        assert float((out @ gained.T).abs().max()) <= 1e-5 * seen * wr.w.shape[1]
        # … so the normalised write has nothing along the span: relative to its own norm, up
        # to the rounding error of the output, scaled by how much of the output is left.
        write = _post_norm(out, gain)  # (n, d_model)
        along = (write @ removed.T).abs().amax(-1)  # (n,)
        bound = 1e-5 * wr.w.shape[1] * write.norm(dim=-1) * seen / out.norm(dim=-1)
        assert bool((along <= bound).all()), (along, bound)


def test_the_gain_matters_and_a_uniform_gain_changes_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 5, generator=g), torch.randn(4, 5, generator=g)
    gain = torch.rand(8, generator=g) * 2 + 0.5
    v = Direction(torch.randn(8, generator=g)).normalized()
    ablation = Ablation(v, 1.0, (1.0,), (1.0,))
    with_gain = ablation.writer_edit(WriterInfo("w", "mlp", 0, norm_gain=gain))
    without = ablation.writer_edit(WriterInfo("w", "mlp", 0))
    assert with_gain is not None and without is not None
    y = x @ w.T
    assert float((_post_norm(with_gain.output(y, x), gain) @ v.vector).abs().max()) < 1e-5
    # Removing v itself from y leaves g ⊙ (y - v vᵀy) / rms, which does point along v.
    assert float((_post_norm(without.output(y, x), gain) @ v.vector).abs().max()) > 1e-2
    uniform = ablation.writer_edit(WriterInfo("w", "mlp", 0, norm_gain=torch.full((8,), 3.0)))
    assert isinstance(uniform, ProjectionEdit)
    assert torch.allclose(uniform.basis.flatten().abs(), v.vector.abs(), atol=1e-6)


def test_projection_edit_needs_a_nonzero_gain_direction() -> None:
    v = Direction(torch.tensor([1.0, 0.0, 0.0]))
    ablation = Ablation(v, 1.0, (1.0,), (1.0,))
    with pytest.raises(ValueError, match="no nonzero direction"):
        ablation.writer_edit(WriterInfo("w", "mlp", 0, norm_gain=torch.tensor([0.0, 1.0, 1.0])))


def test_norm_preserving_leaves_a_column_inside_the_span_removed() -> None:
    # A column (numerically) inside the removed span keeps only rounding noise, which must not
    # be scaled back up to the column's norm.
    basis = torch.tensor([1.0, 0.0, 0.0])
    w = torch.tensor([[3.0, 1.0], [1e-9, 1.0], [0.0, 1.0]])  # (d_model, d_in); column 0 ≈ basis
    edited = ProjectionEdit(basis, 1.0, True, False).columns(w, 0)
    assert float(edited[:, 0].norm()) < 1e-6
    assert torch.allclose(edited[:, 1].norm(), w[:, 1].norm())
