"""Direction value type, candidate directions (plain, projected, interpolated, extra) and
activation collection."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from abliterate.core.directions import Direction, DirectionSet
from abliterate.measure.activations import mean_activations
from abliterate.measure.candidates import Candidates
from abliterate.model.anatomy import anatomy_of


def test_direction_save_load_is_exact(tmp_path: Path) -> None:
    d = Direction(
        torch.randn(17, dtype=torch.float32),
        layer=3,
        site="mid",
        scale=2.5,
        model="org/model",
        revision="abc",
        dataset_hashes={"harmful": "h1", "harmless": "h2"},
    )
    d.save(tmp_path / "dir")
    loaded = Direction.load(tmp_path / "dir.safetensors")
    assert loaded == d
    assert torch.equal(loaded.vector, d.vector)
    assert loaded.metadata() == d.metadata()


def test_direction_arithmetic() -> None:
    a = Direction(torch.tensor([3.0, 4.0]), layer=1, site="pre")
    b = Direction(torch.tensor([1.0, 0.0]), layer=2, site="pre")
    assert torch.equal((a + b).vector, torch.tensor([4.0, 4.0]))
    assert torch.equal((a - b).vector, torch.tensor([2.0, 4.0]))
    assert torch.equal((2 * a).vector, torch.tensor([6.0, 8.0]))
    assert torch.equal((a / 2).vector, torch.tensor([1.5, 2.0]))
    assert torch.equal((-a).vector, torch.tensor([-3.0, -4.0]))
    assert torch.equal(a.normalized().vector, torch.tensor([0.6, 0.8]))  # |(3, 4)| = 5 exactly
    assert float(a.normalized().vector.norm()) == pytest.approx(1.0)
    # A sum of two layers' directions belongs to neither; scaling keeps the provenance.
    assert ((a + b).layer, (a + b).site) == (None, None)
    assert ((2 * a).layer, (2 * a).site, (-a).layer, a.normalized().layer) == (1, "pre", 1, 1)
    # Equality is by value: the same vector and provenance, and nothing else.
    assert a == Direction(torch.tensor([3.0, 4.0]), layer=1, site="pre")
    assert a != b
    assert a != Direction(torch.tensor([3.0, 4.0]), layer=2, site="pre")  # other provenance
    assert a != Direction(torch.tensor([3.0, 4.5]), layer=1, site="pre")  # other vector
    assert a.__eq__(a.vector) is NotImplemented  # not a Direction at all
    # (1 - t) (0.6, 0.8) + t (1, 0) at t = 0.5 is (0.8, 0.4), normalised (2, 1) / sqrt(5).
    mid = Direction.interpolate(a.normalized(), b, 0.5)
    assert mid.layer == 1.5
    assert torch.allclose(mid.vector, torch.tensor([2.0, 1.0]) / 5**0.5, atol=1e-7)
    assert float(mid.vector.norm()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="zero"):
        Direction(torch.zeros(3)).normalized()
    with pytest.raises(ValueError, match="1-D"):
        Direction(torch.zeros(2, 3))


def test_directions_are_added_to_directions_and_scaled_by_numbers_only() -> None:
    """Regression: ``d + 1.0`` added 1 to every coordinate and ``d * e`` multiplied two
    directions coordinate-wise (and ``d / e`` divided by their zero coordinates)."""
    a = Direction(torch.tensor([3.0, 4.0]))
    b = Direction(torch.tensor([1.0, 0.0]))
    sa = DirectionSet(torch.tensor([[3.0, 4.0]]), layers=(0,))
    sb = DirectionSet(torch.tensor([[1.0, 0.0]]), layers=(0,))
    for x, y, what in ((a, b, "a direction"), (sa, sb, "a direction set")):
        for number in (1.0, 2, True):
            with pytest.raises(TypeError, match=f"{what} can be added to or subtracted from"):
                x + number  # type: ignore[operator]
            with pytest.raises(TypeError, match=f"{what} can be added to or subtracted from"):
                x - number  # type: ignore[operator]
        with pytest.raises(TypeError, match="with a number"):
            x * y  # type: ignore[operator]
        with pytest.raises(TypeError, match="with a number"):
            x / y  # type: ignore[operator]
        with pytest.raises(TypeError):
            1.0 + x  # type: ignore[operator]
    assert torch.equal((a + b).vector, torch.tensor([4.0, 4.0]))
    assert torch.equal((sa - sb).vectors, torch.tensor([[2.0, 4.0]]))


def test_candidates_direction_and_round_trip(tmp_path: Path) -> None:
    harmful = torch.randn(4, 3, 8, dtype=torch.float64)
    harmless = torch.randn(4, 3, 8, dtype=torch.float64)
    c = Candidates(harmful, harmless, model="m", dataset_hashes={"a": "b"})
    d = c.direction(2, "mid")
    expected = harmful[2, 1] - harmless[2, 1]
    assert torch.allclose(d.vector.double(), expected / expected.norm(), atol=1e-7)
    assert d.scale == pytest.approx(float(expected.norm()))
    assert (d.layer, d.site, d.model) == (2, "mid", "m")
    c.save(tmp_path / "c.safetensors")
    back = Candidates.load(tmp_path / "c.safetensors")
    assert torch.equal(back.harmful_mean, harmful) and torch.equal(back.harmless_mean, harmless)
    assert back.direction(2, "mid") == d
    with pytest.raises(ValueError, match="out of range"):
        c.direction(4, "pre")


def test_mean_activations_match_unpadded_hidden_states(
    family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    """Batched, left-padded collection equals a prompt-by-prompt reference."""
    model = make_model(family)
    arch = anatomy_of(model)
    means = mean_activations(model, tokenizer, texts, batch_size=4)
    assert means.shape == (arch.n_layers, 3, arch.d_model) and means.dtype == torch.float64
    ref = torch.zeros(arch.n_layers + 1, arch.d_model, dtype=torch.float64)
    for t in texts:
        enc = tokenizer([t], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        for i in range(arch.n_layers):
            ref[i] += hs[i][0, -1].double()
    ref /= len(texts)
    # "pre" of layer i is the input of block i.
    assert torch.allclose(means[:, 0], ref[: arch.n_layers], atol=1e-4)
    # "post" of layer i is "pre" of layer i + 1.
    assert torch.allclose(means[:-1, 2], means[1:, 0], atol=1e-5)


def test_identical_means_are_degenerate_not_nan() -> None:
    same = torch.randn(2, 3, 8, dtype=torch.float64)
    other = same.clone()
    other[1] += 1.0
    c = Candidates(other, same)
    assert c.is_degenerate(0, "pre") and not c.is_degenerate(1, "pre")
    with pytest.raises(ValueError, match="identical"):
        c.direction(0, "pre")


def test_candidates_extra_directions(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    n_layers, d = 3, 16
    harmless = torch.randn(n_layers, 3, d, dtype=torch.float64, generator=g)
    # Harmful prompts: the harmless mean, a shared shift, and spread mostly along two axes.
    shift = torch.zeros(d, dtype=torch.float64)
    shift[0] = 5.0
    spread = torch.randn(40, 2, dtype=torch.float64, generator=g) * torch.tensor([3.0, 1.0])
    acts = harmless[:, 1].unsqueeze(0) + shift + torch.zeros(40, n_layers, d, dtype=torch.float64)
    acts[:, :, 1] += spread[:, :1]
    acts[:, :, 2] += spread[:, 1:]
    acts += 0.01 * torch.randn(acts.shape, dtype=torch.float64, generator=g)
    c = Candidates(acts.mean(0).unsqueeze(1).expand(-1, 3, -1).clone(), harmless,
                   harmful_acts=acts.float(), acts_site="mid")  # fmt: skip
    main = c.direction(1, "mid")
    assert abs(float(main.vector[0])) > 0.99
    extra = c.extra_directions(main, 1, "mid", 2)
    assert len(extra) == 2
    basis = torch.stack([main.vector, *(e.vector for e in extra)])
    assert torch.allclose(basis @ basis.T, torch.eye(3), atol=1e-5)  # orthonormal to main
    assert abs(float(extra[0].vector[1])) > 0.99  # the strongest spread first
    assert abs(float(extra[1].vector[2])) > 0.99
    assert extra[0].scale > extra[1].scale > 0
    assert c.extra_directions(main, 1, "mid", 0) == ()
    with pytest.raises(ValueError, match="per-prompt"):
        c.extra_directions(main, 1, "pre", 1)
    with pytest.raises(ValueError, match="per-prompt"):
        Candidates(c.harmful_mean, harmless).extra_directions(main, 1, "mid", 1)
    # The kept activations survive a save/load round trip.
    c.save(tmp_path / "c.safetensors")
    back = Candidates.load(tmp_path / "c.safetensors")
    assert back.acts_site == "mid" and back.harmful_acts is not None
    assert torch.equal(back.harmful_acts, c.harmful_acts)
    assert back.extra_directions(main, 1, "mid", 2) == extra


def test_projected_and_interpolated_directions() -> None:
    g = torch.Generator().manual_seed(0)
    harmful = torch.randn(4, 3, 16, dtype=torch.float64, generator=g)
    harmless = torch.randn(4, 3, 16, dtype=torch.float64, generator=g)
    c = Candidates(harmful, harmless)
    plain = c.direction(2, "mid")
    projected = c.direction(2, "mid", projected=True)
    mean = harmless[2, 1] / harmless[2, 1].norm()
    assert abs(float(projected.vector.double() @ mean)) < 1e-6  # orthogonal to harmless mean
    assert abs(float(plain.vector.double() @ mean)) > 1e-3  # which the plain one is not
    assert float(projected.vector.norm()) == pytest.approx(1.0)
    assert projected.projected and not plain.projected
    assert projected.scale == plain.scale  # the raw mean difference's norm either way
    # Integer positions are the layer's own direction; fractional ones lie between.
    assert c.direction_at(2.0, "mid") == plain
    mid = c.direction_at(2.5, "mid")
    assert mid.layer == 2.5 and float(mid.vector.norm()) == pytest.approx(1.0)
    expected = Direction.interpolate(plain, c.direction(3, "mid"), 0.5)
    assert torch.allclose(mid.vector, expected.vector)
    mid_projected = c.direction_at(2.5, "mid", projected=True)
    mean_mid = (harmless[2, 1] + harmless[3, 1]) / 2
    assert abs(float(mid_projected.vector.double() @ mean_mid)) < 1e-5
    with pytest.raises(ValueError, match="out of range"):
        c.direction_at(3.5, "mid")
