"""Permanent edits through a weight store: the in-memory store writes in place and unties shared
parameters, ``apply_edit`` edits exactly the writers an edit touches (from the config alone, in
any store), and fused-expert writers are edited by a weight swap that hooks undo exactly."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from edit_variants import N_LAYERS, build, unit
from torch import nn

from abliterate.core.ablation import Ablation, ProjectionEdit
from abliterate.edit.hooks import _swapped, edit_hooks
from abliterate.edit.weights import EditSummary, apply_edit, bake
from abliterate.model.anatomy import (
    FAMILIES,
    Anatomy,
    BoundAnatomy,
    BoundWriter,
    Layout,
    Writer,
    canonical,
)
from abliterate.model.stores import ModuleStore

# --- the in-memory store ---------------------------------------------------------------------


def test_module_store_reads_and_writes_parameters_in_place(
    make_model: Callable[[str], Any],
) -> None:
    model = make_model("llama")
    store = ModuleStore(model)
    name = "model.layers.2.mlp.down_proj.weight"
    param = model.get_parameter(name)
    before = param.detach().clone()
    assert store.has(name) and store.has("model.layers.2.mlp.down_proj.bias")
    assert not store.has("model.layers.2.mlp.nothing")  # no such parameter
    assert not store.has("model.layers.9.mlp.down_proj.weight")  # no such module
    assert not store.has("model.rotary_emb.inv_freq")  # a buffer, not a parameter
    assert store.read(name).data_ptr() == param.data_ptr()  # no copy
    with store.writable(name) as tensor:
        assert tensor.data_ptr() == param.data_ptr()
        tensor.mul_(2.0)
    assert model.get_parameter(name) is param  # the same parameter, changed in place
    assert torch.equal(param.detach(), 2.0 * before)


@pytest.mark.parametrize("tied_family", ["qwen2", "gemma"])
def test_module_store_unties_a_tied_head_before_writing_the_embedding(
    tied_family: str, make_model: Callable[[str], Any]
) -> None:
    model = make_model(tied_family)
    head = model.get_output_embeddings()
    shared = head.weight
    assert model.get_input_embeddings().weight is shared
    original = shared.detach().clone()
    store = ModuleStore(model)
    with store.writable("model.embed_tokens.weight") as tensor:
        tensor.zero_()
    embedding = model.get_input_embeddings().weight
    assert embedding is not shared and head.weight is shared  # the head keeps its parameter
    assert torch.equal(head.weight.detach(), original)  # and its values
    assert not embedding.detach().any()
    assert model.config.tie_word_embeddings is False
    # Untied now, the head is written in place.
    with store.writable("lm_head.weight") as tensor:
        tensor.add_(1.0)
    assert head.weight is shared and torch.equal(shared.detach(), original + 1.0)
    assert not embedding.detach().any()


def test_module_store_unties_any_shared_parameter_of_a_plain_module() -> None:
    class Twins(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
            self.b.weight = self.a.weight
            self.a.weight.requires_grad_(False)

    twins = Twins()
    original = twins.a.weight.detach().clone()
    with ModuleStore(twins).writable("b.weight") as tensor:  # a module without a config
        tensor.fill_(7.0)
    assert twins.b.weight is not twins.a.weight
    assert torch.equal(twins.a.weight.detach(), original)
    assert bool((twins.b.weight == 7.0).all())
    assert twins.b.weight.requires_grad is False  # the copy keeps the original's flag


# --- apply_edit ------------------------------------------------------------------------------


def _writer_names(family: str, roles: dict[str, list[int | None]]) -> set[str]:
    modules = {"attention": "self_attn.o_proj", "mlp": "mlp.down_proj"}
    names = set()
    for role, layers in roles.items():
        for layer in layers:
            if layer is None:
                names.add("model.embed_tokens.weight")
                continue
            names.add(f"model.layers.{layer}.{modules[role]}.weight")
            if family == "llama":  # the tiny llama's writers have biases
                names.add(f"model.layers.{layer}.{modules[role]}.bias")
    return names


@pytest.mark.parametrize("family_name", ["llama", "qwen2"])
def test_apply_edit_summary_counts_the_writers_each_role_had_edited(
    family_name: str, make_model: Callable[[str], Any]
) -> None:
    layers = list(range(N_LAYERS))
    summary = bake(make_model(family_name), build("plain"))
    assert summary.writers_by_role == {"embedding": 1, "attention": N_LAYERS, "mlp": N_LAYERS}
    expected = _writer_names(family_name, {"embedding": [None], "attention": layers, "mlp": layers})
    assert sorted(summary.tensors) == sorted(expected)  # each tensor once
    assert summary.to_dict() == {
        "n_tensors": 1 + 2 * N_LAYERS + (2 * N_LAYERS if family_name == "llama" else 0),
        "writers_by_role": {"embedding": 1, "attention": N_LAYERS, "mlp": N_LAYERS},
    }
    # Strength 0 leaves a writer out: "partial" edits the embedding at 0.5, attention of
    # layers 1 and 2 and MLP of layers 0, 2 and 3.
    summary = bake(make_model(family_name), build("partial"))
    assert summary.writers_by_role == {"embedding": 1, "attention": 2, "mlp": 3}
    expected = _writer_names(
        family_name, {"embedding": [None], "attention": [1, 2], "mlp": [0, 2, 3]}
    )
    assert sorted(summary.tensors) == sorted(expected)
    d = unit(64, 1)
    no_embedding = Ablation(d, 0.0, (0.0, 0.0, 0.0, 1.0), (0.0,) * N_LAYERS)
    summary = bake(make_model(family_name), no_embedding)
    assert summary.writers_by_role == {"attention": 1}
    assert sorted(summary.tensors) == sorted(_writer_names(family_name, {"attention": [3]}))


class DictStore:
    """A weight store over a dict of tensors, as a streamed checkpoint would be."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.written: list[str] = []

    def has(self, name: str) -> bool:
        return name in self.tensors

    def locate(self, writer: Writer) -> Writer:
        return writer  # keyed by the model's own parameter names

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @contextmanager
    def writable(self, name: str) -> Iterator[torch.Tensor]:
        self.written.append(name)
        yield self.tensors[name]


@pytest.mark.parametrize("variant", ["partial", "norm_preserving_then_norm_preserving_partial"])
def test_apply_edit_from_config_json_to_any_store_equals_baking_the_live_model(
    variant: str, family: str, make_model: Callable[[str], Any]
) -> None:
    model = make_model(family)
    checkpoint = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = {k: v.clone() for k, v in checkpoint.items()}
    anatomy = Anatomy.from_config(model.config.to_dict())  # no live model needed
    edit = build(variant)
    store = DictStore(checkpoint)
    summary = apply_edit(edit, store, anatomy)
    assert summary == bake(model, edit)
    for name, tensor in model.state_dict().items():
        assert torch.equal(checkpoint[name], tensor), name
    # Only the tensors the summary names were written, and they all changed.
    assert set(store.written) == set(summary.tensors)
    changed = {k for k in checkpoint if not torch.equal(checkpoint[k], original[k])}
    assert changed == set(summary.tensors)


def test_edit_summary_is_empty_by_default() -> None:
    assert EditSummary().to_dict() == {"n_tensors": 0, "writers_by_role": {}}


# --- fused experts ---------------------------------------------------------------------------

EXPERTS, D, D_IN = 3, 6, 5


class Experts(nn.Module):
    """Every expert's write for one input: a fused ``(experts, d_model, d_in)`` weight, or its
    transpose ``(experts, d_in, d_model)``."""

    def __init__(self, layout: Layout) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        shape = (EXPERTS, D, D_IN) if layout == "fused" else (EXPERTS, D_IN, D)
        self.weight = nn.Parameter(torch.randn(shape, generator=g))
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.layout == "fused" else self.weight.transpose(1, 2)
        return torch.einsum("edi,bi->ebd", w, x)  # (experts, batch, d_model)


def _toy(layout: Layout) -> tuple[Experts, Anatomy, BoundAnatomy]:
    """A one-layer "model" whose only residual writers are the experts of a fused tensor."""
    toy = Experts(layout)
    writers = tuple(
        Writer("expert", 0, "", "weight", None, layout, expert=e) for e in range(EXPERTS)
    )
    anatomy = Anatomy("toy", 1, D, FAMILIES[0], writers)
    bound = BoundAnatomy(
        anatomy=anatomy, model=toy, body=toy, embedding=toy, layers=(), mid_modules=(),
        lm_head=toy, writers=tuple(BoundWriter(w, toy) for w in writers),
    )  # fmt: skip
    return toy, anatomy, bound


@pytest.mark.parametrize("layout", ["fused", "fused_t"])
@pytest.mark.parametrize("norm_preserving", [False, True])
def test_fused_swap_edits_one_expert_and_restores_the_weight_exactly(
    layout: Layout, norm_preserving: bool
) -> None:
    toy, _, bound = _toy(layout)
    d = unit(D, 3).vector
    edit = ProjectionEdit(basis=d, strength=1.0, norm_preserving=norm_preserving, embedding=False)
    before = toy.weight.detach().clone()
    expected = edit.columns(canonical(before, layout, 1), 0)  # (d_model, d_in)
    x = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(1))
    with _swapped(bound.writers[1], [edit]):
        assert torch.equal(canonical(toy.weight.detach(), layout, 1), expected)
        for e in (0, 2):  # the other experts are untouched
            assert torch.equal(
                canonical(toy.weight.detach(), layout, e), canonical(before, layout, e)
            )
        with torch.no_grad():
            writes = toy(x)
        assert float((writes[1] @ d).abs().max()) < 1e-5  # expert 1 writes nothing along d
        assert float((writes[0] @ d).abs().max()) > 1e-2
    assert torch.equal(toy.weight.detach(), before)  # restored bit for bit
    with pytest.raises(RuntimeError, match="boom"), _swapped(bound.writers[1], [edit]):
        raise RuntimeError("boom")
    assert torch.equal(toy.weight.detach(), before)


@pytest.mark.parametrize("layout", ["fused", "fused_t"])
def test_fused_writers_under_hooks_equal_the_baked_weights(layout: Layout) -> None:
    toy, anatomy, bound = _toy(layout)
    before = toy.weight.detach().clone()
    edit = Ablation(unit(D, 3), 0.0, (0.0,), (1.0,), mode="norm_preserving").then(
        Ablation(unit(D, 4), 0.0, (0.0,), (0.5,))
    )
    x = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(1))
    with edit_hooks(toy, edit, bound), torch.no_grad():
        hooked = toy(x)
    assert torch.equal(toy.weight.detach(), before)
    baked = copy.deepcopy(toy)
    summary = apply_edit(edit, ModuleStore(baked), anatomy)
    assert summary.writers_by_role == {"expert": EXPERTS}
    assert summary.tensors == ["weight"]  # one fused tensor, named once
    with torch.no_grad():
        assert torch.allclose(hooked, baked(x), atol=1e-6)
        assert not torch.allclose(hooked, toy(x), atol=1e-2)
