"""Direction value type, candidate means and activation collection."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from abliterate.core.directions import Direction
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
    assert float(a.normalized().vector.norm()) == pytest.approx(1.0)
    assert (a + b).layer is None  # a sum of two layers' directions belongs to neither
    assert a != b
    mid = Direction.interpolate(a.normalized(), b, 0.5)
    assert mid.layer == 1.5
    assert float(mid.vector.norm()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="zero"):
        Direction(torch.zeros(3)).normalized()
    with pytest.raises(ValueError, match="1-D"):
        Direction(torch.zeros(2, 3))


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
