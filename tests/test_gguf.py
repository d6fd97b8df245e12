"""GGUF out (a model written as GGUF reads back with matching logits) and GGUF in place
(untouched tensors byte-identical, touched ones requantized to their own type, K-quants through a
GGUF LoRA adapter that merges to the edit)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from abliterate.cli import main
from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.edit.checks import load_gguf_model, logit_difference
from abliterate.edit.gguf import adapter_path, apply_gguf, read_gguf_lora
from abliterate.edit.gguf_export import TensorSource, export_gguf, write_gguf
from abliterate.edit.lora import apply_writer_edits
from abliterate.edit.weights import bake, writer_info
from abliterate.errors import ExportError
from abliterate.model.anatomy import canonical
from abliterate.model.gguf_store import GGUFStore, field_value

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


def _direction(d_model: int = 64, seed: int = 0) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(d_model, generator=g)).normalized()


def _model(family: str, tokenizer: Any, **overrides: Any) -> Any:
    """A tiny random model of ``family`` (the conftest shapes, with overrides)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    common.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **common)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    return model


# --- GGUF out ------------------------------------------------------------------------------------

# Measured on these tiny models (weights of std 0.2, so larger logits than real models have):
# f32 exact; f16 0.027, bf16 0.23, q8_0 0.47 max |Δ logit|; bounds leave about 2x room.
BOUNDS = {"f32": (1e-5, 1e-9), "f16": (0.1, 1e-4), "bf16": (0.5, 2e-3), "q8_0": (1.0, 1e-2)}
CASES = [("qwen2", t) for t in BOUNDS] + [("llama", "f16"), ("llama", "q8_0"),
                                          ("qwen3", "bf16"), ("mistral", "q8_0")]  # fmt: skip


@pytest.mark.parametrize(("family", "out_type"), CASES)
def test_gguf_out_reads_back_with_matching_logits(
    family: str, out_type: str, tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    extra = {"attention_bias": True, "mlp_bias": True} if family == "llama" else {}
    model = _model(family, tokenizer, tie_word_embeddings=family == "qwen2", **extra)
    path = tmp_path / f"m-{out_type}.gguf"
    result = export_gguf(model, tokenizer, path, out_type, name="tiny")
    assert result.size == path.stat().st_size and not result.fallback
    reader = gguf.GGUFReader(path)
    arch = "llama" if family == "mistral" else family
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.block_count"].contents() == 4
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == T[out_type.upper()]
    assert types["blk.0.attn_norm.weight"] == T.F32
    assert ("output.weight" in types) == (family != "qwen2")  # a tied head is token_embd
    diff = logit_difference(model, load_gguf_model(path), tokenizer, texts[:3])
    max_logit, max_kl = BOUNDS[out_type]
    assert diff.max_abs_logit <= max_logit and diff.mean_kl <= max_kl, diff


def test_gguf_out_tokenizer_round_trips(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    path = tmp_path / "m.gguf"
    export_gguf(make_model("qwen2"), tokenizer, path, "f16", name="tiny")
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in texts:
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert back.chat_template == tokenizer.chat_template
    reader = gguf.GGUFReader(path)
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[tokenizer.convert_tokens_to_ids("<|user|>")] == gguf.TokenType.CONTROL
    assert types[tokenizer.convert_tokens_to_ids("Ġthe")] == gguf.TokenType.NORMAL
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id


def test_gguf_out_copies_a_source_tokenizer_exactly(
    make_model: Callable[[str], Any], tokenizer: Any, tmp_path: Path
) -> None:
    model = make_model("qwen2")
    first = tmp_path / "a.gguf"
    export_gguf(model, tokenizer, first, "f16", name="tiny")
    second = tmp_path / "b.gguf"
    export_gguf(model, tokenizer, second, "q8_0", name="tiny", tokenizer_gguf=first)
    fa, fb = gguf.GGUFReader(first).fields, gguf.GGUFReader(second).fields
    keys = [k for k in fa if k.startswith("tokenizer.")]
    assert keys and all(field_value(fa[k]) == field_value(fb[k]) for k in keys)


def test_a_checkpoint_is_written_tensor_by_tensor(
    make_model: Callable[[str], Any], tokenizer: Any, tmp_path: Path
) -> None:
    """write_gguf reading a safetensors checkpoint one tensor at a time writes the same bytes
    as the export of the loaded model."""
    from safetensors import safe_open

    model = make_model("qwen2")
    model.save_pretrained(tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        names = [n for n in model.state_dict() if n in f.keys()]  # noqa: SIM118
        source = TensorSource({n: tuple(f.get_slice(n).get_shape()) for n in names}, f.get_tensor)
        write_gguf(model.config, source, tokenizer, tmp_path / "a.gguf", "q8_0", name="tiny")
    export_gguf(model, tokenizer, tmp_path / "b.gguf", "q8_0", name="tiny")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_gemma_is_written_with_llama_cpp_norm_convention(tokenizer: Any, tmp_path: Path) -> None:
    """transformers 5 cannot load gemma GGUF files, so the tensors are read back here."""
    model = _model("gemma", tokenizer, head_dim=16, tie_word_embeddings=True)
    path = tmp_path / "g.gguf"
    export_gguf(model, tokenizer, path, "f32", name="tiny")
    store = GGUFStore(path)
    stored = gguf.GGUFReader(path).tensors
    raw = {t.name: np.array(t.data) for t in stored}
    norm = model.model.layers[1].input_layernorm.weight.detach()
    np.testing.assert_allclose(raw["blk.1.attn_norm.weight"], norm.numpy() + 1.0, atol=1e-6)
    torch.testing.assert_close(store.read("model.layers.1.input_layernorm.weight"), norm)
    torch.testing.assert_close(
        store.read("model.layers.2.mlp.down_proj.weight"),
        model.model.layers[2].mlp.down_proj.weight,
    )
    assert "output.weight" not in raw
    assert store.field("gemma.attention.key_length") == 16


def test_gguf_out_refuses_what_it_cannot_write(
    make_model: Callable[[str], Any], tokenizer: Any, tmp_path: Path
) -> None:
    scaled = _model("llama", tokenizer)
    scaled.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(ExportError, match="llama3"):
        export_gguf(scaled, tokenizer, tmp_path / "x.gguf", "f16", name="x")
    with pytest.raises(ExportError, match="unknown GGUF type"):
        export_gguf(make_model("qwen2"), tokenizer, tmp_path / "x.gguf", "q4_k", name="x")
    assert not (tmp_path / "x.gguf").exists()


# --- GGUF in place -------------------------------------------------------------------------------

# Types of the tiny mixed file: every requantizable type, and two K-quants for the LoRA path.
MIXED = {
    "token_embd.weight": T.Q5_0,
    "blk.0.attn_output.weight": T.Q4_0,
    "blk.1.attn_output.weight": T.Q5_1,
    "blk.2.attn_output.weight": T.Q8_0,
    "blk.3.attn_output.weight": T.BF16,
    "blk.0.ffn_down.weight": T.Q4_K,
    "blk.1.ffn_down.weight": T.Q6_K,
    "blk.2.ffn_down.weight": T.F16,
    "blk.3.ffn_down.weight": T.Q4_1,
}


def _kquant_blocks(rows: int, cols: int, qtype: Any, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with small finite scales (gguf-py cannot quantize K-quants; any
    valid block content is a weight once dequantized)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if qtype == T.Q4_K:  # d and dmin lead the block
        blocks[..., 0:2] = scale
        blocks[..., 2:4] = scale
    else:  # Q6_K: d closes the block
        blocks[..., -2:] = scale
    return blocks.reshape(rows, -1)


def _retyped(src: Path, dest: Path, types: dict[str, Any]) -> Path:
    """``src`` with the tensors of ``types`` converted to those types (K-quants: random blocks)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dest, str(reader.fields["general.architecture"].contents()))
    for key, f in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            writer.add_key_value(key, *field_value(f))
    rng = np.random.default_rng(0)
    for t in reader.tensors:
        qtype = types.get(t.name)
        if qtype is None:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        elif qtype in (T.Q4_K, T.Q6_K):
            writer.add_tensor(t.name, _kquant_blocks(*t.data.shape, qtype, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(
                t.name, gguf.quants.quantize(np.asarray(t.data), qtype), raw_dtype=qtype
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


@pytest.fixture
def mixed_gguf(tokenizer: Any, tmp_path: Path) -> Path:
    """A tiny tied Qwen2 (d_ff 256, so that K-quant blocks fit) as a mixed-type GGUF."""
    model = _model("qwen2", tokenizer, intermediate_size=256, tie_word_embeddings=True)
    f32 = tmp_path / "f32.gguf"
    export_gguf(model, tokenizer, f32, "f32", name="tiny")
    return _retyped(f32, tmp_path / "mixed.gguf", MIXED)


def test_in_place_keeps_untouched_tensors_and_every_type(mixed_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "edited.gguf"
    result = apply_gguf(Ablation.uniform(_direction(), 4), mixed_gguf, out)
    before, after = gguf.GGUFReader(mixed_gguf), gguf.GGUFReader(out)
    old = {t.name: t for t in before.tensors}
    new = {t.name: t for t in after.tensors}
    touched = set(result.requantized) | set(result.lora)
    assert set(result.lora) == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert set(result.requantized) == set(MIXED) - set(result.lora)
    for name, t in old.items():
        assert new[name].tensor_type == t.tensor_type, name
        same = bytes(new[name].data) == bytes(t.data)
        assert same == (name not in touched or name in result.lora), name
    # The tied head keeps the original embedding, in its own type.
    assert result.added == ["output.weight"]
    assert new["output.weight"].tensor_type == T.Q5_0
    assert bytes(new["output.weight"].data) == bytes(old["token_embd.weight"].data)
    for key, f in before.fields.items():
        if not key.startswith("GGUF."):
            assert field_value(after.fields[key]) == field_value(f), key
    assert result.adapter == adapter_path(out) and "Q4_K, Q6_K" in result.describe()


def test_embedding_rows_edited_in_chunks_give_the_same_file(
    mixed_gguf: Path, tmp_path: Path
) -> None:
    edit = Ablation.uniform(_direction(), 4)
    whole, chunked = tmp_path / "whole.gguf", tmp_path / "chunked.gguf"
    apply_gguf(edit, mixed_gguf, whole)
    apply_gguf(edit, mixed_gguf, chunked, row_chunk=64)  # 400 rows: 7 chunks
    assert whole.read_bytes() == chunked.read_bytes()


# Largest |requantized - edited| relative to the tensor's largest |value|: half a step of each
# type's grid (Q4: 16 levels, Q5: 32, Q8: 255) with room for the blocks' own scales.
STEP = {T.Q4_0: 1 / 8, T.Q4_1: 1 / 8, T.Q5_0: 1 / 16, T.Q5_1: 1 / 16, T.Q8_0: 1 / 100,
        T.BF16: 1 / 100, T.F16: 1e-3}  # fmt: skip


def test_requantized_tensors_hold_the_edit(mixed_gguf: Path, tmp_path: Path) -> None:
    edit = Ablation.uniform(_direction(), 4)
    out = tmp_path / "edited.gguf"
    apply_gguf(edit, mixed_gguf, out)
    src, dst = GGUFStore(mixed_gguf), GGUFStore(out)
    anatomy = src.anatomy()
    v = edit.direction.vector
    for writer in anatomy.writers:
        if not src.can_requantize(writer.tensor):
            continue
        w = canonical(src.read(writer.tensor), writer.layout)
        expected = apply_writer_edits(edit.writer_edits(writer_info(writer, src, anatomy)), w)
        got = canonical(dst.read(writer.tensor), writer.layout)
        err = float((got - expected).abs().max()) / float(expected.abs().max())
        assert err <= STEP[src.qtype(writer.tensor)], (writer.tensor, err)
        # What is left of the direction is quantization noise, far below what was there.
        assert float((v @ got).norm()) < 0.5 * float((v @ w).norm()), writer.tensor


def test_lora_part_merges_to_the_edit(tokenizer: Any, texts: list[str], tmp_path: Path) -> None:
    """With every requantizable writer in F32 the in-place part is exact, so the edited file
    plus its adapter (merged here, as llama.cpp adds it) equals the edit of the dequantized
    base model."""
    model = _model("qwen2", tokenizer, intermediate_size=256, tie_word_embeddings=True)
    f32 = tmp_path / "f32.gguf"
    export_gguf(model, tokenizer, f32, "f32", name="tiny")
    src = _retyped(f32, tmp_path / "k.gguf", {f"blk.{i}.ffn_down.weight": T.Q4_K for i in range(4)})
    edit = Ablation.uniform(_direction(), 4, strength=0.8)
    result = apply_gguf(edit, src, tmp_path / "out.gguf")
    assert len(result.lora) == 4 and result.rank == 1
    meta, deltas = read_gguf_lora(result.adapter)  # type: ignore[arg-type]
    assert meta["alpha"] == 1.0 and meta["architecture"] == "qwen2"
    store = GGUFStore(src)
    anatomy = store.anatomy()
    for writer in anatomy.writers:
        name = store.gguf_name(writer.tensor)
        if name in deltas:
            w = store.read(writer.tensor)
            expected = apply_writer_edits(edit.writer_edits(writer_info(writer, store, anatomy)), w)
            torch.testing.assert_close(w + deltas[name].b @ deltas[name].a, expected,
                                       atol=1e-5, rtol=0)  # fmt: skip
    reference = load_gguf_model(src)
    bake(reference, edit)
    merged = load_gguf_model(tmp_path / "out.gguf")
    assert not merged.config.tie_word_embeddings
    with torch.no_grad():
        for i, layer in enumerate(merged.model.layers):
            d = deltas[f"blk.{i}.ffn_down.weight"]
            layer.mlp.down_proj.weight += d.b @ d.a
    diff = logit_difference(reference, merged, tokenizer, texts[:3])
    assert diff.max_abs_logit < 1e-3, diff


def test_norm_preserving_edit_of_a_k_quant_is_refused(mixed_gguf: Path, tmp_path: Path) -> None:
    edit = Ablation(_direction(), 1.0, (1.0,) * 4, (1.0,) * 4, mode="norm_preserving")
    with pytest.raises(ExportError, match="full-rank"):
        apply_gguf(edit, mixed_gguf, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_apply_command_on_a_gguf(mixed_gguf: Path, tmp_path: Path, capsys: Any) -> None:
    vector = tmp_path / "v.npy"
    np.save(vector, _direction().vector.numpy() * 3.0)  # any scale: it is normalised
    out = tmp_path / "cli.gguf"
    argv = ["apply", "--model", str(mixed_gguf), "--direction", str(vector), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "GGUF LoRA adapter" in printed and adapter_path(out).is_file()
    assert main(argv) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    same = ["apply", "--model", str(mixed_gguf), "--direction", str(vector), "--out",
            str(mixed_gguf), "--overwrite"]  # fmt: skip
    assert main(same) == 2
    assert "input" in capsys.readouterr().err
    saved = tmp_path / "run"
    Ablation.uniform(_direction(), 4, 0.5).save(saved)
    assert main(["apply", "--model", str(mixed_gguf), "--direction", str(saved), "--out",
                 str(tmp_path / "from-run.gguf")]) == 0  # fmt: skip
    wrong = tmp_path / "w.npy"
    np.save(wrong, np.ones(32, dtype=np.float32))
    assert main(["apply", "--model", str(mixed_gguf), "--direction", str(wrong), "--out",
                 str(tmp_path / "w.gguf")]) == 2  # fmt: skip
    assert "d_model" in capsys.readouterr().err
