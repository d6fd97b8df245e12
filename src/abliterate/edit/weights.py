"""Permanent edits: apply an :class:`~abliterate.core.edits.Edit` to weights through a store.

:func:`apply_edit` is the one implementation for every :class:`~abliterate.model.stores.
WeightStore`: for each residual writer the anatomy names, it reads the writer's weight in its
stored layout, converts it to the canonical ``(d_model, d_in)`` view, lets each of the edit's
:class:`~abliterate.core.edits.WriterEdit` rewrite its columns (and the bias), and writes the
result back in the stored dtype. :func:`bake` is the in-memory case: the result equals running
the unedited model under :func:`~abliterate.edit.hooks.edit_hooks` with the same edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from abliterate.core.edits import Edit, WriterEdit, WriterInfo
from abliterate.model.anatomy import Anatomy, Writer, anatomy_of, canonical
from abliterate.model.stores import BiasStore, ModuleStore, WeightStore

if TYPE_CHECKING:
    from torch import nn

# Columns edited at a time: a large vocabulary's embedding never needs a full float32 copy.
EMBEDDING_CHUNK = 16384


@dataclass
class EditSummary:
    """What a permanent edit changed: tensor names, and writers edited per role."""

    tensors: list[str] = field(default_factory=list)
    writers_by_role: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary for reports."""
        return {"n_tensors": len(self.tensors), "writers_by_role": dict(self.writers_by_role)}


def writer_info(writer: Writer, store: WeightStore, anatomy: Anatomy) -> WriterInfo:
    """What an edit needs to know about ``writer``, its post-norm gain read from ``store``."""
    gain = None
    if writer.post_norm is not None:
        gain = store.read(writer.post_norm).detach().float().cpu() + anatomy.table.norm_offset
    return WriterInfo(name=writer.name, role=writer.role, layer=writer.layer, norm_gain=gain)


@torch.no_grad()
def _rewrite(weight: torch.Tensor, edits: list[WriterEdit], chunk: int | None) -> None:
    """Apply ``edits`` in order to the canonical view ``weight`` (d_model, d_in), in place."""
    n = weight.shape[1]
    step = chunk or n
    for start in range(0, n, step):
        cols = weight[:, start : start + step]
        edited = cols
        for e in edits:
            edited = e.columns(edited, start)
        cols.copy_(edited.to(cols.dtype))


def _ensure_bias(store: WeightStore, writer: Writer, d_model: int) -> None:
    """Create a zero bias on ``writer`` when an edit adds a constant to its output and it has
    none, or say why that is impossible."""
    if writer.bias is not None and store.has(writer.bias):
        return
    if writer.bias is None or writer.expert is not None:
        raise ValueError(
            f"{writer.name} cannot carry an output bias, so a constant added to its output "
            "cannot be baked into the weights; apply the edit with hooks instead"
        )
    if not isinstance(store, BiasStore):
        raise ValueError(
            f"{writer.name} has no bias and {type(store).__name__} cannot create one, so a "
            "constant added to its output cannot be baked into these weights; apply the edit "
            "with hooks, or bake it into the in-memory model"
        )
    store.create_bias(writer.bias, d_model, like=writer.tensor)


def apply_edit(edit: Edit, store: WeightStore, anatomy: Anatomy) -> EditSummary:
    """Permanently apply ``edit`` to every writer of ``anatomy`` held in ``store``.

    Raises:
        ValueError: the edit does not fit the model's shape.
    """
    edit.check(anatomy.d_model, anatomy.n_layers)
    summary = EditSummary()
    for writer in anatomy.writers:
        edits = edit.writer_edits(writer_info(writer, store, anatomy))
        if not edits:
            continue
        with store.writable(writer.tensor) as stored:
            chunk = EMBEDDING_CHUNK if writer.layout == "embedding" else None
            _rewrite(canonical(stored, writer.layout, writer.expert), edits, chunk)
        if any(e.needs_bias() for e in edits):
            _ensure_bias(store, writer, anatomy.d_model)
        if writer.bias is not None and store.has(writer.bias):
            with store.writable(writer.bias) as bias:
                b = bias if writer.expert is None else bias[writer.expert]
                new = b
                for e in edits:
                    new = e.bias(new)
                b.copy_(new.to(b.dtype))
            summary.tensors.append(writer.bias)
        if writer.tensor not in summary.tensors:
            summary.tensors.append(writer.tensor)
        summary.writers_by_role[writer.role] = summary.writers_by_role.get(writer.role, 0) + 1
    return summary


def bake(model: nn.Module, edit: Edit) -> EditSummary:
    """Permanently apply ``edit`` to an in-memory model (a tied head is untied first)."""
    return apply_edit(edit, ModuleStore(model), anatomy_of(model).anatomy)
