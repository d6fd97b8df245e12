"""Invariants of the richer edits the search uses: per-layer directions, norm-preserving mode,
projected and interpolated directions. The same properties as plain ablation must hold: hooks
equal baked weights, strength 0 is the identity, editing twice equals once, exact save/load."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.edit.export import save_model, verify_export
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.weights import bake
from abliterate.measure.candidates import Candidates
from abliterate.model.anatomy import anatomy_of


def logits(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model(**enc).logits  # (batch, pos, vocab)


def unit(d_model: int, seed: int) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(d_model, generator=g)).normalized()


def make_spec(model: Any, kind: str, strength: float = 1.0) -> Ablation:
    arch = anatomy_of(model)
    n, d = arch.n_layers, arch.d_model
    per_layer = tuple(unit(d, 10 + i) for i in range(n))
    if kind == "per_layer":
        return Ablation(unit(d, 1), strength, (strength,) * n, (strength,) * n, per_layer)
    if kind == "norm_preserving":
        return Ablation(unit(d, 1), strength, (strength,) * n, (strength,) * n,
                        mode="norm_preserving")  # fmt: skip
    if kind == "norm_preserving_per_layer_partial":
        attention = tuple(strength * x for x in (0.0, 1.2, 0.4, 0.9))
        mlp = tuple(strength * x for x in (0.7, 0.0, 1.0, 0.3))
        return Ablation(unit(d, 1), 0.5 * strength, attention, mlp, per_layer, "norm_preserving")
    # Extra directions: random unit vectors, not orthogonal to the main ones (the spec makes
    # each writer's basis orthonormal itself).
    extra = (unit(d, 2), unit(d, 3))
    if kind == "extra_directions":
        return Ablation(unit(d, 1), strength, (strength,) * n, (strength,) * n,
                        extra_directions=extra)  # fmt: skip
    if kind == "norm_preserving_per_layer_extra_partial":
        attention = tuple(strength * x for x in (0.0, 1.2, 0.4, 0.9))
        mlp = tuple(strength * x for x in (0.7, 0.0, 1.0, 0.3))
        return Ablation(unit(d, 1), 0.5 * strength, attention, mlp, per_layer, "norm_preserving",
                        extra_directions=extra)  # fmt: skip
    raise ValueError(kind)


KINDS = (
    "per_layer",
    "norm_preserving",
    "extra_directions",
    "norm_preserving_per_layer_partial",
    "norm_preserving_per_layer_extra_partial",
)


@pytest.mark.parametrize("kind", KINDS)
def test_hooks_equal_baked_weights(
    kind: str, family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model(family)
    spec = make_spec(model, kind)
    original = logits(model, tokenizer, texts)
    with edit_hooks(model, spec):
        hooked = logits(model, tokenizer, texts)
    bake(model, spec)
    baked = logits(model, tokenizer, texts)
    assert torch.allclose(hooked, baked, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(original, baked, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_strength_zero_is_identity(
    kind: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("llama")
    before = logits(model, tokenizer, texts)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = make_spec(model, kind, strength=0.0)
    with edit_hooks(model, spec):
        assert torch.equal(before, logits(model, tokenizer, texts))
    bake(model, spec)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("kind", KINDS[:3])
def test_editing_twice_equals_once(
    kind: str, family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model(family)
    spec = make_spec(model, kind)
    bake(model, spec)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    bake(model, spec)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, once[k], atol=1e-5), k


def test_norm_preserving_keeps_write_norms_and_removes_the_direction(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("llama")
    arch = anatomy_of(model)
    spec = make_spec(model, "norm_preserving")
    d = spec.direction.vector
    columns = [
        m.weight.detach().norm(dim=0).clone()
        for m in (*arch.modules("attention"), *arch.modules("mlp"))
    ]
    rows = arch.embedding.weight.detach().norm(dim=1).clone()
    bake(model, spec)
    arch = anatomy_of(model)
    for before, m in zip(columns, (*arch.modules("attention"), *arch.modules("mlp")), strict=True):
        w = m.weight.detach()
        assert torch.allclose(w.norm(dim=0), before, rtol=1e-5)  # every write vector's norm
        assert float((d @ w).abs().max()) < 1e-5  # and none writes along d
    assert torch.allclose(arch.embedding.weight.detach().norm(dim=1), rows, rtol=1e-5)
    # Hence the residual stream (embedding plus every write, biases projected) has no d part.
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[:-1]
    for h in hidden:
        assert float((h @ d).abs().max() / h.norm(dim=-1).max()) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_spec_and_exported_model_round_trip_exactly(
    kind: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    model = make_model("qwen2")
    spec = make_spec(model, kind)
    spec.save(tmp_path / "spec")
    assert Ablation.load(tmp_path / "spec") == spec
    bake(model, spec)
    save_model(model, tokenizer, tmp_path / "m", {"edit": spec.to_dict()})
    assert verify_export(model, tokenizer, tmp_path / "m", texts) == 0.0


def test_extra_directions_remove_their_whole_span(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("llama")
    spec = make_spec(model, "extra_directions")
    basis = spec.basis(0)
    assert basis.shape == (3, 64)
    assert torch.allclose(basis @ basis.T, torch.eye(3), atol=1e-6)  # orthonormal
    assert torch.allclose(basis[0], spec.direction.vector)  # led by the main direction
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with edit_hooks(model, spec), torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[:-1]
    # Every residual state is orthogonal to every direction of the spec, extras included...
    for h in hidden:
        for v in (spec.direction, *spec.extra_directions):
            assert float((h @ v.vector).abs().max() / h.norm(dim=-1).max()) < 1e-5
    # ...which removing the main direction alone does not achieve.
    alone = Ablation.uniform(spec.direction, 4)
    with edit_hooks(model, alone), torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[:-1]
    assert max(float((h @ spec.extra_directions[0].vector).abs().max()) for h in hidden) > 1e-2
    # An extra direction already in the span adds nothing to the basis.
    same = Ablation.uniform(spec.direction, 4)
    same = Ablation(same.direction, 1.0, same.attention, same.mlp,
                    extra_directions=(spec.direction * 2.0,))  # fmt: skip
    assert same.basis(None).shape == (1, 64)


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


def test_spec_rejects_wrong_layer_directions(make_model: Callable[[str], Any]) -> None:
    model = make_model("llama")
    with pytest.raises(ValueError, match="layer_directions"):
        Ablation(unit(64, 1), 1.0, (1.0,) * 4, (1.0,) * 4, (unit(64, 2),) * 3)
    with pytest.raises(ValueError, match="mode"):
        Ablation(unit(64, 1), 1.0, (1.0,) * 4, (1.0,) * 4, mode="sideways")  # type: ignore[arg-type]
    bad = Ablation(unit(64, 1), 1.0, (1.0,) * 4, (1.0,) * 4, (unit(32, 2),) * 4)
    with pytest.raises(ValueError, match="d_model"), edit_hooks(model, bad):
        pass


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


@pytest.mark.parametrize("kind", [None, "per_layer", "norm_preserving_per_layer_partial"])
def test_shared_prefix_scorer_equals_plain_next_token_logprobs(
    kind: str | None, family: str, make_model: Callable[[str], Any], tokenizer: Any,
    texts: list[str],
) -> None:  # fmt: skip
    from abliterate.data.chat import format_chat
    from abliterate.model.forward import (
        SharedPrefixScorer,
        common_prefix_length,
        next_token_logprobs,
    )

    model = make_model(family)
    spec = None if kind is None else make_spec(model, kind)
    prompts = ["How do I bake bread?", "Explain how to pick a lock.", "What is the capital?",
               "Write a poem about the sea and the wind at night.", "def add(a, b)"]  # fmt: skip
    for chat in (texts, format_chat(tokenizer, prompts, "Sure, here is a system prompt.")):
        scorer = SharedPrefixScorer(model, tokenizer, chat, batch_size=2)
        with edit_hooks(model, spec) if spec is not None else contextlib.nullcontext():
            expected = next_token_logprobs(model, tokenizer, chat, batch_size=4)
            got = scorer.logprobs()
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=2e-4), float((got - expected).abs().max())
    assert scorer.prefix_length > 5  # the system prompt is shared, hence computed once
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5], [6]]) == 0
