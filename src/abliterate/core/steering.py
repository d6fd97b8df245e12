"""Steering: add a multiple of a behaviour direction to the residual stream.

A :class:`Steering` edit adds ``strength · v_L`` at one residual site of each chosen layer
``L`` for every token, ``v_L`` being row ``L`` of a :class:`~abliterate.core.directions.
DirectionSet` (a behaviour direction from ``abliterate direction``, a refusal direction, any
combination of them). Strength 0 is the identity; a negative strength subtracts.

Adding a constant at a residual site is adding it to the output of the last residual writer
before that site, so the edit is a plain :class:`~abliterate.core.edits.WriterEdit`:

* site ``post`` of layer ``L`` (the block output) follows layer ``L``'s MLP output;
* site ``pre`` of layer ``L`` is site ``post`` of layer ``L - 1``;
* site ``mid`` of layer ``L`` follows layer ``L``'s attention output (or other token mixer).

As a hook the writer's output becomes ``y + c·v``. As a weight change it is an output bias
``b + c·v`` on that writer (most models have no such bias: the weight store creates a zero one
first, see :attr:`~abliterate.core.edits.WriterEdit.creates_bias`). Both forms are exact.

Two places refuse a constant addition rather than add something else: site ``pre`` of layer 0,
the token embedding's output, which some families rescale after the lookup (Gemma multiplies it
by √d_model, so a change of the embedding rows and a change of its output differ), and a writer
followed by a normalisation (Gemma-2-style post-norms), whose output is normalised before it
reaches the stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from abliterate.core.directions import Direction, DirectionSet
from abliterate.core.edits import Edit, WriterEdit, WriterInfo, strengths_finite
from abliterate.types import SITES, Site


@dataclass(frozen=True, eq=False)
class AddEdit(WriterEdit):
    """Add a constant vector to one writer's output: an output bias.

    Attributes:
        vector: ``(d_model,)`` float32, what every token's write gains.
    """

    vector: torch.Tensor

    def output(self, y: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        return y + self.vector.to(y.device, y.dtype)

    def columns(self, w: torch.Tensor, start: int) -> torch.Tensor:
        return w.float()

    def bias(self, b: torch.Tensor) -> torch.Tensor:
        return b.float() + self.vector.to(b.device)

    @property
    def needs_bias(self) -> bool:
        return True

    @property
    def creates_bias(self) -> bool:
        return True


def site_of_writer(writer: WriterInfo) -> list[tuple[Site, int]]:
    """The residual sites (with their layer) that ``writer`` is the last writer before.

    The MLP output of layer ``L`` precedes site ``post`` of ``L`` and ``pre`` of ``L + 1``; an
    attention output (or other token mixer) precedes ``mid`` of its layer. Experts write only
    for the tokens routed to them, and the token embedding's output may be rescaled (module
    docstring), so no constant addition goes through them: they precede nothing here.
    """
    if writer.role == "embedding" or writer.layer is None:
        return []
    if writer.role == "mlp":
        return [("post", writer.layer), ("pre", writer.layer + 1)]
    if writer.role in ("attention", "mixer"):
        return [("mid", writer.layer)]
    return []


@dataclass(frozen=True, eq=False)
class Steering(Edit):
    """Add ``strength`` times a direction set's rows at its site (see the module docstring).

    Attributes:
        directions: The rows to add, one per layer, read at ``directions.site``.
        strength: Multiplier of every row (0: the identity).
        layers: The layers steered (a subset of ``directions.layers``); None steers them all.
    """

    directions: DirectionSet
    strength: float
    layers: tuple[int, ...] | None = None
    kind: ClassVar[str] = "steering"

    def __post_init__(self) -> None:
        object.__setattr__(self, "strength", strengths_finite([self.strength], "strength")[0])
        if self.directions.site not in SITES:
            raise ValueError(
                "the direction set does not say at which residual site it was read "
                f"(site {self.directions.site!r}); steering needs one of {', '.join(SITES)}"
            )
        if self.layers is not None:
            layers = tuple(sorted({int(x) for x in self.layers}))
            missing = [x for x in layers if x not in self.directions.layers]
            if missing or not layers:
                raise ValueError(
                    f"cannot steer layers {missing or '(none)'}: the direction set has layers "
                    f"{list(self.directions.layers)}"
                )
            object.__setattr__(self, "layers", layers)

    @classmethod
    def from_direction(cls, direction: Direction, strength: float) -> Steering:
        """Add ``strength × scale × d`` at the layer and site a single direction was taken at
        (``d`` unit, ``scale`` the norm of its mean difference): strength 1 adds back the mean
        difference the direction came from, as in activation addition."""
        if direction.layer is None or float(direction.layer) != int(direction.layer):
            raise ValueError(
                f"the direction has no integer layer ({direction.layer!r}) to steer at"
            )
        vector = direction.vector * (direction.scale / float(direction.vector.norm()))
        row = Direction(
            vector,
            layer=int(direction.layer),
            site=direction.site,
            scale=direction.scale,
            model=direction.model,
            revision=direction.revision,
            dataset_hashes=direction.dataset_hashes,
        )
        description = "one direction, at the scale of its mean difference"
        return cls(DirectionSet.from_directions([row], description), strength)

    @property
    def site(self) -> Site:
        """The residual site the vectors are added at."""
        assert self.directions.site is not None  # checked in __post_init__
        return self.directions.site

    @property
    def steered_layers(self) -> tuple[int, ...]:
        """The layers that receive an addition."""
        return self.directions.layers if self.layers is None else self.layers

    def vector_at(self, layer: int) -> torch.Tensor:
        """``(d_model,)`` what the edit adds at ``layer`` (zeros when it is not steered)."""
        if layer not in self.steered_layers:
            return torch.zeros(self.directions.d_model)
        return self.strength * self.directions.vectors[self.directions.layers.index(layer)]

    def writer_edit(self, writer: WriterInfo) -> WriterEdit | None:
        if self.strength == 0.0:
            return None
        targets = [layer for site, layer in site_of_writer(writer) if site == self.site]
        if not targets or targets[0] not in self.steered_layers:
            return None
        if writer.norm_gain is not None:
            raise ValueError(
                f"{writer.name} is normalised before it is added to the residual stream, so a "
                "constant cannot be added through it exactly; steer at another site"
            )
        return AddEdit(self.vector_at(targets[0]))

    def check(self, d_model: int, n_layers: int) -> None:
        if self.directions.d_model != d_model:
            raise ValueError(
                f"the direction set has d_model={self.directions.d_model} but the model has "
                f"{d_model}: it was computed for another model"
            )
        # Site "pre" of layer n_layers does not exist; "post" of the last layer does.
        bad = [x for x in self.steered_layers if x >= n_layers]
        if bad:
            raise ValueError(f"layers {bad} are out of range: the model has {n_layers} layers")
        if self.site == "pre" and 0 in self.steered_layers:
            raise ValueError(
                "site 'pre' of layer 0 is the token embedding's output, which some families "
                "rescale, so a constant cannot be added there exactly; steer from layer 1 on"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "strength": self.strength,
            "layers": None if self.layers is None else list(self.layers),
            "site": self.site,
            "directions": self.directions.metadata(),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vectors": self.directions.vectors}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Steering:
        directions = DirectionSet.from_record(tensors["vectors"], data["directions"])
        layers = data.get("layers")
        return cls(directions, float(data["strength"]), None if layers is None else tuple(layers))
