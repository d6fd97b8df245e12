"""Steering: strength 0 is the identity, hooks equal baked weights, the addition lands exactly at
its site, control vectors read back, and exports keep (or refuse) the biases a bake creates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_errors import one_error

from abliterate.core.directions import Direction, DirectionSet
from abliterate.core.edits import load_edit
from abliterate.core.steering import Steering
from abliterate.edit.biases import declare_biases
from abliterate.edit.control_vector import (
    control_vector_layers,
    read_control_vector,
    write_control_vector,
)
from abliterate.edit.export import save_model, verify_export
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.lora import lora_from_edit
from abliterate.edit.steering import read_directions, removal, require_targets
from abliterate.edit.weights import bake
from abliterate.errors import ConfigError, EditError
from abliterate.measure.activations import site_hooks
from abliterate.model.anatomy import anatomy_of
from abliterate.model.stores import ModuleStore
from abliterate.types import Site


def logits(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model(**enc).logits  # (batch, pos, vocab)


def direction_set(model: Any, site: Site = "post", seed: int = 3) -> DirectionSet:
    arch = anatomy_of(model)
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(arch.n_layers, arch.d_model, generator=g)
    return DirectionSet(vectors, tuple(range(arch.n_layers)), site=site, description="random")


def test_strength_zero_is_the_identity(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("qwen2")
    steering = Steering(direction_set(model), 0.0)
    arch = anatomy_of(model)
    assert all(steering.writer_edit(arch.writer_info(w)) is None for w in arch.writers)
    plain = logits(model, tokenizer, texts)
    with edit_hooks(model, steering):
        assert torch.equal(logits(model, tokenizer, texts), plain)
    bake(model, steering)
    assert torch.equal(logits(model, tokenizer, texts), plain)
    assert not any(n.endswith("down_proj.bias") for n, _ in model.named_parameters())


@pytest.mark.parametrize(("site", "layers"), [("post", (0, 3)), ("pre", (1, 2)), ("mid", (1,))])
def test_baked_steering_equals_hooks(
    family: str,
    site: Site,
    layers: tuple[int, ...],
    make_model: Callable[[str], Any],
    tokenizer: Any,
    texts: list[str],
) -> None:
    model = make_model(family)
    steering = Steering(direction_set(model, site), 0.7, layers)
    original = logits(model, tokenizer, texts)
    with edit_hooks(model, steering):
        hooked = logits(model, tokenizer, texts)
    assert not torch.allclose(hooked, original, atol=1e-3)
    bake(model, steering)  # writers without a bias get one (Qwen2 and Gemma: no o/down bias)
    assert torch.allclose(logits(model, tokenizer, texts), hooked, atol=1e-4, rtol=1e-4)


def test_biases_are_created_only_where_the_edit_is_baked_in_memory(
    make_model: Callable[[str], Any],
) -> None:
    # A LoRA adapter (and GGUF, through the same plan) holds no new bias: the addition would be
    # dropped, so it is refused before anything is computed, and the model keeps no bias.
    model = make_model("qwen2")  # o_proj and down_proj have no bias
    steering = Steering(direction_set(model), 0.5, (1,))
    with pytest.raises(ValueError, match="in-memory model"):
        lora_from_edit(steering, ModuleStore(model), anatomy_of(model).anatomy)
    assert not any(n.endswith("down_proj.bias") for n, _ in model.named_parameters())
    bake(model, steering)
    assert any(n.endswith("1.mlp.down_proj.bias") for n, _ in model.named_parameters())


@pytest.mark.parametrize("site", ["pre", "mid", "post"])
def test_the_addition_lands_exactly_at_its_site(
    site: Site, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("llama")
    arch = anatomy_of(model)
    dset = direction_set(model, site)
    steering = Steering(dset, 1.5, (2,))
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    seen: dict[bool, torch.Tensor] = {}

    def run(steered: bool) -> None:
        def keep(layer: int, _s: int, hidden: torch.Tensor) -> None:
            if layer == 2:
                seen[steered] = hidden.detach().clone()

        with torch.no_grad(), site_hooks(arch, (site,), keep):
            if steered:
                with edit_hooks(model, steering):
                    model(**enc)
            else:
                model(**enc)

    run(False)
    run(True)
    # Nothing before the site changed, so the residual there differs by exactly 1.5 v.
    difference = seen[True] - seen[False]  # (batch, pos, d_model)
    expected = (1.5 * dset.vectors[2]).expand_as(difference)
    assert torch.allclose(difference, expected, atol=1e-5)


def test_steering_round_trips_through_files(
    make_model: Callable[[str], Any], tmp_path: Path
) -> None:
    model = make_model("qwen2")
    steering = Steering(direction_set(model, "pre"), -2.5, (1, 2))
    steering.save(tmp_path / "edit")
    assert load_edit(tmp_path / "edit") == steering
    dset = direction_set(model)
    dset.save(tmp_path / "set.safetensors")
    assert read_directions(tmp_path / "set.safetensors", 2.0, None) == Steering(dset, 2.0)


def test_a_single_direction_steers_at_its_layer_and_scale(tmp_path: Path) -> None:
    unit = Direction(torch.tensor([0.6, 0.8, 0.0]), layer=4, site="pre", scale=5.0)
    unit.save(tmp_path / "direction")
    steering = read_directions(tmp_path / "direction.safetensors", 2.0, None)
    assert steering.steered_layers == (4,) and steering.site == "pre"
    assert torch.allclose(steering.vector_at(4), torch.tensor([6.0, 8.0, 0.0]))
    with pytest.raises(ConfigError, match="one direction"):
        read_directions(tmp_path / "direction.safetensors", 1.0, (3,))
    with pytest.raises(ConfigError, match="does not exist"):
        read_directions(tmp_path / "missing.safetensors", 1.0, None)


def test_steering_refuses_bad_layers_and_sites(make_model: Callable[[str], Any]) -> None:
    model = make_model("qwen2")
    dset = direction_set(model)
    with pytest.raises(ValueError, match="cannot steer layers"):
        Steering(dset, 1.0, (9,))
    with pytest.raises(ValueError, match="residual site"):
        Steering(DirectionSet(dset.vectors, dset.layers), 1.0)
    wide = DirectionSet(torch.ones(1, 8), (0,), site="post")
    with pytest.raises(ConfigError, match="d_model"):
        require_targets(Steering(wide, 1.0), anatomy_of(model))
    # Site "pre" of layer 0 is the embedding's (possibly rescaled) output: refused everywhere.
    at_embedding = Steering(direction_set(model, "pre"), 1.0, (0, 1))
    with pytest.raises(ConfigError, match="token embedding"):
        require_targets(at_embedding, anatomy_of(model))
    with pytest.raises(ValueError, match="token embedding"), edit_hooks(model, at_embedding):
        pass


def test_removal_ablates_each_chosen_layer(make_model: Callable[[str], Any]) -> None:
    model = make_model("llama")
    dset = direction_set(model)
    ablation = removal(Steering(dset, 1.0, (1, 3)), 4)
    assert ablation.attention == (0.0, 1.0, 0.0, 1.0) == ablation.mlp and ablation.embedding == 0
    assert ablation.layer_directions is not None
    unit = dset.vectors[3] / dset.vectors[3].norm()
    assert torch.allclose(ablation.layer_directions[3].vector, unit)


def test_control_vector_reads_back_with_gguf_reader(
    make_model: Callable[[str], Any], tmp_path: Path
) -> None:
    import gguf

    model = make_model("qwen2")
    dset = direction_set(model, "pre")
    steering = Steering(dset, 1.5, (2, 3))
    path = write_control_vector(steering, tmp_path / "cv.gguf", "qwen2")
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "qwen2"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    # Site "pre" of layer L is llama.cpp's output of layer L - 1.
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.2"]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
    hint, vectors = read_control_vector(path)
    assert hint == "qwen2"
    assert sorted(vectors) == [1, 2]
    for layer in (2, 3):
        assert torch.equal(vectors[layer - 1], 1.5 * dset.vectors[layer])


def test_control_vector_refuses_what_llama_cpp_cannot_add(make_model: Callable[[str], Any]) -> None:
    model = make_model("qwen2")
    with pytest.raises(EditError, match="'mid'"):
        control_vector_layers(Steering(direction_set(model, "mid"), 1.0))
    with pytest.raises(EditError, match="layer 0's output"):
        control_vector_layers(Steering(direction_set(model, "post"), 1.0, (0, 1)))
    with pytest.raises(EditError, match="layer 0's output"):
        control_vector_layers(Steering(direction_set(model, "pre"), 1.0, (1, 2)))
    assert set(control_vector_layers(Steering(direction_set(model, "post"), 1.0, (1, 3)))) == {1, 3}


def test_export_declares_created_biases_where_the_config_can(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    from transformers import LlamaConfig

    model = make_model("llama")  # the fixture's llama has biases already: use one without
    config = LlamaConfig(**{**model.config.to_dict(), "attention_bias": False, "mlp_bias": False})
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    bake(model, Steering(direction_set(model, "post"), 0.9, (1, 2)))
    assert declare_biases(model) == ["mlp_bias"]
    assert model.config.mlp_bias and not model.config.attention_bias
    # Every MLP projection now has a bias: zero except the steered down projections.
    assert torch.count_nonzero(model.get_parameter("model.layers.0.mlp.gate_proj.bias")) == 0
    assert torch.count_nonzero(model.get_parameter("model.layers.1.mlp.down_proj.bias")) > 0
    save_model(model, tokenizer, tmp_path / "model", {})
    assert verify_export(model, tokenizer, tmp_path / "model", texts) < 1e-4


def test_export_refuses_biases_the_config_cannot_declare(make_model: Callable[[str], Any]) -> None:
    model = make_model("qwen2")
    assert declare_biases(model) == []  # nothing created: nothing to declare
    bake(model, Steering(direction_set(model, "post"), 0.9, (1,)))
    with pytest.raises(EditError, match="'qwen2' config cannot declare"):
        declare_biases(model)


@pytest.mark.parametrize("command", ["steer", "detox"])
def test_commands_that_change_weights_refuse_a_quantized_load(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "--model", "demo", "--load-in", "4bit", "--out", str(tmp_path / "o")]
    if command == "steer":
        argv += ["--direction", str(tmp_path / "d.safetensors")]
    msg = one_error(argv, capsys)
    assert "--load-in 4bit" in msg and "full-precision" in msg
