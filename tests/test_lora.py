"""LoRA adapters: exact low-rank factors of an edit, PEFT adapters that merge into the edited
model, and their conversion to llama.cpp's GGUF LoRA format."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.edit.gguf import peft_to_gguf_lora, read_gguf_lora
from abliterate.edit.lora import (
    LowRank,
    lora_from_edit,
    low_rank_delta,
    merge_peft,
    read_peft,
    save_peft,
)
from abliterate.edit.weights import apply_edit, bake, writer_info
from abliterate.errors import ExportError
from abliterate.model.anatomy import Anatomy, Family, Writer, WriterSlot, anatomy_of, canonical
from abliterate.model.stores import ModuleStore


def _direction(d_model: int, seed: int = 0) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(d_model, generator=g)).normalized()


def _adapter_for(model: Any, edit: Ablation) -> Any:
    return lora_from_edit(edit, ModuleStore(model), anatomy_of(model).anatomy, base_model="tiny")


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 11], [7, 7, 300, 45, 2, 1, 60]])


def test_plain_projection_is_rank_one_per_matrix(make_model: Callable[[str], Any]) -> None:
    model = make_model("qwen2")
    edit = Ablation.uniform(_direction(64), n_layers=4, strength=0.7)
    adapter = _adapter_for(model, edit)
    assert adapter.rank == 1
    anatomy = anatomy_of(model).anatomy
    store = ModuleStore(model)
    v = edit.direction.vector
    for writer, delta in adapter.deltas.values():
        w = canonical(store.read(writer.tensor), writer.layout).float()
        # ΔW = -s v (vᵀ W): B is ±v, A is ∓s vᵀW.
        expected = -0.7 * torch.outer(v, v @ w)
        torch.testing.assert_close(delta.b @ delta.a, expected, atol=1e-5, rtol=1e-4)
        assert delta.b.shape == (64, 1)
        assert torch.allclose(delta.b[:, 0].abs(), v.abs(), atol=1e-6)
    assert len(adapter.deltas) == len(anatomy.writers)


def test_several_directions_are_rank_k(make_model: Callable[[str], Any]) -> None:
    model = make_model("llama")
    extras = (_direction(64, 1), _direction(64, 2))
    edit = Ablation(_direction(64), 1.0, (1.0,) * 4, (1.0,) * 4, extra_directions=extras)
    adapter = _adapter_for(model, edit)
    assert adapter.rank == 3
    assert {d.rank for _, d in adapter.deltas.values()} == {3}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_merged_adapter_reproduces_the_edited_model(
    family: str, make_model: Callable[[str], Any], tmp_path: Path
) -> None:
    """llama: biases on the writers (PEFT's bias="lora_only"); qwen2 and gemma: a token
    embedding tied to the head, which the edit unties and merge_peft unties before merging."""
    model = make_model(family)
    base = copy.deepcopy(model)
    edit = Ablation.uniform(_direction(64), n_layers=4, strength=1.0)
    adapter = _adapter_for(model, edit)
    files = save_peft(adapter, tmp_path / "adapter")
    assert [f.name for f in files] == ["adapter_model.safetensors", "adapter_config.json"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 1
    bake(model, edit)
    merged = merge_peft(base, tmp_path / "adapter")
    torch.testing.assert_close(_logits(merged, IDS), _logits(model, IDS), atol=2e-4, rtol=0)


def test_unmerged_adapter_on_a_tied_model_keeps_the_head(
    make_model: Callable[[str], Any], tmp_path: Path
) -> None:
    from peft import PeftModel

    model = make_model("qwen2")
    base = copy.deepcopy(model)
    edit = Ablation.uniform(_direction(64), n_layers=4)
    save_peft(_adapter_for(model, edit), tmp_path / "adapter")
    bake(model, edit)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_logits(peft_model, IDS), _logits(model, IDS), atol=2e-4, rtol=0)


def test_norm_preserving_edit_is_refused(make_model: Callable[[str], Any]) -> None:
    model = make_model("qwen2")
    edit = Ablation(_direction(64), 1.0, (1.0,) * 4, (1.0,) * 4, mode="norm_preserving")
    with pytest.raises(ExportError, match="full-rank"):
        _adapter_for(model, edit)


def test_low_rank_delta_of_composed_edits_is_exact() -> None:
    """Two projections in turn: the change lies in the span of both bases (rank 2)."""
    w = torch.randn(32, 48)
    first = Ablation.uniform(_direction(32, 1), 1, 0.5)
    second = Ablation.uniform(_direction(32, 2), 1, 1.0)
    composite = first.then(second)
    info = writer_info(
        Writer("attention", 0, "m", "m.weight", None, "linear"), ModuleStore(torch.nn.Linear(1, 1)),
        Anatomy("llama", 1, 32, Family(model_types=("llama",), writers=()), ()),
    )  # fmt: skip
    edits = composite.writer_edits(info)
    delta = low_rank_delta(edits, w)
    expected = w.clone()
    for e in edits:
        expected = e.columns(expected, 0)
    assert delta.rank == 2
    torch.testing.assert_close(w + delta.b @ delta.a, expected, atol=1e-5, rtol=0)
    padded = delta.padded(4)
    torch.testing.assert_close(padded.b @ padded.a, delta.b @ delta.a)


def _moe_anatomy(model: Any) -> Anatomy:
    """A Qwen3-MoE anatomy written out in the test: attention outputs and every routed expert's
    down projection, stored fused as (experts, d_model, d_ff)."""
    config = model.config
    table = Family(
        model_types=("qwen3_moe",), writers=(WriterSlot("attention", "self_attn.o_proj"),)
    )
    writers = [Writer("embedding", None, "model.embed_tokens", "model.embed_tokens.weight", None,
                      "embedding")]  # fmt: skip
    for i in range(config.num_hidden_layers):
        base = f"model.layers.{i}"
        o = f"{base}.self_attn.o_proj"
        writers.append(Writer("attention", i, o, f"{o}.weight", None, "linear"))
        for e in range(config.num_experts):
            module = f"{base}.mlp.experts"
            writers.append(
                Writer("expert", i, module, f"{module}.down_proj", None, "fused", expert=e)
            )
    return Anatomy("qwen3_moe", config.num_hidden_layers, config.hidden_size, table, tuple(writers))


def test_fused_experts_through_parameter_targeting(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    base = copy.deepcopy(model)
    anatomy = _moe_anatomy(model)
    edit = Ablation.uniform(_direction(64), n_layers=2)
    adapter = lora_from_edit(edit, ModuleStore(model), anatomy)
    save_peft(adapter, tmp_path / "adapter")
    peft_config, tensors = read_peft(tmp_path / "adapter")
    assert sorted(peft_config["target_parameters"]) == [
        "model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]  # fmt: skip
    assert tensors["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape == (4, 32)
    apply_edit(edit, ModuleStore(model), anatomy)
    merged = merge_peft(base, tmp_path / "adapter")
    torch.testing.assert_close(_logits(merged, IDS), _logits(model, IDS), atol=2e-4, rtol=0)


def test_peft_adapter_converts_to_gguf_lora(
    make_model: Callable[[str], Any], tmp_path: Path
) -> None:
    import gguf

    model = make_model("qwen2")
    edit = Ablation.uniform(_direction(64), n_layers=4, strength=0.5)
    adapter = _adapter_for(model, edit)
    save_peft(adapter, tmp_path / "adapter")
    anatomy = anatomy_of(model).anatomy
    with pytest.raises(ExportError, match="output head"):  # llama.cpp would apply it to the head
        peft_to_gguf_lora(tmp_path / "adapter", anatomy, "qwen2", tmp_path / "a.gguf",
                          tied_head=True)  # fmt: skip
    rank = peft_to_gguf_lora(tmp_path / "adapter", anatomy, "qwen2", tmp_path / "a.gguf")
    assert rank == 1
    meta, deltas = read_gguf_lora(tmp_path / "a.gguf")
    assert meta == {"type": "adapter", "adapter_type": "lora", "alpha": 1.0,
                    "architecture": "qwen2"}  # fmt: skip
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}  # ggml order
    # llama.cpp's checks: lora_a.ne[0] = n_in, lora_b.ne[1] = n_out; the embedding flipped.
    assert shapes["blk.0.ffn_down.weight.lora_a"] == (128, 1)
    assert shapes["blk.0.ffn_down.weight.lora_b"] == (1, 64)
    assert shapes["token_embd.weight.lora_a"] == (1, 400)
    assert shapes["token_embd.weight.lora_b"] == (1, 64)
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "blk.2.attn_output.weight": "model.layers.2.self_attn.o_proj.weight"}  # fmt: skip
    for g, hf in names.items():
        d: LowRank = deltas[g]
        writer = next(w for w, _ in adapter.deltas.values() if w.tensor == hf)
        expected = adapter.deltas[writer.name][1]
        torch.testing.assert_close(d.b @ d.a, expected.b @ expected.a)


def test_gguf_lora_refuses_bias_changes(make_model: Callable[[str], Any], tmp_path: Path) -> None:
    model = make_model("llama")  # biases on the writers
    save_peft(_adapter_for(model, Ablation.uniform(_direction(64), 4)), tmp_path / "adapter")
    with pytest.raises(ExportError, match="biases"):
        peft_to_gguf_lora(tmp_path / "adapter", anatomy_of(model).anatomy, "llama",
                          tmp_path / "a.gguf")  # fmt: skip
