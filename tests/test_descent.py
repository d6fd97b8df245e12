"""Descent on per-layer strengths: differentiable hooks that equal the edit's own, gradients
that match finite differences, and a descent that lowers KL under the refusal cap."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from edit_variants import N_LAYERS, build, logprobs

from abliterate.core.ablation import Ablation
from abliterate.edit.hooks import edit_hooks
from abliterate.measure.refusal import RefusalOpenings
from abliterate.search.descent import StrengthEdit, descend, frozen
from abliterate.search.scoring import EditScorer, ScoringSet


def _strength_edit(variant: str) -> tuple[Ablation, StrengthEdit]:
    edit = build(variant)
    assert isinstance(edit, Ablation)
    uneven = torch.tensor([0.0, 0.9, 0.35, 1.2])
    return edit, StrengthEdit(edit, uneven.clone(), uneven.flip(0).clone())


@pytest.mark.parametrize("variant", ["plain", "norm_preserving_per_layer_extra_partial"])
def test_tensor_strength_hooks_equal_the_ablations_hooks(
    variant: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("llama")
    _, edit = _strength_edit(variant)
    with edit_hooks(model, edit):
        tensor = logprobs(model, tokenizer, texts)
    current = edit.current()
    assert current.attention == pytest.approx((0.0, 0.9, 0.35, 1.2))
    assert current.mlp == pytest.approx((1.2, 0.35, 0.9, 0.0))
    with edit_hooks(model, current):
        floats = logprobs(model, tokenizer, texts)
    assert float((tensor - floats).abs().max()) < 1e-5
    assert edit.to_dict() == current.to_dict()


@pytest.fixture
def scorer(make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]) -> EditScorer:
    model = make_model("llama")
    openings = RefusalOpenings(((10, 11, 12), (13, 14, 15)), (2, 1), 3)
    harmless = [texts[0], texts[1], texts[5]]
    return EditScorer(model, tokenizer, ScoringSet(texts[2:5], harmless, [5, 6, 7], openings))


def test_gradients_match_finite_differences(scorer: EditScorer) -> None:
    shape, _ = _strength_edit("norm_preserving_per_layer_partial")
    base = torch.tensor([0.5, 0.8, 0.3, 1.0], dtype=torch.float64)
    attention = base.clone().float().requires_grad_(True)
    mlp = base.flip(0).clone().float().requires_grad_(True)
    edit = StrengthEdit(shape, attention, mlp)
    with frozen(scorer.model):
        scores = scorer.measure(lambda: edit_hooks(scorer.model, edit))
        objective = scores.kl.mean() + scores.refusal.mean()
        objective.backward()
    assert attention.grad is not None and mlp.grad is not None
    h = 1e-2
    for which, layer in (("attention", 1), ("mlp", 2)):
        values = []
        for sign in (1.0, -1.0):
            a, m = base.clone().float(), base.flip(0).clone().float()
            (a if which == "attention" else m)[layer] += sign * h
            [s] = scorer.score([StrengthEdit(shape, a, m).current()])
            values.append(float(s.kl.mean() + s.refusal.mean()))
        numeric = (values[0] - values[1]) / (2 * h)
        grad = float((attention if which == "attention" else mlp).grad[layer])  # type: ignore[index]
        assert grad == pytest.approx(numeric, rel=0.05, abs=1e-4), which
    # The model's own parameters were left as they were: no gradients kept, flags restored.
    assert all(p.grad is None and p.requires_grad for p in scorer.model.parameters())


def test_descent_lowers_kl_without_raising_the_refusal_likelihood(scorer: EditScorer) -> None:
    start = Ablation.uniform(build("plain").direction, N_LAYERS)  # type: ignore[attr-defined]
    result = descend(scorer, start, steps=6, lr=0.1)
    assert len(result.steps) == 7
    assert result.start["kl"] == pytest.approx(result.steps[0]["kl"])
    assert result.best["refusal"] <= result.cap + 1e-9
    assert result.best["kl"] < result.start["kl"]
    [again] = scorer.score([result.edit])  # the reported point is the edit's
    assert again.summary()["kl"] == pytest.approx(result.best["kl"], rel=1e-4)
    assert all(0.0 <= s <= 1.5 for s in (*result.edit.attention, *result.edit.mlp))
    assert result.edit.embedding == start.embedding
    # A cap nothing can meet keeps the start.
    stuck = descend(scorer, start, steps=2, cap=1e-30)
    assert stuck.edit == start and stuck.best == stuck.start
