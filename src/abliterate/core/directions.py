"""Directions in the residual stream: the value type and the candidates computed from means.

A :class:`Direction` is a unit vector with provenance (model, layer, site, prompt-set hashes) and
the norm of the mean difference it came from. It supports arithmetic (the result is a plain,
unnormalised vector until :meth:`Direction.normalized` is called), exact equality and an exact
save/load round trip as ``NAME.safetensors`` + ``NAME.json``.

:class:`Candidates` holds the per-layer, per-site activation means of the harmful and harmless
sets (float64) and turns them into candidate directions; when the harmful set's per-prompt
activations of one site are kept too, it also gives the further directions of
:meth:`Candidates.extra_directions` (top singular vectors of the per-prompt differences).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from abliterate.types import Site


@dataclass(frozen=True, eq=False)
class Direction:
    """A direction in a model's residual stream.

    Attributes:
        vector: ``(d_model,)`` float32 tensor; unit norm for directions made by
            :meth:`Candidates.direction` or :meth:`normalized`.
        layer: Layer the direction was taken at (a float when interpolated), or None.
        site: Residual site ("pre", "mid" or "post"), or None.
        scale: Norm of the raw harmful-minus-harmless mean difference, for adding the
            direction back at its natural magnitude.
        model: Model id or path the activations came from.
        revision: Model revision (hub commit) if known.
        dataset_hashes: sha256 of every prompt set that went into the direction.
        projected: True when the component along the harmless mean was removed (see
            :meth:`Candidates.direction`).
    """

    vector: torch.Tensor
    layer: float | int | None = None
    site: Site | None = None
    scale: float = 1.0
    model: str = ""
    revision: str | None = None
    dataset_hashes: dict[str, str] = field(default_factory=dict)
    projected: bool = False

    def __post_init__(self) -> None:
        if self.vector.ndim != 1:
            raise ValueError(f"a Direction is a 1-D vector, got shape {tuple(self.vector.shape)}")
        object.__setattr__(self, "vector", self.vector.detach().to("cpu", torch.float32))

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.vector.shape[0])

    def normalized(self) -> Direction:
        """The same direction with unit norm."""
        norm = float(self.vector.norm())
        if norm == 0.0:
            raise ValueError("cannot normalise a zero vector")
        return replace(self, vector=self.vector / norm)

    def _combine(self, other: Direction | float, op: Any) -> Direction:
        if isinstance(other, Direction):
            if other.d_model != self.d_model:
                raise ValueError(f"d_model mismatch: {self.d_model} vs {other.d_model}")
            return replace(self, vector=op(self.vector, other.vector), layer=None, site=None)
        return replace(self, vector=op(self.vector, float(other)))

    def __add__(self, other: Direction) -> Direction:
        return self._combine(other, torch.add)

    def __sub__(self, other: Direction) -> Direction:
        return self._combine(other, torch.sub)

    def __mul__(self, other: float) -> Direction:
        return self._combine(other, torch.mul)

    __rmul__ = __mul__

    def __truediv__(self, other: float) -> Direction:
        return self._combine(other, torch.div)

    def __neg__(self) -> Direction:
        return replace(self, vector=-self.vector)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Direction):
            return NotImplemented
        return self.metadata() == other.metadata() and torch.equal(self.vector, other.vector)

    __hash__ = None  # type: ignore[assignment]

    @staticmethod
    def interpolate(a: Direction, b: Direction, t: float) -> Direction:
        """Normalised ``(1 - t) a + t b``; layer is interpolated when both have one."""
        vec = (1.0 - t) * a.vector + t * b.vector
        layer = None
        if a.layer is not None and b.layer is not None:
            layer = (1.0 - t) * float(a.layer) + t * float(b.layer)
        return replace(a, vector=vec, layer=layer).normalized()

    def metadata(self) -> dict[str, Any]:
        """Everything but the vector, as JSON-ready data."""
        return {
            "layer": self.layer,
            "site": self.site,
            "scale": self.scale,
            "model": self.model,
            "revision": self.revision,
            "dataset_hashes": dict(self.dataset_hashes),
            "projected": self.projected,
            "d_model": self.d_model,
        }

    @classmethod
    def from_metadata(cls, vector: torch.Tensor, meta: dict[str, Any]) -> Direction:
        """Rebuild a direction from its vector and :meth:`metadata`."""
        return cls(
            vector=vector,
            layer=meta["layer"],
            site=meta["site"],
            scale=meta["scale"],
            model=meta["model"],
            revision=meta["revision"],
            dataset_hashes=meta["dataset_hashes"],
            projected=bool(meta.get("projected", False)),
        )

    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors`` and ``path.json``; returns the safetensors path."""
        from safetensors.torch import save_file

        base = Path(path).with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        save_file({"direction": self.vector.contiguous()}, str(base) + ".safetensors")
        Path(str(base) + ".json").write_text(json.dumps(self.metadata(), indent=2) + "\n")
        return Path(str(base) + ".safetensors")

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """Read a direction written by :meth:`save` (either file's path, or the common stem)."""
        from safetensors.torch import load_file

        base = Path(path).with_suffix("")
        tensors = load_file(str(base) + ".safetensors")
        meta = json.loads(Path(str(base) + ".json").read_text())
        return cls.from_metadata(tensors["direction"], meta)
