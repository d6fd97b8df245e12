"""Affine concept editing (``Ablation`` mode ``"affine"``): each attention and MLP writer removes
the direction around its own harmless mean write instead of through the origin.

The invariants: each write's component along the direction becomes ``(1 - s)`` of its own plus
``s`` of the harmless mean's (so at full strength every residual state has the same component
along it, whatever the prompt and position); strength 0 is the identity; hooks equal the
baked weights (the constant goes into the biases) on a model whose writers have biases, and a
model without them is refused before anything changes; the edit round-trips through its files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from edit_variants import (
    HOOKS_VS_WEIGHTS_ATOL,
    N_LAYERS,
    encode,
    logprobs,
    no_hooks_left,
    state,
    unit,
)

from abliterate.core.ablation import Ablation
from abliterate.core.edits import WriterInfo, load_edit
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.lora import lora_from_edit
from abliterate.edit.weights import bake
from abliterate.errors import UnsupportedArchitectureError
from abliterate.measure.activations import mean_activations
from abliterate.measure.candidates import Candidates
from abliterate.model.anatomy import anatomy_of
from abliterate.model.stores import ModuleStore


def _means(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """The harmless writer means of ``texts`` (all three sites collected)."""
    harmless = mean_activations(model, tokenizer, texts)
    return Candidates(harmful_mean=harmless + 1.0, harmless_mean=harmless).writer_means()


def _affine(means: torch.Tensor, strength: float = 1.0, **kw: Any) -> Ablation:
    s = strength
    return Ablation(
        unit(means.shape[-1], 1), embedding=0.0, attention=(s,) * N_LAYERS, mlp=(s,) * N_LAYERS,
        mode="affine", harmless_means=means, **kw,
    )  # fmt: skip


def test_writer_means_are_the_mean_writes(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    """mid - pre and post - mid of the last-token means are the attention and MLP outputs'
    last-token means (no post-norms in these families)."""
    model = make_model("llama")
    arch = anatomy_of(model)
    outs: dict[str, list[torch.Tensor]] = {}
    handles = [
        w.module.register_forward_hook(
            lambda _m, _a, out, n=w.writer.name: outs.setdefault(n, []).append(out[:, -1].double())
        )
        for w in arch.writers
        if w.writer.role != "embedding"
    ]
    with torch.no_grad():
        for t in texts:  # one prompt at a time: no padding, the last position is the last token
            model(**encode(tokenizer, [t]))
    for h in handles:
        h.remove()
    means = _means(model, tokenizer, texts)
    for w in arch.writers:
        if w.writer.role == "embedding":
            continue
        row = 0 if w.writer.role == "attention" else 1
        expected = torch.cat(outs[w.writer.name]).mean(0).float()
        assert torch.allclose(means[row, w.writer.layer], expected, atol=1e-4), w.writer.name


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_each_write_moves_to_the_harmless_mean_along_the_direction(
    strength: float, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("llama")
    arch = anatomy_of(model)
    means = _means(model, tokenizer, texts)
    edit = _affine(means, strength)
    d = edit.direction.vector
    raw: dict[str, torch.Tensor] = {}
    edited: dict[str, torch.Tensor] = {}

    def capture(into: dict[str, torch.Tensor], name: str) -> Any:
        return lambda _m, _a, out: into.__setitem__(name, out.detach().float().clone())

    handles = [w.module.register_forward_hook(capture(raw, w.writer.name)) for w in arch.writers]
    with edit_hooks(model, edit):
        handles += [
            w.module.register_forward_hook(capture(edited, w.writer.name)) for w in arch.writers
        ]
        with torch.no_grad():
            model(**encode(tokenizer, texts))
    for h in handles:
        h.remove()
    for w in arch.writers:
        if w.writer.role == "embedding":
            assert torch.equal(raw[w.writer.name], edited[w.writer.name])  # strength 0
            continue
        mu = means[0 if w.writer.role == "attention" else 1, w.writer.layer] @ d
        y, y_edit = raw[w.writer.name] @ d, edited[w.writer.name] @ d
        expected = (1.0 - strength) * y + strength * mu
        assert torch.allclose(y_edit, expected, atol=1e-4), w.writer.name
        # Only the component along d changes.
        rest = edited[w.writer.name] - raw[w.writer.name]
        assert torch.allclose(rest - (rest @ d)[..., None] * d, torch.zeros_like(rest), atol=1e-5)


def test_full_strength_gives_every_state_the_same_component(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    """With the embedding projected too, every state of a layer has the same component along d
    (the sum of the earlier writers' harmless means), whatever the prompt and position."""
    model = make_model("llama")
    arch = anatomy_of(model)
    means = _means(model, tokenizer, texts)
    edit = Ablation(unit(means.shape[-1], 1), embedding=1.0, attention=(1.0,) * N_LAYERS,
                    mlp=(1.0,) * N_LAYERS, mode="affine", harmless_means=means)  # fmt: skip
    d = edit.direction.vector
    states: list[torch.Tensor] = []
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, a, kw: states.append((a[0] if a else kw["hidden_states"]).detach()),
            with_kwargs=True,
        )
        for layer in arch.layers
    ]
    enc = encode(tokenizer, texts)
    with edit_hooks(model, edit), torch.no_grad():
        model(**enc)
    for h in handles:
        h.remove()
    expected = torch.tensor(0.0)
    for i, h in enumerate(states):
        real = h[enc["attention_mask"].bool()] @ d  # every real token of every prompt
        assert torch.allclose(real, expected.expand_as(real), atol=1e-4), i
        expected = expected + (means[0, i] + means[1, i]) @ d
    assert float(expected.abs()) > 1e-2  # the harmless means do have a component along d


def test_strength_zero_is_the_identity(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("llama")
    before = logprobs(model, tokenizer, texts)
    edit = _affine(_means(model, tokenizer, texts), 0.0)
    with edit_hooks(model, edit):
        assert no_hooks_left(model)
        assert torch.equal(before, logprobs(model, tokenizer, texts))


@pytest.mark.parametrize("variant", ["full", "partial_per_layer", "extra", "then_norm_preserving"])
def test_hooks_equal_baked_weights(
    variant: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("llama")  # writers with biases
    means = _means(model, tokenizer, texts)
    d = means.shape[-1]
    edit: Any
    if variant == "full":
        edit = _affine(means)
    elif variant == "partial_per_layer":
        per_layer = tuple(unit(d, 10 + i) for i in range(N_LAYERS))
        edit = Ablation(unit(d, 1), embedding=0.5, attention=(0.0, 1.2, 0.4, 0.9),
                        mlp=(0.7, 0.0, 1.0, 0.3), mode="affine", harmless_means=means,
                        layer_directions=per_layer)  # fmt: skip
    elif variant == "extra":
        edit = _affine(means, extra_directions=(unit(d, 2), unit(d, 3)))
    else:
        full = (1.0,) * N_LAYERS
        edit = _affine(means).then(Ablation(unit(d, 4), 1.0, full, full, mode="norm_preserving"))
    original = logprobs(model, tokenizer, texts)
    with edit_hooks(model, edit):
        hooked = logprobs(model, tokenizer, texts)
    bake(model, edit)
    baked = logprobs(model, tokenizer, texts)
    assert float((hooked - baked).abs().max()) < HOOKS_VS_WEIGHTS_ATOL
    assert float((original - baked).abs().max()) > 1e-2
    # The affine part differs from the plain projection with the same strengths.
    fresh = make_model("llama")
    plain = _affine(means)
    plain = Ablation(plain.direction, 0.0, plain.attention, plain.mlp)
    with edit_hooks(fresh, plain):
        through_origin = logprobs(fresh, tokenizer, texts)
    if variant == "full":
        assert float((through_origin - hooked).abs().max()) > 1e-2


def test_writers_without_biases_are_refused_before_anything_changes(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("qwen2")  # o_proj and down_proj have no bias
    weights = state(model)
    edit = _affine(_means(model, tokenizer, texts))
    with pytest.raises(UnsupportedArchitectureError, match="no bias"):
        bake(model, edit)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    # A LoRA adapter (and GGUF in place, through the same plan) would drop the constant.
    with pytest.raises(UnsupportedArchitectureError, match="no bias"):
        lora_from_edit(edit, ModuleStore(model), anatomy_of(model).anatomy)


def test_post_norm_writers_and_experts_are_refused() -> None:
    means = torch.randn(2, N_LAYERS, 64)
    edit = _affine(means)
    gain = WriterInfo("w", "attention", 1, norm_gain=torch.ones(64))
    with pytest.raises(ValueError, match="post-norm"):
        edit.writer_edit(gain)
    with pytest.raises(ValueError, match="expert"):
        edit.writer_edit(WriterInfo("e", "expert", 1))
    # The embedding is projected through the origin: no offset.
    with_embedding = Ablation(edit.direction, 1.0, edit.attention, edit.mlp, mode="affine",
                              harmless_means=means)  # fmt: skip
    emb = with_embedding.writer_edit(WriterInfo("emb", "embedding", None))
    assert emb is not None and not emb.needs_bias


def test_means_go_with_the_affine_mode_only() -> None:
    means = torch.randn(2, N_LAYERS, 64)
    direction = unit(64, 1)
    s = (1.0,) * N_LAYERS
    with pytest.raises(ValueError, match="affine"):
        Ablation(direction, 0.0, s, s, mode="affine")
    with pytest.raises(ValueError, match="affine"):
        Ablation(direction, 0.0, s, s, harmless_means=means)
    with pytest.raises(ValueError, match="harmless_means"):
        Ablation(direction, 0.0, s, s, mode="affine", harmless_means=means[:, :2])
    with pytest.raises(ValueError, match="finite"):
        Ablation(direction, 0.0, s, s, mode="affine", harmless_means=means * float("nan"))


def test_affine_edit_round_trips_through_its_files(tmp_path: Path) -> None:
    edit = _affine(torch.randn(2, N_LAYERS, 64), 0.7)
    edit.save(tmp_path / "e")
    again = load_edit(tmp_path / "e")
    assert again == edit
    assert isinstance(again, Ablation) and again.mode == "affine"
    assert again.harmless_means is not None
