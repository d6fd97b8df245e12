"""Learned weight deltas: ``W ← W + ΔW`` on named residual writers.

A :class:`WeightDelta` holds, for some residual writers, a learned change ``ΔW`` of their
canonical ``(d_model, d_in)`` weight (DINM's tuned MLP output projections are one source). As a
hook the writer's output becomes ``y + x ΔWᵀ`` (its input ``x`` is read, so the writer edit says
``uses_input``); as a weight change ``ΔW`` is added to the weight. Both are exact, and since a
delta is an ordinary edit it composes with the others: ``ablation.then(delta)`` applies the
delta to the abliterated weights, which is what editing an abliterated model and saving the
change gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from abliterate.core.edits import Edit, WriterEdit, WriterInfo


@dataclass(frozen=True, eq=False)
class DeltaEdit(WriterEdit):
    """Add ``ΔW`` (``(d_model, d_in)``) to one writer's weight."""

    delta: torch.Tensor
    uses_input: ClassVar[bool] = True

    def output(self, y: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        assert x is not None, "a weight delta reads the writer's input"
        # (..., d_in) @ (d_in, d_model): the output of ΔW for every token.
        return y + (x @ self.delta.to(x.device, x.dtype).T).to(y.dtype)

    def columns(self, w: torch.Tensor, start: int) -> torch.Tensor:
        delta = self.delta[:, start : start + w.shape[1]].to(w.device)
        return w.float() + delta


@dataclass(frozen=True)
class DeltaTarget:
    """Where a delta goes: the writer's name (its weight tensor), layer and role."""

    name: str
    layer: int | None
    role: str


@dataclass(frozen=True, eq=False)
class WeightDelta(Edit):
    """Learned changes of some writers' weights (see the module docstring).

    Attributes:
        targets: The writers changed, in order.
        deltas: ``(d_model, d_in)`` float32 ``ΔW`` per target, in the same order.
        provenance: JSON-ready record of how the deltas were learned (method, data, settings).
    """

    targets: tuple[DeltaTarget, ...]
    deltas: tuple[torch.Tensor, ...]
    provenance: Mapping[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = "weight_delta"

    def __post_init__(self) -> None:
        if len(self.targets) != len(self.deltas) or not self.targets:
            raise ValueError("a weight delta needs one tensor per target, and at least one")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"a writer appears twice among the targets: {names}")
        deltas = []
        for t, d in zip(self.targets, self.deltas, strict=True):
            if d.ndim != 2 or not bool(torch.isfinite(d).all()):
                raise ValueError(f"the delta of {t.name} must be a finite (d_model, d_in) matrix")
            deltas.append(d.detach().to("cpu", torch.float32).contiguous())
        object.__setattr__(self, "deltas", tuple(deltas))

    @classmethod
    def accumulate(
        cls, parts: Mapping[DeltaTarget, torch.Tensor], provenance: Mapping[str, Any]
    ) -> WeightDelta:
        """A delta from per-target changes (ordered by layer, then name)."""
        order = sorted(parts, key=lambda t: (-1 if t.layer is None else t.layer, t.name))
        return cls(tuple(order), tuple(parts[t] for t in order), dict(provenance))

    def delta_of(self, name: str) -> torch.Tensor | None:
        """The ``ΔW`` of the writer whose weight is called ``name``, or None."""
        for t, d in zip(self.targets, self.deltas, strict=True):
            if t.name == name:
                return d
        return None

    def writer_edit(self, writer: WriterInfo) -> WriterEdit | None:
        delta = self.delta_of(writer.name)
        return None if delta is None else DeltaEdit(delta)

    def check(self, d_model: int, n_layers: int) -> None:
        for t, d in zip(self.targets, self.deltas, strict=True):
            if d.shape[0] != d_model:
                raise ValueError(
                    f"the delta of {t.name} writes {d.shape[0]} features but the model has "
                    f"d_model={d_model}: it was learned on another model"
                )
            if t.layer is not None and not 0 <= t.layer < n_layers:
                raise ValueError(f"{t.name} is in layer {t.layer}; the model has {n_layers}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "targets": [
                {"name": t.name, "layer": t.layer, "role": t.role, "shape": list(d.shape)}
                for t, d in zip(self.targets, self.deltas, strict=True)
            ],
            "provenance": dict(self.provenance),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {t.name: d for t, d in zip(self.targets, self.deltas, strict=True)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> WeightDelta:
        targets = tuple(
            DeltaTarget(str(t["name"]), t["layer"], str(t["role"])) for t in data["targets"]
        )
        return cls(targets, tuple(tensors[t.name] for t in targets), dict(data["provenance"]))
