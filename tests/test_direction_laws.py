"""Laws of direction arithmetic and files, for any generated input (hypothesis).

:class:`Direction` and :class:`DirectionSet` are value types: ``+`` is commutative and (up to
float32 rounding) associative, ``a - a`` is zero, negation is an involution, scaling by ``s``
and dividing by ``s`` gives ``a`` back, ``normalized()`` has unit norm, a save/load round trip
is bit-exact whatever the values and the provenance, and every mismatch raises.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from abliterate.core.directions import Direction, DirectionSet

LAWS = settings(max_examples=50, deadline=None)
EPS = torch.finfo(torch.float32).eps  # 2 ** -23: twice float32's unit roundoff

# Coordinates: zero or of magnitude 2^-13 … 2^10, so products and quotients by the scales below
# stay normal floats (no underflow to subnormals, no overflow).
COORD = st.one_of(
    st.just(0.0),
    st.floats(2.0**-13, 2.0**10, width=32),
    st.floats(-(2.0**10), -(2.0**-13), width=32),
)
SCALAR = st.one_of(st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3))
TEXT = st.text(max_size=12)
SITE = st.sampled_from([None, "pre", "mid", "post"])


def _tensor(values: list[float] | list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@st.composite
def provenance(draw: st.DrawFn) -> dict[str, Any]:
    """Everything a Direction carries besides its vector."""
    return {
        "layer": draw(st.none() | st.integers(0, 200) | st.floats(0, 200, allow_nan=False)),
        "site": draw(SITE),
        "scale": draw(st.floats(allow_nan=False, allow_infinity=False)),
        "model": draw(TEXT),
        "revision": draw(st.none() | TEXT),
        "dataset_hashes": draw(st.dictionaries(TEXT, TEXT, max_size=3)),
        "projected": draw(st.booleans()),
    }


@st.composite
def directions(draw: st.DrawFn, count: int) -> list[Direction]:
    """``count`` directions of one width and one provenance."""
    d = draw(st.integers(1, 8))
    meta = draw(provenance())
    vector = st.lists(COORD, min_size=d, max_size=d)
    return [Direction(_tensor(draw(vector)), **meta) for _ in range(count)]


@st.composite
def direction_sets(draw: st.DrawFn, count: int) -> list[DirectionSet]:
    """``count`` sets of the same layers, width and provenance (rows: 1 to 4, width 1 to 6)."""
    n, d = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    layers = tuple(sorted(draw(st.lists(st.integers(0, 80), min_size=n, max_size=n, unique=True))))
    finite = st.floats(allow_nan=False, allow_infinity=False)
    meta = {
        "layers": layers,
        "site": draw(SITE),
        "scales": tuple(draw(st.lists(finite, min_size=n, max_size=n))),
        "model": draw(TEXT),
        "revision": draw(st.none() | TEXT),
        "dataset_hashes": draw(st.dictionaries(TEXT, TEXT, max_size=3)),
        "description": draw(TEXT),
    }
    rows = st.lists(st.lists(COORD, min_size=d, max_size=d), min_size=n, max_size=n)
    return [DirectionSet(_tensor(draw(rows)), **meta) for _ in range(count)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns (so -0.0 and 0.0 differ)."""
    return t.contiguous().view(torch.int32)


# --- Direction -------------------------------------------------------------------------------


@LAWS
@given(directions(3))
def test_direction_addition_is_commutative_and_associative(ds: list[Direction]) -> None:
    a, b, c = ds
    assert a + b == b + a  # float addition is commutative, bit for bit
    left, right = ((a + b) + c).vector, (a + (b + c)).vector
    # Each side rounds twice, by at most half an EPS of what it sums.
    # Each grouping rounds twice, by at most u = EPS/2 of its partial sums, so the two differ
    # by at most 4u = 2 EPS times the sum of magnitudes.
    bound = 2 * EPS * (a.vector.abs() + b.vector.abs() + c.vector.abs())
    assert bool(((left - right).abs() <= bound).all())
    assert torch.equal((a - b).vector, (a + -b).vector)


@LAWS
@given(directions(1), SCALAR)
def test_direction_negation_difference_and_scaling(ds: list[Direction], s: float) -> None:
    (a,) = ds
    negated = -a
    assert -negated == a
    assert (negated == a) == (not a.vector.any())  # only zero is its own negative
    assert torch.equal(_bits((-negated).vector), _bits(a.vector))
    assert not (a - a).vector.any()  # exactly zero
    assert a * s == s * a
    back = ((a * s) / s).vector  # two roundings, each within half an EPS
    assert bool(((back - a.vector).abs() <= EPS * a.vector.abs()).all())
    assert (a * s).metadata() == a.metadata()  # scaling keeps the provenance


@LAWS
@given(directions(1))
def test_normalized_has_unit_norm_and_the_same_direction(ds: list[Direction]) -> None:
    (a,) = ds
    norm = float(a.vector.double().norm())
    if norm == 0.0:
        with pytest.raises(ValueError, match="zero"):
            a.normalized()
        return
    n = a.normalized()
    assert abs(float(n.vector.double().norm()) - 1.0) < 1e-6
    assert torch.allclose(n.vector.double() * norm, a.vector.double(), rtol=1e-6, atol=1e-9)
    assert n.metadata() == a.metadata()
    assert torch.allclose(n.normalized().vector, n.vector, rtol=1e-6, atol=1e-9)


@LAWS
@given(directions(1))
def test_direction_save_load_is_bit_exact(ds: list[Direction]) -> None:
    (a,) = ds
    # A zero vector is a value but no direction: loading one from a file is refused
    # (test_bad_inputs.py).
    assume(float(a.vector.norm()) > 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = a.save(Path(tmp) / "sub" / "d")
        assert path == Path(tmp) / "sub" / "d.safetensors"
        for name in ("d", "d.safetensors", "d.json"):  # either file, or the common stem
            loaded = Direction.load(Path(tmp) / "sub" / name)
            assert loaded == a
            assert torch.equal(_bits(loaded.vector), _bits(a.vector))
            assert loaded.metadata() == a.metadata()


@LAWS
@given(directions(1), directions(1), SCALAR)
def test_direction_mismatches_raise(ds: list[Direction], others: list[Direction], s: float) -> None:
    (a,), (b,) = ds, others
    if a.d_model != b.d_model:
        with pytest.raises(ValueError, match="d_model mismatch"):
            a + b
    elif a.model and b.model and a.model != b.model:
        with pytest.raises(ValueError, match="different models"):
            a - b
    elif a.site is not None and b.site is not None and a.site != b.site:
        with pytest.raises(ValueError, match="site mismatch"):
            a + b
    else:
        assert torch.equal((a + b).vector, a.vector + b.vector)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="cannot scale"):
            a * bad
    with pytest.raises(ZeroDivisionError):
        a / 0.0
    with pytest.raises(TypeError):
        a * "2"  # type: ignore[operator]
    assert torch.equal((a / s).vector, a.vector / s)


# --- DirectionSet ----------------------------------------------------------------------------


@LAWS
@given(direction_sets(3), SCALAR)
def test_direction_set_arithmetic_laws(sets: list[DirectionSet], s: float) -> None:
    a, b, c = sets
    assert a + b == b + a
    left, right = ((a + b) + c).vectors, (a + (b + c)).vectors
    # Each grouping rounds twice, by at most u = EPS/2 of its partial sums, so the two differ
    # by at most 4u = 2 EPS times the sum of magnitudes.
    bound = 2 * EPS * (a.vectors.abs() + b.vectors.abs() + c.vectors.abs())
    assert bool(((left - right).abs() <= bound).all())
    negated = -a
    assert -negated == a
    assert not (a - a).vectors.any()
    assert a * s == s * a
    back = ((a * s) / s).vectors
    assert bool(((back - a.vectors).abs() <= EPS * a.vectors.abs()).all())
    # Row by row: each row is the Direction of its layer, and the rows stack back into the set.
    for i, layer in enumerate(a.layers):
        row = a[layer]
        assert torch.equal(row.vector, a.vectors[i]) and row.scale == a.scales[i]
        assert (row.layer, row.site, row.model) == (layer, a.site, a.model)
        assert torch.equal((a + b)[layer].vector, (row + b[layer]).vector)
    stacked = DirectionSet.from_directions([a[x] for x in reversed(a.layers)], a.description)
    assert stacked == a
    with pytest.raises(KeyError, match="not in this set"):
        a[max(a.layers) + 1]


@LAWS
@given(direction_sets(1))
def test_direction_set_normalized_rows_are_unit(sets: list[DirectionSet]) -> None:
    (a,) = sets
    norms = a.vectors.double().norm(dim=-1)
    if bool((norms == 0).any()):
        with pytest.raises(ValueError, match="zero"):
            a.normalized()
        return
    n = a.normalized()
    assert torch.allclose(n.vectors.double().norm(dim=-1), torch.ones(len(a), dtype=torch.float64))
    assert torch.allclose(n.vectors.double() * norms[:, None], a.vectors.double(), rtol=1e-6)
    assert n.metadata() == a.metadata()


@LAWS
@given(direction_sets(1))
def test_direction_set_save_load_is_bit_exact(sets: list[DirectionSet]) -> None:
    (a,) = sets
    with tempfile.TemporaryDirectory() as tmp:
        path = a.save(Path(tmp) / "set")
        assert path == Path(tmp) / "set.safetensors"
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["set.safetensors"]  # one file
        loaded = DirectionSet.load(path)
        assert loaded == a
        assert torch.equal(_bits(loaded.vectors), _bits(a.vectors))
        assert loaded.metadata() == a.metadata()


@LAWS
@given(direction_sets(1), direction_sets(1))
def test_direction_set_mismatches_raise(
    sets: list[DirectionSet], others: list[DirectionSet]
) -> None:
    (a,), (b,) = sets, others
    if a.layers != b.layers:
        message = "layer mismatch"
    elif a.d_model != b.d_model:
        message = "d_model mismatch"
    elif a.site and b.site and a.site != b.site:
        message = "site mismatch"
    elif a.model and b.model and a.model != b.model:
        message = "different models"
    else:
        assert torch.equal((a - b).vectors, a.vectors - b.vectors)
        assert (a + b).dataset_hashes == {**a.dataset_hashes, **b.dataset_hashes}
        return
    with pytest.raises(ValueError, match=message):
        a + b
    with pytest.raises(ValueError, match=message):
        b - a


def test_direction_set_rejects_malformed_values(tmp_path: Path) -> None:
    rows = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"\(layers, d_model\)"):
        DirectionSet(torch.ones(3), layers=(0,))
    with pytest.raises(ValueError, match="2 vectors for 3 layers"):
        DirectionSet(rows, layers=(0, 1, 2))
    for layers in ((1, 1), (2, 1), (-1, 0)):
        with pytest.raises(ValueError, match="distinct, non-negative and increasing"):
            DirectionSet(rows, layers=layers)
    with pytest.raises(ValueError, match="1 scales for 2 layers"):
        DirectionSet(rows, layers=(0, 1), scales=(1.0,))
    with pytest.raises(ValueError, match="finite"):
        DirectionSet(torch.tensor([[1.0, float("nan"), 0.0]]), layers=(0,))
    big = DirectionSet(torch.full((1, 3), 1e30), layers=(0,))
    with pytest.raises(ValueError, match="finite"):
        big * 1e30  # overflows to inf
    with pytest.raises(ValueError, match="integer layer"):
        DirectionSet.from_directions([Direction(torch.ones(3), layer=1.5)])
    with pytest.raises(ValueError, match="no directions"):
        DirectionSet.from_directions([])
    # A safetensors file that is not a direction set, or of an unknown format version.
    from safetensors.torch import save_file

    save_file({"vectors": rows}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a direction set"):
        DirectionSet.load(tmp_path / "plain.safetensors")
    save_file({"vectors": rows}, str(tmp_path / "future.safetensors"),
              metadata={"abliterate": '{"format": "abliterate.direction_set/99"}'})  # fmt: skip
    with pytest.raises(ValueError, match="unknown format"):
        DirectionSet.load(tmp_path / "future.safetensors")


def test_a_sum_of_directions_has_symmetric_provenance_and_finite_values() -> None:
    a = Direction(torch.tensor([1.0, 0.0, 2.0]), layer=3, site="pre", scale=5.0, model="m",
                  dataset_hashes={"harmful": "aa"}, projected=True)  # fmt: skip
    b = Direction(torch.tensor([0.5, 1.0, 0.0]), layer=4, site="pre", scale=7.0, model="m",
                  dataset_hashes={"harmless": "bb"})  # fmt: skip
    assert a + b == b + a
    total = a + b
    assert total.scale == 1.0 and total.layer is None and total.site is None
    assert total.dataset_hashes == {"harmful": "aa", "harmless": "bb"} and not total.projected
    with pytest.raises(ValueError, match="site mismatch"):
        _ = a + Direction(torch.ones(3), site="post", model="m")
    with pytest.raises(ValueError, match="finite"):
        Direction(torch.tensor([1.0, float("nan"), 0.0]))
