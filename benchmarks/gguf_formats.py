"""GGUF and LoRA exports of the demo model: sizes, and logits against the edited model.

Usage (heavy: hold the shared lock)::

    flock /work/notes/heavy.lock python benchmarks/gguf_formats.py [--out benchmarks/results]

The edit is the plain full-strength ablation ``abliterate run`` applies (embedding and every
attention and MLP output), of the direction at layer 15 "post" (the demo run's selection),
computed here from 32 + 32 built-in training prompts. The reference is the edited model in
memory (float32, the demo GGUF dequantized by transformers, then edited). Each artefact is
compared with it on 8 held-out chat prompts (4 harmful, 4 harmless), at every position: the
largest ``|Δ logit|`` and the mean KL(edited ‖ artefact).

1. **GGUF out** of the edited model in F16, BF16 and Q8_0 (tokenizer copied from the shipped
   GGUF), loaded back by transformers. The transformers-tokenizer conversion is checked against
   the shipped GGUF's own vocabulary, merges and token types.
2. **GGUF in place** on the shipped GGUF (Q5_0/Q8_0/Q4_K/Q6_K/F32): its Q5_0 embedding and
   attention outputs requantized in their own type, its Q4_K/Q6_K MLP down projections through
   the GGUF LoRA adapter; loaded by transformers with the adapter merged as llama.cpp adds it
   (and once without the adapter, to show what it carries).
3. **LoRA adapter** (PEFT) of the edit, merged into the unedited model; and its conversion to a
   llama.cpp adapter.

Results: ``gguf_formats.json`` and ``gguf_formats.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.data.chat import format_chat
from abliterate.data.prompts import builtin
from abliterate.edit.checks import load_gguf_model, logit_difference
from abliterate.edit.gguf import apply_gguf, peft_to_gguf_lora, read_gguf_lora
from abliterate.edit.gguf_export import _hf_tokenizer, export_gguf
from abliterate.edit.lora import apply_writer_edits, lora_from_edit, merge_peft, save_peft
from abliterate.edit.weights import bake, writer_info
from abliterate.measure.activations import collect_activations
from abliterate.model.anatomy import anatomy_of
from abliterate.model.demo import assemble_gguf
from abliterate.model.gguf_store import GGUFStore
from abliterate.model.loading import load_model
from abliterate.model.stores import ModuleStore

LAYER = 15  # the demo run's selection: layer 15, site "post"


def _direction(loaded: Any) -> Direction:
    harmful = format_chat(loaded.tokenizer, builtin("harmful", "train").head(32).prompts)
    harmless = format_chat(loaded.tokenizer, builtin("harmless", "train").head(32).prompts)
    means = [collect_activations(loaded.model, loaded.tokenizer, t, sites=("post",))[0]
             for t in (harmful, harmless)]  # fmt: skip
    diff = (means[0][LAYER, 0] - means[1][LAYER, 0]).float()
    return Direction(diff, layer=LAYER, site="post", model="demo").normalized()


def _mb(path: Path) -> float:
    return round(path.stat().st_size / 1e6, 1)


def _tokenizer_check(loaded: Any, shipped: Path, work: Path) -> dict[str, Any]:
    """The transformers-tokenizer conversion against the shipped GGUF's own tokenizer."""
    import gguf

    path = work / "vocab-only.gguf"
    writer = gguf.GGUFWriter(path, "qwen2")
    _hf_tokenizer(writer, loaded.tokenizer, "qwen2", loaded.model.config.vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours, theirs = gguf.GGUFReader(path).fields, gguf.GGUFReader(shipped).fields
    out: dict[str, Any] = {}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        a, b = ours[key].contents(), theirs[key].contents()
        out[key] = {"n": len(a), "n_shipped": len(b),
                    "differ": sum(x != y for x, y in zip(a, b, strict=False))}  # fmt: skip
    for key in (
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.chat_template",
        "tokenizer.ggml.pre",
    ):
        a = ours[key].contents() if key in ours else None
        equal = a == theirs[key].contents()
        out[key] = {"equal": equal, "ours": None if equal else str(a)[:60]}
    return out


def _merge_gguf_lora(model: Any, adapter: Path) -> None:
    """Add a GGUF LoRA's changes to the (transformers-loaded) model, as llama.cpp does."""
    _, deltas = read_gguf_lora(adapter)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            d = deltas.get(f"blk.{i}.ffn_down.weight")
            if d is not None:
                layer.mlp.down_proj.weight += d.b @ d.a
            d = deltas.get(f"blk.{i}.attn_output.weight")
            if d is not None:
                layer.self_attn.o_proj.weight += d.b @ d.a
        if "token_embd.weight" in deltas:
            d = deltas["token_embd.weight"]
            model.model.embed_tokens.weight += (d.b @ d.a).T


def _lora_exactness(edit: Ablation, shipped: Path, adapter: Path) -> float:
    """Largest |dequantized base + B A - edit(dequantized base)| over the adapter's tensors."""
    store = GGUFStore(shipped)
    anatomy = store.anatomy()
    _, deltas = read_gguf_lora(adapter)
    worst = 0.0
    for writer in anatomy.writers:
        name = store.gguf_name(writer.tensor)
        if name in deltas:
            w = store.read(writer.tensor)
            expected = apply_writer_edits(edit.writer_edits(writer_info(writer, store, anatomy)), w)
            got = w + deltas[name].b @ deltas[name].a
            worst = max(worst, float((got - expected).abs().max()))
    return worst


def _gguf_out(
    edited: Any, tok: Any, shipped: Path, texts: list[str], work: Path, save: Any, results: dict
) -> dict:
    out: dict[str, Any] = results.setdefault("gguf_out", {})
    for t in ("q8_0", "f16", "bf16"):
        path = work / f"out-{t}.gguf"
        start = time.perf_counter()
        export_gguf(edited, tok, path, t, name="demo abliterated", tokenizer_gguf=shipped)
        seconds = time.perf_counter() - start
        back = load_gguf_model(path)
        diff = logit_difference(edited, back, tok, texts)
        del back
        out[t] = {"mb": _mb(path), "write_s": round(seconds, 1), **diff.to_dict()}
        path.unlink()
        print(t, out[t], flush=True)
        save()
    return out


def _count(types: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in types.values():
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _in_place(
    edit: Ablation, edited: Any, tok: Any, shipped: Path, texts: list[str], work: Path
) -> dict:
    out = work / "inplace.gguf"
    start = time.perf_counter()
    res = apply_gguf(edit, shipped, out)
    seconds = time.perf_counter() - start
    print(res.describe(), flush=True)
    assert res.adapter is not None
    back = load_gguf_model(out)
    without = logit_difference(edited, back, tok, texts)
    _merge_gguf_lora(back, res.adapter)
    merged = logit_difference(edited, back, tok, texts)
    del back
    return {
        "mb": _mb(out), "adapter_mb": _mb(res.adapter), "seconds": round(seconds, 1),
        "requantized_by_type": _count(res.requantized), "lora_by_type": _count(res.lora),
        "added": res.added, "adapter_rank": res.rank, "with_adapter": merged.to_dict(),
        "without_adapter": without.to_dict(),
        "adapter_max_abs_error_vs_edit": _lora_exactness(edit, shipped, res.adapter),
    }  # fmt: skip


def _lora(edit: Ablation, base: Any, edited: Any, tok: Any, texts: list[str], work: Path) -> dict:
    adapter = lora_from_edit(edit, ModuleStore(base), anatomy_of(base).anatomy, "demo")
    save_peft(adapter, work / "adapter")
    gguf_lora = work / "adapter.gguf"
    peft_to_gguf_lora(work / "adapter", anatomy_of(base).anatomy, "qwen2", gguf_lora)
    merged = merge_peft(base, work / "adapter")  # merges into base: the last use of it
    diff = logit_difference(edited, merged, tok, texts)
    return {"rank": adapter.rank, "adapter_mb": _mb(work / "adapter" / "adapter_model.safetensors"),
            "gguf_adapter_mb": _mb(gguf_lora), "merged": diff.to_dict()}  # fmt: skip


def main() -> None:
    """Measure and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    results: dict[str, Any] = {"edit": f"plain ablation, strength 1, direction layer {LAYER} post"}
    loaded = load_model("demo", device="cpu", dtype="float32")
    tok = loaded.tokenizer
    texts = format_chat(tok, [*builtin("harmful", "eval").head(4).prompts,
                              *builtin("harmless", "eval").head(4).prompts])  # fmt: skip
    edit = Ablation.uniform(_direction(loaded), 24)
    base = loaded.model
    edited = copy.deepcopy(base)
    bake(edited, edit)
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage, so that a stopped run keeps what it measured
        (args.out / "gguf_formats.json").write_text(json.dumps(results, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="gguf-bench-", dir="/tmp") as tmp:
        work = Path(tmp)
        shipped = assemble_gguf(work / "demo.gguf")
        results["shipped_gguf_mb"] = _mb(shipped)
        results["tokenizer_conversion"] = _tokenizer_check(loaded, shipped, work)
        save()
        results["gguf_in_place"] = _in_place(edit, edited, tok, shipped, texts, work)
        save()
        results["lora"] = _lora(edit, base, edited, tok, texts, work)
        save()
        results["gguf_out"] = _gguf_out(edited, tok, shipped, texts, work, save, results)
    save()
    (args.out / "gguf_formats.md").write_text(_markdown(results))
    print(_markdown(results))


def _markdown(r: dict[str, Any]) -> str:
    rows = ["| artefact | size (MB) | max \\|Δ logit\\| | mean KL |", "|---|---:|---:|---:|"]
    for t, v in r["gguf_out"].items():
        rows.append(f"| GGUF out {t.upper()} | {v['mb']} | {v['max_abs_logit']:.3g} | "
                    f"{v['mean_kl']:.3g} |")  # fmt: skip
    p = r["gguf_in_place"]
    rows.append(
        f"| GGUF in place + GGUF LoRA | {p['mb']} + {p['adapter_mb']} | "
        f"{p['with_adapter']['max_abs_logit']:.3g} | {p['with_adapter']['mean_kl']:.3g} |"
    )
    rows.append(f"| GGUF in place, adapter left out | {p['mb']} | "
                f"{p['without_adapter']['max_abs_logit']:.3g} | "
                f"{p['without_adapter']['mean_kl']:.3g} |")  # fmt: skip
    lo = r["lora"]
    rows.append(
        f"| PEFT LoRA (rank {lo['rank']}) merged | {lo['adapter_mb']} | "
        f"{lo['merged']['max_abs_logit']:.3g} | {lo['merged']['mean_kl']:.3g} |"
    )
    return "\n".join([f"Edit: {r['edit']}. Shipped GGUF: {r['shipped_gguf_mb']} MB.", "",
                      *rows, ""])  # fmt: skip


if __name__ == "__main__":
    main()
