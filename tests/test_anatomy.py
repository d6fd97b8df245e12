"""The anatomy table: resolved from a config alone, bound to a live model, complete (the residual
stream is the sum of the writes it names), and precise about what it cannot edit; canonical
weight views of every layout write through to the stored tensor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from abliterate.errors import AbliterateError, UnsupportedArchitectureError
from abliterate.model.anatomy import Anatomy, Layout, anatomy_of, canonical, supported_model_types
from abliterate.model.families import BY_TYPE

N_LAYERS, D_MODEL = 4, 64  # the conftest models


def test_supported_families_are_the_table_minus_the_refused_ones() -> None:
    supported = supported_model_types()
    assert supported == sorted(supported)
    assert {"gemma", "llama", "mistral", "qwen2", "qwen3"} <= set(supported)
    assert len(supported) >= 30
    assert set(supported) == {t for t, f in BY_TYPE.items() if f.refused is None}
    assert all(BY_TYPE[t].refused is not None for t in set(BY_TYPE) - set(supported))


def test_from_config_is_the_same_from_a_live_config_and_from_config_json(
    family: str, make_model: Callable[[str], Any], tmp_path: Path
) -> None:
    model = make_model(family)
    live = Anatomy.from_config(model.config)
    model.config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert Anatomy.from_config(model.config.to_dict()) == live
    assert Anatomy.from_config(on_disk) == live
    assert (live.family, live.n_layers, live.d_model) == (family, N_LAYERS, D_MODEL)
    assert live.describe() == (
        f"{family}: 4 layers, d_model=64, residual writers = 1 embedding + 4 attention + 4 mlp"
    )
    # Golden names, embedding first and then layer by layer.
    assert [(w.role, w.layer, w.tensor) for w in live.writers] == [
        ("embedding", None, "model.embed_tokens.weight"),
        *(
            (role, i, f"model.layers.{i}.{module}.weight")
            for i in range(N_LAYERS)
            for role, module in (("attention", "self_attn.o_proj"), ("mlp", "mlp.down_proj"))
        ),
    ]
    assert all(w.layout == ("embedding" if w.layer is None else "linear") for w in live.writers)
    assert all(not w.post_norms and w.expert is None for w in live.writers)
    # Every name it gives is a tensor of the checkpoint; a declared bias exists exactly where
    # the module has one (the tiny llama has writer biases, qwen2 and gemma have none).
    names = set(model.state_dict())
    assert {w.tensor for w in live.writers} <= names
    biases = {w.bias for w in live.writers if w.bias is not None}
    assert len(biases) == 2 * N_LAYERS
    expected_biases = biases if family == "llama" else set()
    assert biases & names == expected_biases


def test_bind_finds_the_live_modules(family: str, make_model: Callable[[str], Any]) -> None:
    model = make_model(family)
    bound = anatomy_of(model)
    assert bound.embedding is model.get_input_embeddings()
    assert bound.lm_head is model.get_output_embeddings()
    assert bound.layers == tuple(model.model.layers)
    assert bound.body is model.model
    assert bound.mid_modules == tuple(layer.post_attention_layernorm for layer in bound.layers)
    assert bound.modules("mlp") == [layer.mlp.down_proj for layer in bound.layers]
    for w in bound.writers:
        assert w.module is model.get_submodule(w.writer.module)
        param = model.get_parameter(w.writer.tensor)
        view = w.weight()
        # The canonical (d_model, d_in) view of the live parameter, not a copy.
        assert view.shape[0] == D_MODEL
        assert view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
        info = bound.writer_info(w)
        assert (info.name, info.role, info.layer, info.norm_gain) == (
            w.writer.tensor, w.writer.role, w.writer.layer, None,
        )  # fmt: skip
    assert [w.weight().shape[1] for w in bound.writers[:3]] == [
        model.config.vocab_size,
        D_MODEL,
        model.config.intermediate_size,
    ]


def test_the_residual_stream_is_the_sum_of_the_writes_the_anatomy_names(
    family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    """The table is complete: the last layer's output is the embedding's output plus every
    writer's output, at every position (Gemma's sqrt(d_model) embedding scale is inside its
    embedding module)."""
    model = make_model(family)
    bound = anatomy_of(model)
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(_m: Any, _a: Any, out: Any) -> None:
            outputs[name] = (out[0] if isinstance(out, tuple) else out).detach().double()

        return hook

    handles = [w.module.register_forward_hook(keep(w.writer.name)) for w in bound.writers]
    handles.append(bound.layers[-1].register_forward_hook(keep("stream")))
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        model(**enc)
    for h in handles:
        h.remove()
    total = outputs[bound.writers[0].writer.name]
    for w in bound.writers[1:]:
        total = total + outputs[w.writer.name]
    stream = outputs["stream"]  # (batch, pos, d_model)
    assert float((stream - total).abs().max() / stream.abs().max()) < 1e-5
    # Leaving out any one writer breaks the sum, so the check can fail.
    for w in bound.writers[1:]:
        partial = total - outputs[w.writer.name]
        assert float((stream - partial).abs().max() / stream.abs().max()) > 1e-3, w.writer.name


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "gpt2", "n_layer": 2}, "unsupported architecture 'gpt2'"),
        ({}, "unsupported architecture 'unknown'"),
        ({"model_type": "minimax", "num_hidden_layers": 2}, "'minimax' models cannot be edited"),
        (
            {"model_type": "gemma3n", "text_config": {"model_type": "gemma3n_text"}},
            "'gemma3n_text' models cannot be edited",
        ),
        ({"model_type": "llama", "num_hidden_layers": 0}, "the 'llama' config declares no"),
    ],
    ids=["unknown", "no-model-type", "refused", "refused-text-config", "no-layers"],
)
def test_unknown_or_refused_family_raises_naming_it(config: dict[str, Any], message: str) -> None:
    with pytest.raises(UnsupportedArchitectureError, match=message) as info:
        Anatomy.from_config(config)
    assert isinstance(info.value, AbliterateError)  # the CLI prints it as one line
    if "declares no" not in message:  # the user learns what would work
        assert ", ".join(supported_model_types()) in str(info.value)


def test_a_refused_live_config_names_its_family_and_why() -> None:
    from transformers import MiniMaxConfig

    with pytest.raises(UnsupportedArchitectureError, match=r"'minimax' models.*replaces its resid"):
        Anatomy.from_config(MiniMaxConfig(num_hidden_layers=2))


def test_bind_names_what_is_missing_or_of_the_wrong_kind(make_model: Callable[[str], Any]) -> None:
    model = make_model("llama")
    deeper = Anatomy.from_config({**model.config.to_dict(), "num_hidden_layers": 5})
    with pytest.raises(UnsupportedArchitectureError, match=r"cannot find 'model\.layers\.4'"):
        deeper.bind(model)
    model.model.layers[1].mlp.down_proj = nn.Sequential(model.model.layers[1].mlp.down_proj)
    with pytest.raises(
        UnsupportedArchitectureError,
        match=r"'model\.layers\.1\.mlp\.down_proj' of the 'llama' model is a Sequential, not a "
        "Linear layer",
    ):
        anatomy_of(model)
    with pytest.raises(UnsupportedArchitectureError, match="has no transformers config"):
        anatomy_of(nn.Linear(2, 2))


# --- canonical views -------------------------------------------------------------------------

D, D_IN, EXPERTS, EXPERT = 3, 5, 4, 2


def _stored(layout: Layout, canonical_weight: torch.Tensor) -> torch.Tensor:
    """A tensor stored in ``layout`` whose canonical view (expert EXPERT) is ``canonical_weight``;
    the other experts hold other values."""
    if layout == "linear":
        return canonical_weight.clone()
    if layout in ("linear_t", "embedding"):
        return canonical_weight.T.clone()
    others = torch.arange(EXPERTS * D * D_IN, dtype=torch.float32).view(EXPERTS, D, D_IN) + 100
    others[EXPERT] = canonical_weight
    return others if layout == "fused" else others.transpose(1, 2).contiguous()


@pytest.mark.parametrize("layout", ["linear", "linear_t", "embedding", "fused", "fused_t"])
def test_canonical_views_write_through_for_every_layout(layout: Layout) -> None:
    w = torch.arange(D * D_IN, dtype=torch.float32).view(D, D_IN)  # (d_model, d_in)
    stored = _stored(layout, w)
    expert = EXPERT if layout.startswith("fused") else None
    view = canonical(stored, layout, expert)
    assert view.shape == (D, D_IN) and torch.equal(view, w)
    assert view.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()
    before = stored.clone()
    view[1, 4] = -1.0  # write vector 4, output coordinate 1
    assert int((stored != before).sum()) == 1  # one element changed, in place
    assert float(canonical(stored, layout, expert)[1, 4]) == -1.0
    view.copy_(-w)  # a whole rewrite goes through too, and touches no other expert
    assert torch.equal(canonical(stored, layout, expert), -w)
    changed = stored != before
    assert int(changed.sum()) == D * D_IN - 1  # w[0, 0] is 0 and -0.0 == 0.0
    if expert is not None:
        for e in range(EXPERTS):
            if e != expert:
                assert torch.equal(canonical(stored, layout, e), canonical(before, layout, e))


@pytest.mark.parametrize("layout", ["fused", "fused_t"])
def test_a_fused_view_needs_an_expert(layout: Layout) -> None:
    with pytest.raises(ValueError, match=f"a '{layout}' weight needs an expert index"):
        canonical(torch.zeros(EXPERTS, D, D_IN), layout)
