"""Invariants of edits on tiny random models of every supported family.

Every edit variant the tool makes (:mod:`edit_variants`: plain, partial strengths, per-layer
directions, extra directions, norm-preserving, and composites of these) is checked against the
properties that make an edit trustworthy:

* each writer at strength ``s`` keeps ``1 - s`` of its write along the removed span, so at full
  strength no residual state (embedding, pre/mid/post of every layer) has a component along it;
* strength 0 is the identity, and ablating twice equals ablating once;
* hooks equal baked weights, and a composite equals baking its parts in turn;
* hooks are removed on exit and on error; a tied head is untied and keeps its weights;
* an edit that does not fit the model raises before anything changes;
* scoring under an edit (shared-prefix scorer, multi-token KL) agrees with the plain paths.

Saving and loading edits is tested in ``test_edit_files.py``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from edit_variants import (
    COMPOSITES,
    D_MODEL,
    HOOKS_VS_WEIGHTS_ATOL,
    N_LAYERS,
    PLAIN_MODE,
    SINGLE,
    VARIANTS,
    assert_same_state,
    build,
    encode,
    logprobs,
    no_hooks_left,
    removed_span,
    state,
    unit,
)

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.core.edits import Composite, Edit, WriterInfo
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.weights import bake
from abliterate.model.anatomy import BoundAnatomy, anatomy_of

# |h · d| / max |h| of a residual state that should have no component along unit d.
ORTHOGONAL_RTOL = 1e-5


def across(every_family: tuple[str, ...], llama_only: tuple[str, ...] = ()) -> Any:
    """Parametrize ``(family, variant)``: some variants on every family, the others on the
    llama only (its writer biases make it the most demanding), to keep the suite fast."""
    pairs = [(f, v) for v in every_family for f in ("llama", "qwen2", "gemma")]
    pairs += [("llama", v) for v in llama_only]
    return pytest.mark.parametrize(("family", "variant"), pairs, ids=[f"{f}-{v}" for f, v in pairs])


@contextlib.contextmanager
def residual_states(arch: BoundAnatomy) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Every residual state of a forward pass at every position: the embedding's output, and
    the pre, mid and post state of every layer, as ``(name, (batch, pos, d_model))``."""
    states: list[tuple[str, torch.Tensor]] = []

    def keep(name: str, value: Any) -> None:
        value = value[0] if isinstance(value, tuple) else value
        states.append((name, value.detach().float().clone()))

    handles = [arch.embedding.register_forward_hook(lambda _m, _a, out: keep("embedding", out))]
    for i, (layer, mid) in enumerate(zip(arch.layers, arch.mid_modules, strict=True)):
        handles.append(layer.register_forward_pre_hook(
            lambda _m, a, kw, i=i: keep(f"pre {i}", a[0] if a else kw["hidden_states"]),
            with_kwargs=True,
        ))  # fmt: skip
        assert mid is not None
        handles.append(mid.register_forward_pre_hook(lambda _m, a, i=i: keep(f"mid {i}", a[0])))
        handles.append(layer.register_forward_hook(lambda _m, _a, out, i=i: keep(f"post {i}", out)))
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


def relative_component(h: torch.Tensor, d: torch.Tensor) -> float:
    """Largest |h · d| over positions, relative to the largest state norm."""
    return float((h @ d).abs().max() / h.norm(dim=-1).max())


# --- what a writer keeps, and what the stream keeps ------------------------------------------


@across(
    ("partial", "norm_preserving_per_layer_extra_partial"),
    tuple(v for v in SINGLE if v not in ("partial", "norm_preserving_per_layer_extra_partial")),
)
def test_each_write_keeps_one_minus_strength_of_its_span(
    variant: str, family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    """Writer by writer: the edited output's component along the writer's basis is ``1 - s``
    times the raw output's, with ``s`` the strength of the writer's role and layer."""
    model = make_model(family)
    arch = anatomy_of(model)
    edit = build(variant)
    assert isinstance(edit, Ablation)
    raw: dict[str, torch.Tensor] = {}
    edited: dict[str, torch.Tensor] = {}

    def capture(into: dict[str, torch.Tensor], name: str) -> Any:
        return lambda _m, _a, out: into.__setitem__(name, out.detach().float().clone())

    # Forward hooks run in registration order: "raw" sees the module's own output (of the input
    # as the edit's pre-hook rescaled it), "edited" sees it after the edit's output hook.
    handles = [w.module.register_forward_hook(capture(raw, w.writer.name)) for w in arch.writers]
    with edit_hooks(model, edit):
        handles += [
            w.module.register_forward_hook(capture(edited, w.writer.name)) for w in arch.writers
        ]
        with torch.no_grad():
            model(**encode(tokenizer, texts))
    for h in handles:
        h.remove()
    checked = 0
    for w in arch.writers:
        info = arch.writer_info(w)
        s = edit.strength_for(info)
        basis = edit.basis(None if info.role == "embedding" else info.layer)  # (k, d_model)
        y, y_edit = raw[info.name], edited[info.name]
        scale = float(y.norm(dim=-1).max())
        if info.role == "embedding" and edit.mode == "norm_preserving" and s not in (0.0, 1.0):
            continue  # each embedding row is also rescaled by its own norm factor
        expected = (1.0 - s) * (y @ basis.T)
        assert float((y_edit @ basis.T - expected).abs().max()) / scale < ORTHOGONAL_RTOL, info
        if s == 0.0:
            assert torch.equal(y_edit, y), info  # no hook at all on an untouched writer
        checked += 1
        # The raw write does have a component along the basis, so the check above can fail.
        assert float((y @ basis.T).abs().max()) / scale > 1e-2, info
    assert checked >= 2 * N_LAYERS


@pytest.mark.parametrize(
    "variant",
    ["plain", "extra_directions", "norm_preserving", *COMPOSITES[:2]],
)
def test_full_strength_leaves_no_component_in_any_residual_state(
    variant: str, family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model(family)
    arch = anatomy_of(model)
    edit = build(variant)
    span = removed_span(edit)
    assert span
    enc = encode(tokenizer, texts)
    with edit_hooks(model, edit), residual_states(arch) as states, torch.no_grad():
        model(**enc)
    assert len(states) == 1 + 3 * arch.n_layers
    for name, h in states:
        for d in span:
            assert relative_component(h, d) < ORTHOGONAL_RTOL, name
    # Without the edit every removed direction is clearly present, so the check above can fail.
    with residual_states(arch) as plain, torch.no_grad():
        model(**enc)
    for d in span:
        assert max(relative_component(h, d) for _, h in plain) > 1e-2


def test_extra_directions_remove_their_whole_span(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("llama")
    edit = build("extra_directions")
    assert isinstance(edit, Ablation)
    basis = edit.basis(0)
    assert basis.shape == (3, D_MODEL)
    assert torch.allclose(basis @ basis.T, torch.eye(3), atol=1e-6)  # orthonormal
    assert torch.allclose(basis[0], edit.direction.vector)  # led by the main direction
    # Removing the main direction alone leaves the extras in the stream (the extras' test in
    # test_full_strength_leaves_no_component_in_any_residual_state is not implied by it).
    alone = Ablation.uniform(edit.direction, N_LAYERS)
    with edit_hooks(model, alone), residual_states(anatomy_of(model)) as states, torch.no_grad():
        model(**encode(tokenizer, texts))
    assert max(relative_component(h, edit.extra_directions[0].vector) for _, h in states) > 1e-2
    # An extra direction already in the span adds nothing to the basis.
    same = Ablation(edit.direction, 1.0, edit.attention, edit.mlp,
                    extra_directions=(edit.direction * 2.0,))  # fmt: skip
    assert same.basis(None).shape == (1, D_MODEL)


def test_norm_preserving_keeps_write_norms_and_removes_the_direction(
    family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model(family)
    arch = anatomy_of(model)
    edit = build("norm_preserving")
    assert isinstance(edit, Ablation)
    d = edit.direction.vector
    writers = (*arch.modules("attention"), *arch.modules("mlp"))
    columns = [m.weight.detach().norm(dim=0).clone() for m in writers]
    rows = arch.embedding.weight.detach().norm(dim=1).clone()
    bake(model, edit)
    arch = anatomy_of(model)
    for before, m in zip(columns, (*arch.modules("attention"), *arch.modules("mlp")), strict=True):
        w = m.weight.detach()
        assert torch.allclose(w.norm(dim=0), before, rtol=1e-5)  # every write vector's norm
        assert float((d @ w).abs().max()) < 1e-5  # and none writes along d
    assert torch.allclose(arch.embedding.weight.detach().norm(dim=1), rows, rtol=1e-5)
    assert float((arch.embedding.weight.detach() @ d).abs().max()) < 1e-5
    # Hence the residual stream (embedding plus every write, biases projected) has no d part.
    with residual_states(arch) as states, torch.no_grad():
        model(**encode(tokenizer, texts))
    for name, h in states:
        assert relative_component(h, d) < ORTHOGONAL_RTOL, name


# --- identities ------------------------------------------------------------------------------


@across(("plain", "plain_then_norm_preserving"),
        ("per_layer", "extra_directions", "norm_preserving", "norm_preserving_per_layer_partial",
         "norm_preserving_per_layer_extra_partial"))  # fmt: skip
def test_strength_zero_is_the_identity(
    variant: str, family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model(family)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    before = logprobs(model, tokenizer, texts)
    weights = state(model)
    edit = build(variant, strength=0.0)
    with edit_hooks(model, edit):
        assert no_hooks_left(model)  # nothing to change, nothing installed
        assert torch.equal(before, logprobs(model, tokenizer, texts))
    summary = bake(model, edit)
    assert summary.tensors == [] and summary.writers_by_role == {}
    assert_same_state(model, weights)
    # Nothing was written, so nothing was untied.
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied


@across(("plain",), ("per_layer", "extra_directions"))
def test_hooks_twice_equal_hooks_once(
    variant: str, family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model(family)
    edit = build(variant)
    before = logprobs(model, tokenizer, texts)
    with edit_hooks(model, edit):
        once = logprobs(model, tokenizer, texts)
        with edit_hooks(model, edit):
            twice = logprobs(model, tokenizer, texts)
    assert torch.allclose(once, twice, atol=1e-5)
    assert not torch.allclose(once, before, atol=1e-3)


@pytest.mark.parametrize("variant", [*PLAIN_MODE[:1], *PLAIN_MODE[2:], "norm_preserving"])
def test_baking_twice_equals_baking_once(
    variant: str, family: str, make_model: Callable[[str], Any]
) -> None:
    """A full-strength projection removes the span; the second finds nothing to remove (and,
    norm-preserving, nothing to rescale)."""
    model = make_model(family)
    original = state(model)
    edit = build(variant)
    bake(model, edit)
    once = state(model)
    bake(model, edit)
    changed = 0
    for k, v in model.state_dict().items():
        assert torch.allclose(v, once[k], atol=1e-6), k
        changed += not torch.allclose(once[k], original[k], atol=1e-3)
    assert changed >= 1 + 2 * N_LAYERS  # the embedding and every layer's two writers


# --- hooks and weights -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_hooks_equal_baked_weights(
    variant: str, family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model(family)
    edit = build(variant)
    original = logprobs(model, tokenizer, texts)
    with edit_hooks(model, edit):
        hooked = logprobs(model, tokenizer, texts)
    assert no_hooks_left(model)
    bake(model, edit)
    baked = logprobs(model, tokenizer, texts)
    diff = float((hooked - baked).abs().max())
    assert diff < HOOKS_VS_WEIGHTS_ATOL, diff
    assert float((original - baked).abs().max()) > 1e-2  # the edit does change the model


@pytest.mark.parametrize("variant", COMPOSITES)
def test_composite_weights_equal_baking_each_part_in_turn(
    variant: str, family: str, make_model: Callable[[str], Any]
) -> None:
    """``bake(a.then(b))`` is ``bake(a); bake(b)``, bit for bit (float32 weights)."""
    edit = build(variant)
    assert isinstance(edit, Composite) and len(edit.edits) >= 2
    in_turn, at_once = make_model(family), make_model(family)
    for part in edit.edits:
        bake(in_turn, part)
    summary = bake(at_once, edit)
    assert_same_state(at_once, state(in_turn))
    assert summary.writers_by_role["attention"] == summary.writers_by_role["mlp"] == N_LAYERS


def test_composite_flattens_and_keeps_order() -> None:
    a, b, c = (build(v) for v in ("plain", "per_layer", "norm_preserving"))
    assert a.then(b).then(c).edits == (a, b, c)
    assert a.then(b.then(c)).edits == (a, b, c)
    assert a.then(b) != b.then(a)  # order is part of the value
    info = WriterInfo("model.layers.1.mlp.down_proj.weight", "mlp", 1)
    parts = a.then(b).then(c).writer_edits(info)
    singles = [e.writer_edit(info) for e in (a, b, c)]
    assert len(parts) == len(singles) == 3
    for part, single in zip(parts, singles, strict=True):
        assert torch.equal(part.basis, single.basis)  # type: ignore[attr-defined,union-attr]
    with pytest.raises(TypeError, match="writer_edits"):
        a.then(b).writer_edit(info)
    with pytest.raises(ValueError, match="at least one"):
        Composite(())


def test_hooks_are_removed_on_exit_and_on_error(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("qwen2")
    weights = state(model)
    before = logprobs(model, tokenizer, texts)
    edit = build("norm_preserving_then_plain")  # pre-hooks (input scales) and output hooks
    with edit_hooks(model, edit):
        arch = anatomy_of(model)
        hooked = [w.module for w in arch.writers if w.module._forward_hooks]
        assert len(hooked) == 1 + 2 * N_LAYERS
        pre_hooked = [w.module for w in arch.writers if w.module._forward_pre_hooks]
        assert len(pre_hooked) == 2 * N_LAYERS  # every linear writer; the embedding needs none
    assert no_hooks_left(model)
    with pytest.raises(RuntimeError, match="boom"), edit_hooks(model, edit):
        raise RuntimeError("boom")
    assert no_hooks_left(model)
    assert torch.equal(before, logprobs(model, tokenizer, texts))
    assert_same_state(model, weights)


@pytest.mark.parametrize("tied_family", ["qwen2", "gemma"])
def test_tied_head_is_untied_and_keeps_its_weights(
    tied_family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model(tied_family)
    arch = anatomy_of(model)
    assert arch.lm_head.weight is arch.embedding.weight
    head = arch.lm_head.weight.detach().clone()
    edit = build("plain")
    with edit_hooks(model, edit):
        hooked = logprobs(model, tokenizer, texts)
    bake(model, edit)
    arch = anatomy_of(model)
    assert arch.lm_head.weight is not arch.embedding.weight
    assert torch.equal(arch.lm_head.weight, head)  # the head reads the unedited vocabulary
    assert not torch.allclose(arch.embedding.weight, head, atol=1e-3)  # the embedding is edited
    assert model.config.tie_word_embeddings is False
    # Hooks never touch the head either, so both agree.
    assert float((hooked - logprobs(model, tokenizer, texts)).abs().max()) < HOOKS_VS_WEIGHTS_ATOL


# --- shapes that do not fit ------------------------------------------------------------------


_ALL = (1.0,) * N_LAYERS
_NARROW = unit(32, 2)
MISFITS: dict[str, tuple[Edit, str]] = {
    "layers": (Ablation.uniform(unit(D_MODEL, 1), n_layers=3), "covers 3 layers"),
    "d_model": (Ablation.uniform(unit(32, 1), n_layers=N_LAYERS), "d_model=32"),
    "layer_directions": (Ablation(unit(D_MODEL, 1), 1.0, _ALL, _ALL, (_NARROW,) * 4), "d_model"),
    "extra_directions": (
        Ablation(unit(D_MODEL, 1), 1.0, _ALL, _ALL, extra_directions=(_NARROW,)),
        "d_model",
    ),
    "composite": (
        build("plain").then(Ablation.uniform(unit(D_MODEL, 2), n_layers=5)),
        "covers 5 layers",
    ),
}


@pytest.mark.parametrize("misfit", MISFITS)
def test_edit_that_does_not_fit_raises_before_changing_anything(
    misfit: str, make_model: Callable[[str], Any]
) -> None:
    edit, message = MISFITS[misfit]
    model = make_model("llama")
    weights = state(model)
    with pytest.raises(ValueError, match=message), edit_hooks(model, edit):
        pass
    assert no_hooks_left(model)
    with pytest.raises(ValueError, match=message):
        bake(model, edit)
    assert_same_state(model, weights)


def test_ablation_rejects_inconsistent_fields() -> None:
    d = unit(D_MODEL, 1)
    with pytest.raises(ValueError, match="layer_directions has 3 entries for 4 layers"):
        Ablation(d, 1.0, (1.0,) * 4, (1.0,) * 4, (unit(D_MODEL, 2),) * 3)
    with pytest.raises(ValueError, match="mode"):
        Ablation(d, 1.0, (1.0,) * 4, (1.0,) * 4, mode="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same layers"):
        Ablation(d, 1.0, (1.0,) * 4, (1.0,) * 3)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="strength must be finite"):
            Ablation(d, 1.0, (1.0, bad, 1.0, 1.0), (1.0,) * 4)
        with pytest.raises(ValueError, match="strength must be finite"):
            Ablation(d, bad, (1.0,) * 4, (1.0,) * 4)
    with pytest.raises(ValueError, match="finite"):
        Ablation(Direction(torch.full((D_MODEL,), float("nan"))), 1.0, (1.0,) * 4, (1.0,) * 4)


# --- measuring under an edit -----------------------------------------------------------------


@pytest.mark.parametrize("variant", [None, "per_layer", "norm_preserving_per_layer_partial"])
def test_shared_prefix_scorer_equals_plain_next_token_logprobs(
    variant: str | None,
    family: str,
    make_model: Callable[[str], Any],
    tokenizer: Any,
    texts: list[str],
) -> None:
    import contextlib

    from abliterate.data.chat import format_chat
    from abliterate.model.forward import (
        SharedPrefixScorer,
        common_prefix_length,
        next_token_logprobs,
    )

    model = make_model(family)
    edit = None if variant is None else build(variant)
    prompts = ["How do I bake bread?", "Explain how to pick a lock.", "What is the capital?",
               "Write a poem about the sea and the wind at night.", "def add(a, b)"]  # fmt: skip
    unedited = next_token_logprobs(model, tokenizer, texts, batch_size=4)
    for chat in (texts, format_chat(tokenizer, prompts, "Sure, here is a system prompt.")):
        scorer = SharedPrefixScorer(model, tokenizer, chat, batch_size=2)
        with edit_hooks(model, edit) if edit is not None else contextlib.nullcontext():
            expected = next_token_logprobs(model, tokenizer, chat, batch_size=4)
            got = scorer.logprobs()
        assert got.shape == expected.shape == (len(chat), len(tokenizer))
        assert torch.allclose(got, expected, atol=2e-4), float((got - expected).abs().max())
    if edit is not None:  # the edit reaches the scored model
        with edit_hooks(model, edit):
            edited = next_token_logprobs(model, tokenizer, texts, batch_size=4)
        assert float((edited - unedited).abs().max()) > 1e-2
    assert scorer.prefix_length > 5  # the system prompt is shared, hence computed once
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5], [6]]) == 0


def test_multi_token_kl_is_zero_for_itself_and_equals_a_separate_baked_model(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    from abliterate.core.stats import kl_divergence
    from abliterate.eval.kl import multi_token_kl
    from abliterate.model.forward import next_token_logprobs

    model = make_model("llama")
    same, first_same = multi_token_kl(model, tokenizer, texts, n_tokens=5, batch_size=4)
    assert same == pytest.approx(0.0, abs=1e-6) and first_same == pytest.approx(0.0, abs=1e-6)
    edit = build("norm_preserving_then_plain")
    multi, first = multi_token_kl(
        model, tokenizer, texts, q_context=lambda: edit_hooks(model, edit), n_tokens=5,
        batch_size=4,
    )  # fmt: skip
    assert multi > 1e-3 and first > 1e-3
    # Position 0 of the multi-token measure is exactly the first-token KL.
    base = next_token_logprobs(model, tokenizer, texts)
    with edit_hooks(model, edit):
        edited = next_token_logprobs(model, tokenizer, texts)
    assert first == pytest.approx(float(kl_divergence(base, edited).mean()), rel=1e-3)
    # Two separate model objects give the same answer as hooks on one.
    other = copy.deepcopy(model)
    bake(other, edit)
    multi2, first2 = multi_token_kl(model, tokenizer, texts, model_q=other, n_tokens=5,
                                    batch_size=4)  # fmt: skip
    assert multi2 == pytest.approx(multi, rel=1e-3) and first2 == pytest.approx(first, rel=1e-3)
