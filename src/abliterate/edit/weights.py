"""Permanent edits: apply an :class:`~abliterate.core.edits.Edit` to weights through a store.

:func:`apply_edit` is the one implementation for every :class:`~abliterate.model.stores.
WeightStore`: for each residual writer the anatomy names, it locates the writer in the store
(:meth:`~abliterate.model.stores.WeightStore.locate`), reads its weight in its stored layout,
converts it to the canonical ``(d_model, d_in)`` view, lets each of the edit's
:class:`~abliterate.core.edits.WriterEdit` rewrite its columns (and the bias), and writes the
result back in the stored dtype. :func:`bake` is the in-memory case: the result equals running
the unedited model under :func:`~abliterate.edit.hooks.edit_hooks` with the same edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from abliterate.core.edits import Edit, WriterEdit, WriterInfo
from abliterate.core.finite import first_nonfinite
from abliterate.errors import NonFiniteError, UnsupportedArchitectureError
from abliterate.model.anatomy import Anatomy, Writer, anatomy_of, canonical
from abliterate.model.devices import bake_blockers
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
    """What an edit needs to know about ``writer`` (named as the model's parameters), its
    post-norm gains read from ``store`` under the store's own names."""
    gain = anatomy.norm_gain(store.locate(writer), store.read)
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


def _check_bias(store: WeightStore, writer: Writer, edits: list[WriterEdit], create: bool) -> bool:
    """Whether ``writer`` (as ``store`` names it) needs a zero bias created before ``edits``
    are written: they add a constant to its output (:attr:`~abliterate.core.edits.WriterEdit.
    needs_bias`) and it has no bias. Raises when that bias cannot or may not be created."""
    has_bias = writer.bias is not None and store.has(writer.bias)
    needing = [e for e in edits if e.needs_bias]
    if has_bias or writer.role == "embedding" or not needing:
        return False
    if not all(e.creates_bias for e in needing):
        raise UnsupportedArchitectureError(
            f"the edit adds a constant to the output of {writer.tensor}, which has no bias "
            "to hold it (affine mode needs writers with biases); use another edit mode."
        )
    if writer.bias is None or writer.expert is not None:
        raise ValueError(
            f"{writer.name} cannot carry an output bias, so a constant added to its output "
            "cannot be baked into the weights; apply the edit with hooks instead"
        )
    if not create or not isinstance(store, BiasStore):
        raise ValueError(
            f"{writer.name} has no bias, and a constant added to its output can be baked only "
            "into an in-memory model (given a zero bias first), not through "
            f"{type(store).__name__} here; apply the edit with hooks, or bake it into the "
            "in-memory model"
        )
    return True


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    # An edited weight with a NaN would be evaluated as garbage and exported as such.
    if first_nonfinite([(name, tensor)]) is not None:
        raise NonFiniteError(
            f"the edit produced non-finite values (NaN or inf) in {name}; the edited model is "
            "not usable and is not exported (is the direction or a strength degenerate?)."
        )


def planned_edits(
    edit: Edit, store: WeightStore, anatomy: Anatomy, *, create_biases: bool = False
) -> list[tuple[Writer, list[WriterEdit]]]:
    """Every writer of ``anatomy`` with its :class:`~abliterate.core.edits.WriterEdit` list
    (empty: unchanged), checked before any is written, so that a refused edit changes nothing.

    Args:
        create_biases: The caller creates a zero bias (:class:`~abliterate.model.stores.
            BiasStore`) on writers without one whose edits add a constant and allow it
            (:attr:`~abliterate.core.edits.WriterEdit.creates_bias`: steering);
            :func:`apply_edit` does. Without it such writers are refused too.

    Raises:
        UnsupportedArchitectureError: the edit adds a constant to a writer that has no bias
            and the edit does not allow one to be created (affine ablation).
        ValueError: it allows one, but this writer or store cannot have one created.
    """
    planned = [(w, edit.writer_edits(writer_info(w, store, anatomy))) for w in anatomy.writers]
    for writer, edits in planned:
        _check_bias(store, store.locate(writer), edits, create_biases)
    return planned


def apply_edit(edit: Edit, store: WeightStore, anatomy: Anatomy) -> EditSummary:
    """Permanently apply ``edit`` to every writer of ``anatomy`` held in ``store``.

    Writers that share a stored tensor (the experts of a fused expert tensor) are edited in one
    read-modify-write of it, so a store on disk reads and writes each tensor once. Every
    rewritten tensor is checked finite as soon as it is written, so no store (and no exported
    model) ever keeps a NaN that an edit produced.

    Raises:
        ValueError: the edit does not fit the model's shape, or adds a constant to the output
            of a writer that has no bias and cannot be given one (checked before any write).
        NonFiniteError: the edit produced NaN or infinite values in a tensor (named).
        UnsupportedArchitectureError: the edit adds a constant to a writer that has no bias
            (:attr:`~abliterate.core.edits.WriterEdit.needs_bias`) and may not be given one
            (affine ablation; steering's get a zero bias created first); nothing is changed.
    """
    edit.check(anatomy.d_model, anatomy.n_layers)
    planned = planned_edits(edit, store, anatomy, create_biases=True)
    summary = EditSummary()
    weights: dict[str, list[tuple[Writer, list[WriterEdit]]]] = {}
    biases: dict[str, list[tuple[Writer, list[WriterEdit]]]] = {}
    for writer, edits in planned:
        if not edits:
            continue
        stored = store.locate(writer)
        weights.setdefault(stored.tensor, []).append((stored, edits))
        if _check_bias(store, stored, edits, create=True):
            assert isinstance(store, BiasStore) and stored.bias is not None
            store.create_bias(stored.bias, anatomy.d_model, like=stored.tensor)
        if stored.bias is not None and store.has(stored.bias):
            biases.setdefault(stored.bias, []).append((stored, edits))
        summary.writers_by_role[writer.role] = summary.writers_by_role.get(writer.role, 0) + 1
    for name, group in weights.items():
        with store.writable(name) as tensor:
            for w, edits in group:
                chunk = EMBEDDING_CHUNK if w.layout == "embedding" else None
                _rewrite(canonical(tensor, w.layout, w.expert), edits, chunk)
            _check_finite(name, tensor)
        summary.tensors.append(name)
    for name, group in biases.items():
        with store.writable(name) as tensor, torch.no_grad():
            for w, edits in group:
                b = tensor if w.expert is None else tensor[w.expert]
                new = b
                for e in edits:
                    new = e.bias(new)
                b.copy_(new.to(b.dtype))
            _check_finite(name, tensor)
        summary.tensors.append(name)
    return summary


def bake(model: nn.Module, edit: Edit) -> EditSummary:
    """Permanently apply ``edit`` to an in-memory model (a tied head is untied first).

    Raises:
        UnsupportedArchitectureError: some weights are quantized or offloaded by a device map
            (:func:`~abliterate.model.devices.bake_blockers`); editing them in place would
            write nothing, or quantization error.
    """
    blocker = bake_blockers(model)
    if blocker is not None:
        raise UnsupportedArchitectureError(
            f"cannot edit this model's weights in place: {blocker}. Bake the edit into a "
            "full-precision copy held in memory (run does so with --load-in or an offloading "
            "--device-map)."
        )
    return apply_edit(edit, ModuleStore(model), anatomy_of(model).anatomy)
