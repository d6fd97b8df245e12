"""Edits of GGUF files in place, and edits as GGUF LoRA adapters for llama.cpp.

:func:`apply_gguf` edits a (possibly quantized) GGUF file without converting the model: only
the residual writers the edit changes are read and dequantized; each is edited through the edit
protocol and

* written back *in its own type* where the ``gguf`` package can quantize that type
  (:func:`~abliterate.model.gguf_store.requantizable_types`: F32, F16, BF16, Q8_0, Q5_0, Q5_1,
  Q4_0, Q4_1), or
* left untouched in the file and written instead as a low-rank change into a **GGUF LoRA
  adapter** (K-quants, I-quants), which llama.cpp applies at run time on top of the quantized
  base (``llama-cli -m out.gguf --lora out.lora.gguf``). Nothing is ever requantized to another
  type.

Every other tensor and all metadata are copied byte for byte. When the token embedding is
edited and the file has no ``output.weight`` (a tied head: llama.cpp then uses ``token_embd``
as the output projection), the original embedding is added as ``output.weight`` in its own
type, so the head keeps its weights as it does in the in-memory edit.

llama.cpp's LoRA format (``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``; tensors ``<base name>.lora_a`` ``(r, d_in)`` and ``.lora_b``
``(d_out, r)`` in numpy order, for ``token_embd`` ``lora_a`` ``(vocab, r)`` and ``lora_b``
``(d_model, r)``; each change scaled by ``alpha / r``) is written by :func:`write_gguf_lora`;
:func:`peft_to_gguf_lora` converts a PEFT adapter written by :func:`~abliterate.edit.lora.
save_peft`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from abliterate.core.edits import Edit, WriterEdit
from abliterate.edit.lora import CHUNK, LowRank, apply_writer_edits, low_rank_delta, read_peft
from abliterate.edit.weights import planned_edits
from abliterate.errors import ExportError
from abliterate.model.anatomy import Anatomy, canonical
from abliterate.model.gguf_store import (
    GGUF_ARCH,
    ROW_CHUNK,
    GGUFStore,
    gguf_tensor_name,
    tensor_name_map,
)
from abliterate.progress import progress

if TYPE_CHECKING:
    import torch

TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"
TIED_HEAD_LORA = (
    "the model uses its token embedding as output head, and llama.cpp would apply the "
    "embedding's LoRA to the head as well; edit the GGUF in place instead (abliterate apply "
    "--model MODEL.gguf keeps the original head), or export the PEFT adapter (--export lora)."
)


@dataclass
class GGUFEdit:
    """What :func:`apply_gguf` did.

    Attributes:
        out: The edited GGUF file.
        requantized: GGUF name -> type of every tensor edited in place (in its own type).
        lora: GGUF name -> type of every tensor whose edit went into the adapter instead.
        adapter: The GGUF LoRA adapter, when some tensor needed it.
        added: Tensors added to the file (the original head of a tied embedding).
        rank: The adapter's rank (0 without adapter).
    """

    out: Path
    requantized: dict[str, str] = field(default_factory=dict)
    lora: dict[str, str] = field(default_factory=dict)
    adapter: Path | None = None
    added: list[str] = field(default_factory=list)
    rank: int = 0

    def describe(self) -> str:
        """A few lines for the terminal: what was edited where."""
        lines = [f"Wrote {self.out}: {len(self.requantized)} tensors edited in their own type"]
        by_type: dict[str, int] = {}
        for t in self.requantized.values():
            by_type[t] = by_type.get(t, 0) + 1
        lines[0] += f" ({', '.join(f'{n} {t}' for t, n in sorted(by_type.items()))})"
        if self.added:
            lines.append(f"  added {', '.join(self.added)} (the tied head keeps its weights)")
        if self.adapter is not None:
            types = sorted(set(self.lora.values()))
            lines.append(
                f"Wrote {self.adapter}: a rank-{self.rank} GGUF LoRA adapter for "
                f"{len(self.lora)} tensors whose type ({', '.join(types)}) the gguf package "
                "cannot requantize. Those tensors are unchanged in the edited file; apply the "
                f"adapter with llama.cpp: --lora {self.adapter.name}"
            )
        return "\n".join(lines)


def adapter_path(out: Path) -> Path:
    """Where :func:`apply_gguf` writes the adapter for ``out``: ``NAME.lora.gguf`` beside it."""
    return out.with_name(f"{out.stem}.lora.gguf")


def _row_editor(edits: list[WriterEdit]) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """An embedding's rows (its canonical columns) edited by ``edits``."""

    def edit_rows(rows: torch.Tensor, start: int) -> torch.Tensor:
        cols = rows.T  # (d_model, chunk): the canonical columns start … start + chunk - 1
        for e in edits:
            cols = e.columns(cols, start)
        return cols.T

    return edit_rows


def apply_gguf(edit: Edit, src: Path, out: Path, row_chunk: int = ROW_CHUNK) -> GGUFEdit:
    """Apply ``edit`` to the GGUF file ``src`` and write ``out`` (and, where needed, the adapter
    :func:`adapter_path` names); ``src`` is never modified. A requantizable embedding is edited
    ``row_chunk`` rows at a time.

    Raises:
        ExportError: an edit that must go into the adapter is not low-rank; ``out`` is ``src``.
        ValueError: the edit does not fit the model's shape, or adds a constant (steering) to a
            writer without a bias, which only a model baked in memory can be given.
        UnsupportedArchitectureError: the edit (affine) adds a constant to a writer without a
            bias.
    """
    store = GGUFStore(src)
    anatomy = store.anatomy()
    edit.check(anatomy.d_model, anatomy.n_layers)
    result = GGUFEdit(out=out)
    deltas: dict[str, LowRank] = {}
    for writer, edits in progress(planned_edits(edit, store, anatomy), desc="Editing GGUF"):
        if not edits:
            continue
        name = store.gguf_name(writer.tensor)
        if writer.role == "embedding" and OUTPUT not in store.tensors:
            store.add_tensor(OUTPUT, store.raw(TOKEN_EMBD))  # the head keeps the original
            result.added.append(OUTPUT)
        if writer.layout == "embedding" and store.can_requantize(writer.tensor):
            # One row per token, edited independently: never the whole table in float32.
            store.rewrite_rows(writer.tensor, _row_editor(edits), row_chunk)
            result.requantized[name] = store.qtype(writer.tensor).name
        elif store.can_requantize(writer.tensor):
            with store.writable(writer.tensor) as stored:
                w = canonical(stored, writer.layout, writer.expert)
                w.copy_(apply_writer_edits(edits, w, CHUNK))
            result.requantized[name] = store.qtype(writer.tensor).name
        else:
            w = canonical(store.read(writer.tensor), writer.layout, writer.expert)
            deltas[name] = low_rank_delta(edits, w)
            result.lora[name] = store.qtype(writer.tensor).name
        if writer.bias is not None and store.has(writer.bias):
            with store.writable(writer.bias) as bias:
                new = bias
                for e in edits:
                    new = e.bias(new)
                bias.copy_(new)
            result.requantized[store.gguf_name(writer.bias)] = store.qtype(writer.bias).name
    store.write(out)
    if deltas:
        result.adapter = adapter_path(out)
        result.rank = write_gguf_lora(deltas, store.arch, result.adapter, _base_name(store))
    return result


def _base_name(store: GGUFStore) -> str:
    return str(store.field("general.name", store.path.stem))


def write_gguf_lora(deltas: dict[str, LowRank], arch: str, path: Path, base: str) -> int:
    """Write ``deltas`` (GGUF base-tensor name -> change) as a llama.cpp LoRA adapter for an
    ``arch`` model, atomically; returns its rank (uniform: lower ranks are zero-padded, so that
    ``adapter.lora.alpha = r`` scales every change by exactly 1)."""
    import gguf

    rank = max(d.rank for d in deltas.values())
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    writer.add_name(f"{base} abliteration")
    for name, delta in deltas.items():
        p = delta.padded(rank)
        b = p.b.numpy().astype(np.float32)  # (d_out, r)
        # llama.cpp looks the embedding's rows up in lora_a: there it is (vocab, r).
        a = (p.a.T if name == TOKEN_EMBD else p.a).contiguous().numpy().astype(np.float32)
        writer.add_tensor(f"{name}.lora_a", a)
        writer.add_tensor(f"{name}.lora_b", b)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        tmp.replace(path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return rank


def read_gguf_lora(path: Path) -> tuple[dict[str, Any], dict[str, LowRank]]:
    """A GGUF LoRA adapter's metadata (alpha, architecture) and its changes by base-tensor name,
    in the canonical ``ΔW = B A`` form (the embedding's ``lora_a`` transposed back)."""
    import gguf
    import torch

    reader = gguf.GGUFReader(path, "r")
    meta = {
        "type": reader.fields["general.type"].contents(),
        "adapter_type": reader.fields[gguf.Keys.Adapter.TYPE].contents(),
        "alpha": float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents()),
        "architecture": reader.fields["general.architecture"].contents(),
    }
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    out: dict[str, LowRank] = {}
    for key in tensors:
        if key.endswith(".lora_a"):
            base = key.removesuffix(".lora_a")
            a, b = tensors[key], tensors[f"{base}.lora_b"]
            out[base] = LowRank(b, a.T.contiguous() if base == TOKEN_EMBD else a)
    return meta, out


def peft_to_gguf_lora(
    directory: Path, anatomy: Anatomy, model_type: str, path: Path, *, tied_head: bool = False
) -> int:
    """Convert a PEFT adapter written by :func:`~abliterate.edit.lora.save_peft` for a model of
    ``anatomy`` into a llama.cpp GGUF LoRA adapter at ``path``; returns its rank.

    Args:
        tied_head: The base model uses its token embedding as output head.

    Raises:
        ExportError: the family has no llama.cpp architecture, the adapter targets fused experts,
            changes biases (a llama.cpp LoRA carries matrices only), or changes the embedding of
            a model whose head is tied to it.
    """
    arch = GGUF_ARCH.get(model_type)
    if arch is None:
        raise ExportError(
            f"'{model_type}' has no llama.cpp architecture here; GGUF architectures: "
            f"{', '.join(sorted(GGUF_ARCH))}."
        )
    config, tensors = read_peft(directory)
    if config.get("target_parameters"):
        raise ExportError("fused expert tensors are not converted to GGUF LoRA adapters.")
    if any(k.endswith(".bias") for k in tensors):
        raise ExportError(
            "the adapter changes biases, which a llama.cpp LoRA adapter cannot carry; edit the "
            "GGUF in place (abliterate apply --model MODEL.gguf) instead."
        )
    names = tensor_name_map(arch, anatomy.n_layers)
    deltas: dict[str, LowRank] = {}
    scale = float(config["lora_alpha"]) / float(config["r"])
    for w in anatomy.writers:
        key = f"base_model.model.{w.module}"
        if f"{key}.lora_embedding_A" in tensors:
            a, b = tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"]
        elif f"{key}.lora_A.weight" in tensors:
            a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        else:
            continue
        deltas[gguf_tensor_name(w.tensor, names)] = LowRank(b.float() * scale, a.float())
    if not deltas:
        raise ExportError(f"{directory} holds no LoRA change of this model's residual writers.")
    if tied_head and TOKEN_EMBD in deltas:
        raise ExportError(TIED_HEAD_LORA)
    return write_gguf_lora(deltas, arch, path, str(config.get("base_model_name_or_path") or ""))
