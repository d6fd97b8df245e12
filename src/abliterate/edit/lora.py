"""Edits as LoRA adapters: exact low-rank factors of a weight edit, saved for PEFT.

A plain directional ablation changes a writer ``W`` (canonical ``(d_model, d_in)``) by
``ΔW = -s B Bᵀ W`` with ``B`` the orthonormal basis of the removed span (one direction: rank 1;
``k`` directions: rank ``k``). Every change a :class:`~abliterate.core.ablation.ProjectionEdit`
makes, and any composition of them, lies in the span ``U`` of the bases involved, so

    ΔW = Uᵀ (U ΔW)          lora_B = Uᵀ  (d_model, k),   lora_A = U ΔW  (k, d_in)

holds exactly, with ``ΔW`` computed by the edit protocol itself (:meth:`WriterEdit.columns`).
With ``lora_alpha = r`` PEFT's scaling is 1, so ``W + lora_B lora_A`` is the edited weight.
A norm-preserving edit rescales every write vector on its own: its change is full-rank and is
refused with that reason.

:func:`lora_from_edit` computes the factors from the *unedited* weights in any
:class:`~abliterate.model.stores.WeightStore`; :func:`save_peft` writes them as a PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``PeftModel.from_pretrained``
loads: linear writers as ``lora_A``/``lora_B``, the token embedding through PEFT's embedding
LoRA, fused expert tensors through ``target_parameters``, edited biases as the bias values PEFT
loads with ``bias="lora_only"``. :func:`merge_peft` merges an adapter into a base model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from abliterate.core.ablation import ProjectionEdit
from abliterate.core.edits import Edit, WriterEdit
from abliterate.core.linalg import as_basis, orthonormal_rows
from abliterate.edit.weights import planned_edits
from abliterate.errors import ExportError
from abliterate.model.anatomy import Anatomy, Layout, Writer, canonical
from abliterate.model.stores import ModuleStore, WeightStore
from abliterate.progress import progress

if TYPE_CHECKING:
    from torch import nn

# Columns edited at a time (a vocabulary-sized embedding never needs two float32 copies).
CHUNK = 16384
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def apply_writer_edits(
    edits: list[WriterEdit], w: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """The float32 edited copy of the canonical weight ``w`` (d_model, d_in), by the edits'
    :meth:`~abliterate.core.edits.WriterEdit.columns` in order, ``chunk`` columns at a time."""
    out = torch.empty(w.shape, dtype=torch.float32)
    step = chunk or w.shape[1]
    for start in range(0, w.shape[1], step):
        cols = w[:, start : start + step]
        for e in edits:
            cols = e.columns(cols, start)
        out[:, start : start + step] = cols.float()
    return out


@dataclass(frozen=True)
class LowRank:
    """One writer's exact change ``ΔW = B A`` (canonical orientation).

    Attributes:
        b: ``(d_model, k)`` float32, orthonormal columns.
        a: ``(k, d_in)`` float32.
    """

    b: torch.Tensor
    a: torch.Tensor

    @property
    def rank(self) -> int:
        """The number of directions ``k``."""
        return int(self.b.shape[1])

    def padded(self, rank: int) -> LowRank:
        """The same product with zero columns/rows added up to ``rank`` (a uniform rank lets one
        ``lora_alpha = r`` scale every matrix by exactly 1)."""
        extra = rank - self.rank
        if extra < 0:
            raise ValueError(f"cannot pad rank {self.rank} down to {rank}")
        b = torch.cat([self.b, self.b.new_zeros(self.b.shape[0], extra)], dim=1)
        a = torch.cat([self.a, self.a.new_zeros(extra, self.a.shape[1])], dim=0)
        return LowRank(b, a)


def low_rank_delta(edits: list[WriterEdit], w: torch.Tensor) -> LowRank:
    """The exact factors of the change ``edits`` make to the canonical weight ``w``.

    Raises:
        ExportError: an edit's change is not low-rank (norm-preserving), or of a kind whose
            low-rank form is unknown.
    """
    rows: list[torch.Tensor] = []
    for e in edits:
        if not isinstance(e, ProjectionEdit):
            raise ExportError(
                f"a {type(e).__name__} has no exact low-rank form, so it cannot be a LoRA adapter."
            )
        if e.norm_preserving:
            raise ExportError(
                "norm-preserving edits rescale every write vector separately: the weight change "
                "is full-rank, so it cannot be a LoRA adapter (export the model instead)."
            )
        rows.extend(as_basis(e.basis, w.float()).cpu())
    u = orthonormal_rows(rows)  # (k, d_model)
    a = torch.empty(u.shape[0], w.shape[1], dtype=torch.float32)
    step = CHUNK
    for start in range(0, w.shape[1], step):
        cols = w[:, start : start + step]
        delta = apply_writer_edits(edits, cols, None) - cols.float()  # (d_model, chunk)
        a[:, start : start + step] = u @ delta
    return LowRank(u.T.contiguous(), a)


@dataclass
class LoraAdapter:
    """An edit as low-rank changes of named writers (plus the biases it changes).

    Attributes:
        deltas: Per writer (keyed by :attr:`Writer.name`): the writer and its change.
        biases: Hugging Face bias name -> the *edited* bias (what PEFT loads into the model).
        base_model: Name or path of the base model, for ``adapter_config.json``.
        revision: Its revision, when known.
        tied_head: The base model uses its token embedding as output head (the caller knows;
            a GGUF LoRA cannot change such an embedding).
    """

    deltas: dict[str, tuple[Writer, LowRank]] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    base_model: str | None = None
    revision: str | None = None
    tied_head: bool = False

    @property
    def rank(self) -> int:
        """The adapter's (uniform) rank: the largest per-writer rank."""
        return max((d.rank for _, d in self.deltas.values()), default=0)


def lora_from_edit(
    edit: Edit,
    store: WeightStore,
    anatomy: Anatomy,
    base_model: str | None = None,
    revision: str | None = None,
) -> LoraAdapter:
    """The adapter of ``edit`` for the *unedited* weights in ``store`` (nothing is written).

    Raises:
        ExportError: the edit is not low-rank.
        ValueError: the edit does not fit the model's shape, or adds a constant (steering) to a
            writer without a bias, which only a model baked in memory can be given.
        UnsupportedArchitectureError: the edit (affine) adds a constant to a writer without a
            bias.
    """
    edit.check(anatomy.d_model, anatomy.n_layers)
    adapter = LoraAdapter(base_model=base_model, revision=revision)
    for writer, edits in progress(planned_edits(edit, store, anatomy), desc="LoRA factors"):
        if not edits:
            continue
        w = canonical(store.read(writer.tensor), writer.layout, writer.expert)
        adapter.deltas[writer.name] = (writer, low_rank_delta(edits, w))
        if writer.bias is not None and store.has(writer.bias):
            b = store.read(writer.bias)
            b = b if writer.expert is None else b[writer.expert]
            for e in edits:
                b = e.bias(b)
            adapter.biases[writer.bias] = b.detach().float().cpu().clone()
    if not adapter.deltas:
        raise ExportError("the edit changes no writer: there is no adapter to write.")
    return adapter


def _fused_factors(entries: list[tuple[Writer, LowRank]], rank: int) -> tuple[torch.Tensor, ...]:
    """PEFT's ``ParamWrapper`` layout of per-expert factors: ``lora_A`` ``(E·r, d_in)`` with
    row ``e·r + j`` = expert ``e``'s row ``j``; ``lora_B`` ``(d_model, r·E)``, column
    ``j·E + e``."""
    n_experts = max(w.expert or 0 for w, _ in entries) + 1
    first = entries[0][1]
    a = first.a.new_zeros(n_experts, rank, first.a.shape[1])
    b = first.b.new_zeros(first.b.shape[0], rank, n_experts)
    for w, d in entries:
        p = d.padded(rank)
        assert w.expert is not None
        a[w.expert] = p.a
        b[:, :, w.expert] = p.b
    return a.reshape(n_experts * rank, -1), b.reshape(b.shape[0], rank * n_experts)


def _peft_tensors(adapter: LoraAdapter, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter's tensors under PEFT's names, and the LoRA targets (modules, parameters)."""
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    params: list[str] = []
    fused: dict[str, list[tuple[Writer, LowRank]]] = {}
    for writer, delta in adapter.deltas.values():
        key = f"base_model.model.{writer.module}"
        p = delta.padded(rank)
        if writer.layout == "embedding":
            tensors[f"{key}.lora_embedding_A"] = p.a  # (r, vocab): ΔE = (B A)ᵀ
            tensors[f"{key}.lora_embedding_B"] = p.b  # (d_model, r)
            modules.append(writer.module)
        elif writer.layout in ("linear", "linear_t"):
            _check_layout(writer.layout)
            tensors[f"{key}.lora_A.weight"] = p.a
            tensors[f"{key}.lora_B.weight"] = p.b
            modules.append(writer.module)
        else:
            fused.setdefault(writer.tensor, []).append((writer, delta))
    for tensor, entries in fused.items():
        if entries[0][0].layout != "fused":
            raise ExportError(
                f"'{tensor}' stores its experts as (experts, d_in, d_model); PEFT's parameter "
                "targeting reads that order only from modules marked is_transposed."
            )
        module = entries[0][0].module
        a, b = _fused_factors(entries, rank)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        params.append(tensor)
    for name, bias in adapter.biases.items():
        module = name.rsplit(".", 1)[0]
        tensors[f"base_model.model.{module}.base_layer.bias"] = bias
    return tensors, {"modules": modules, "params": params}


def _check_layout(layout: Layout) -> None:
    if layout == "linear_t":
        # PEFT's fan_in_fan_out would be needed for Conv1D-style writers; none is in the table.
        raise ExportError("transposed (Conv1D-style) writers are not exported as LoRA adapters.")


def save_peft(adapter: LoraAdapter, directory: Path) -> list[Path]:
    """Write ``adapter`` as a PEFT LoRA adapter into ``directory`` (built under a temporary name
    and renamed into place). Returns the files written."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    rank = adapter.rank
    tensors, targets = _peft_tensors(adapter, rank)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling alpha / r = 1: W + B A is the edited weight
        target_modules=targets["modules"],
        target_parameters=targets["params"] or None,
        bias="lora_only" if adapter.biases else "none",
        lora_dropout=0.0,
        base_model_name_or_path=adapter.base_model,
        revision=adapter.revision,
        inference_mode=True,
    )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})  # fmt: skip
        config.save_pretrained(str(tmp))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG]


def read_peft(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``adapter_config.json`` and the tensors of a PEFT adapter directory."""
    from safetensors.torch import load_file

    config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return config, load_file(str(directory / ADAPTER_WEIGHTS))


def merge_peft(model: nn.Module, directory: Path) -> nn.Module:
    """``model`` with the PEFT adapter in ``directory`` merged into its weights (in place).

    A token embedding tied to the output head is untied first when the adapter changes it:
    merging into a shared tensor would change the head as well, which the edit never does.
    """
    from peft import PeftModel

    config, _ = read_peft(directory)
    targets = set(config.get("target_modules") or [])
    store = ModuleStore(model)
    for name, _ in list(model.named_modules()):
        if name in targets and store.has(f"{name}.weight"):
            with store.writable(f"{name}.weight"):
                pass  # writable() unties a shared parameter; nothing is written
    merged = PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
    return merged.eval()
