"""Directions in the residual stream: value types with provenance, arithmetic and exact files.

* :class:`Direction` is one vector (usually unit norm) with provenance (model, layer, site,
  prompt-set hashes) and the norm of the mean difference it came from. Saved as
  ``NAME.safetensors`` + ``NAME.json``.
* :class:`DirectionSet` is one vector per layer (a steering vector, a per-layer refusal set),
  saved as one ``.safetensors`` file whose header carries the provenance.

Both support arithmetic (``+ - * /``, negation; the result is a plain, unnormalised vector until
``normalized()`` is called), exact equality, and an exact save/load round trip. Arithmetic
between values of different shapes, layers, sites or models raises ``ValueError`` rather than
producing a vector that means nothing.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from abliterate.errors import DirectionFileError
from abliterate.files import write_bytes, write_json
from abliterate.types import Site


def _finite_scalar(value: object, op: Any) -> float:
    """``value`` as a float usable by ``op``; non-numbers, NaN, infinities and division by zero
    raise, since they would silently turn a direction into garbage."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a direction can be combined with a number, not {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"cannot scale a direction by {x}")
    if op is torch.div and x == 0.0:
        raise ZeroDivisionError("division of a direction by zero")
    return x


def _same_kind(value: object, cls: type, what: str) -> None:
    """Directions are added to and subtracted from directions only: a number added to every
    coordinate, or a coordinate-wise product of two directions, means nothing."""
    if not isinstance(value, cls):
        raise TypeError(f"{what} can be added to or subtracted from {what}, not "
                        f"{type(value).__name__}; numbers multiply or divide it")  # fmt: skip


def _check_same_model(a: str, b: str) -> None:
    if a and b and a != b:
        raise ValueError(f"directions of different models cannot be combined: {a!r} and {b!r}")


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
        vector = self.vector.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(vector).all()):
            raise ValueError("a Direction must hold finite values")
        object.__setattr__(self, "vector", vector)

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

    def _combine(self, other: Direction, op: Any) -> Direction:
        _same_kind(other, Direction, "a direction")
        if other.d_model != self.d_model:
            raise ValueError(f"d_model mismatch: {self.d_model} vs {other.d_model}")
        _check_same_model(self.model, other.model)
        if self.site is not None and other.site is not None and self.site != other.site:
            raise ValueError(f"site mismatch: {self.site!r} vs {other.site!r}")
        # A combination is no longer the mean difference of one layer: it keeps the provenance
        # both operands share (symmetrically, so a + b == b + a) and a neutral scale.
        return Direction(
            vector=op(self.vector, other.vector),
            scale=1.0,
            model=self.model or other.model,
            revision=self.revision if self.revision == other.revision else None,
            dataset_hashes=dict(sorted({**other.dataset_hashes, **self.dataset_hashes}.items())),
            projected=self.projected and other.projected,
        )

    def _scale(self, other: float, op: Any) -> Direction:
        return replace(self, vector=op(self.vector, _finite_scalar(other, op)))

    def __add__(self, other: Direction) -> Direction:
        return self._combine(other, torch.add)

    def __sub__(self, other: Direction) -> Direction:
        return self._combine(other, torch.sub)

    def __mul__(self, other: float) -> Direction:
        return self._scale(other, torch.mul)

    __rmul__ = __mul__

    def __truediv__(self, other: float) -> Direction:
        return self._scale(other, torch.div)

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
        from safetensors.torch import save

        base = Path(path).with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(Path(str(base) + ".safetensors"), save({"direction": self.vector.contiguous()}))
        write_json(Path(str(base) + ".json"), self.metadata())
        return Path(str(base) + ".safetensors")

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """Read a direction written by :meth:`save` (either file's path, or the common stem).

        Raises:
            DirectionFileError: a file is missing, unreadable, truncated or not written by
                :meth:`save`, or the vector is zero or not finite.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        base = Path(path).with_suffix("")
        try:
            tensors = load_file(str(base) + ".safetensors")
            meta = json.loads(Path(str(base) + ".json").read_text(encoding="utf-8"))
            direction = cls.from_metadata(tensors["direction"], meta)
        except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
            raise DirectionFileError(
                f"cannot read the direction {base}.safetensors/.json: {type(exc).__name__}: {exc}"
            ) from exc
        norm = float(direction.vector.norm())
        if not math.isfinite(norm) or norm == 0.0:
            raise DirectionFileError(f"the direction in {base}.safetensors is zero or not finite.")
        return direction


_SET_FORMAT = "abliterate.direction_set/1"


@dataclass(frozen=True, eq=False)
class DirectionSet:
    """One vector per layer of a model's residual stream.

    A steering vector, a per-layer refusal set or any behaviour direction computed from two
    prompt sets: row ``i`` is the direction at ``layers[i]``. Arithmetic works row by row and
    raises on any mismatch of layers, width, site or model; :meth:`normalized` makes every row
    a unit vector; ``scales`` keeps each row's natural magnitude (the norm of the raw mean
    difference) so a direction can be added back at its own size.

    Attributes:
        vectors: ``(n_rows, d_model)`` float32.
        layers: The layer of each row, increasing.
        site: Residual site the vectors were read at, or None.
        scales: Per-row natural magnitude (default 1.0 each).
        model, revision, dataset_hashes: Provenance, as for :class:`Direction`.
        description: Free text saying what the set means (e.g. "terse minus verbose").
    """

    vectors: torch.Tensor
    layers: tuple[int, ...]
    site: Site | None = None
    scales: tuple[float, ...] = ()
    model: str = ""
    revision: str | None = None
    dataset_hashes: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(
                f"a DirectionSet holds (layers, d_model) vectors, got {tuple(self.vectors.shape)}"
            )
        layers = tuple(int(x) for x in self.layers)
        if len(layers) != self.vectors.shape[0]:
            raise ValueError(f"{self.vectors.shape[0]} vectors for {len(layers)} layers")
        if any(b <= a for a, b in itertools.pairwise(layers)) or any(x < 0 for x in layers):
            raise ValueError(f"layers must be distinct, non-negative and increasing: {layers}")
        scales = tuple(float(s) for s in self.scales) or (1.0,) * len(layers)
        if len(scales) != len(layers):
            raise ValueError(f"{len(scales)} scales for {len(layers)} layers")
        vectors = self.vectors.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(vectors).all()):
            raise ValueError("a DirectionSet must hold finite values")
        object.__setattr__(self, "vectors", vectors)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "scales", scales)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> Direction:
        """The vector of ``layer`` as a :class:`Direction` (``KeyError`` if the set lacks it)."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in this set (layers {list(self.layers)})")
        i = self.layers.index(layer)
        return Direction(
            vector=self.vectors[i],
            layer=layer,
            site=self.site,
            scale=self.scales[i],
            model=self.model,
            revision=self.revision,
            dataset_hashes=dict(self.dataset_hashes),
        )

    @classmethod
    def from_directions(
        cls, directions: Sequence[Direction], description: str = ""
    ) -> DirectionSet:
        """Stack directions taken at distinct integer layers (provenance from the first)."""
        if not directions:
            raise ValueError("no directions to stack")
        ordered = sorted(directions, key=lambda d: float(d.layer if d.layer is not None else -1))
        layers = []
        for d in ordered:
            if d.layer is None or float(d.layer) != int(d.layer):
                raise ValueError(f"every direction needs an integer layer, got {d.layer!r}")
            layers.append(int(d.layer))
        first = ordered[0]
        return cls(
            vectors=torch.stack([d.vector for d in ordered]),
            layers=tuple(layers),
            site=first.site,
            scales=tuple(d.scale for d in ordered),
            model=first.model,
            revision=first.revision,
            dataset_hashes=dict(first.dataset_hashes),
            description=description,
        )

    def normalized(self) -> DirectionSet:
        """Every row scaled to unit norm (``ValueError`` if a row is zero)."""
        norms = self.vectors.norm(dim=-1, keepdim=True)
        if bool((norms == 0).any()):
            raise ValueError("cannot normalise a zero vector")
        return replace(self, vectors=self.vectors / norms)

    def _check_compatible(self, other: DirectionSet) -> None:
        if other.layers != self.layers:
            raise ValueError(f"layer mismatch: {list(self.layers)} vs {list(other.layers)}")
        if other.d_model != self.d_model:
            raise ValueError(f"d_model mismatch: {self.d_model} vs {other.d_model}")
        if self.site is not None and other.site is not None and self.site != other.site:
            raise ValueError(f"site mismatch: {self.site!r} vs {other.site!r}")
        _check_same_model(self.model, other.model)

    def _combine(self, other: DirectionSet, op: Any) -> DirectionSet:
        _same_kind(other, DirectionSet, "a direction set")
        self._check_compatible(other)
        hashes = {**self.dataset_hashes, **other.dataset_hashes}
        return replace(
            self,
            vectors=op(self.vectors, other.vectors),
            site=self.site or other.site,
            model=self.model or other.model,
            dataset_hashes=hashes,
        )

    def _scale(self, other: float, op: Any) -> DirectionSet:
        return replace(self, vectors=op(self.vectors, _finite_scalar(other, op)))

    def __add__(self, other: DirectionSet) -> DirectionSet:
        return self._combine(other, torch.add)

    def __sub__(self, other: DirectionSet) -> DirectionSet:
        return self._combine(other, torch.sub)

    def __mul__(self, other: float) -> DirectionSet:
        return self._scale(other, torch.mul)

    __rmul__ = __mul__

    def __truediv__(self, other: float) -> DirectionSet:
        return self._scale(other, torch.div)

    def __neg__(self) -> DirectionSet:
        return replace(self, vectors=-self.vectors)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirectionSet):
            return NotImplemented
        return self.metadata() == other.metadata() and torch.equal(self.vectors, other.vectors)

    __hash__ = None  # type: ignore[assignment]

    def metadata(self) -> dict[str, Any]:
        """Everything but the vectors, as JSON-ready data."""
        return {
            "format": _SET_FORMAT,
            "layers": list(self.layers),
            "site": self.site,
            "scales": list(self.scales),
            "model": self.model,
            "revision": self.revision,
            "dataset_hashes": dict(self.dataset_hashes),
            "description": self.description,
            "d_model": self.d_model,
        }

    def save(self, path: str | Path) -> Path:
        """Write one ``.safetensors`` file (vectors + provenance in its header), atomically."""
        from safetensors.torch import save

        target = Path(path)
        if target.suffix != ".safetensors":
            target = target.with_name(target.name + ".safetensors")
        target.parent.mkdir(parents=True, exist_ok=True)
        data = save({"vectors": self.vectors}, metadata={"abliterate": json.dumps(self.metadata())})
        write_bytes(target, data)
        return target

    @classmethod
    def load(cls, path: str | Path) -> DirectionSet:
        """Read a set written by :meth:`save`.

        Raises:
            DirectionFileError: the file is unreadable, truncated or not a direction set
                written by this tool.
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = (f.metadata() or {}).get("abliterate")
                vectors = f.get_tensor("vectors") if "vectors" in f.keys() else None  # noqa: SIM118
            meta = json.loads(header) if header is not None else None
        except (OSError, SafetensorError, ValueError) as exc:
            raise DirectionFileError(f"cannot read the direction set {path}: {exc}") from exc
        if vectors is None or not isinstance(meta, dict):
            raise DirectionFileError(f"{path} is not a direction set written by abliterate")
        if meta.get("format") != _SET_FORMAT:
            raise DirectionFileError(
                f"{path} has unknown format {meta.get('format')!r} (this version reads "
                f"{_SET_FORMAT})"
            )
        return cls.from_record(vectors, meta)

    @classmethod
    def from_record(cls, vectors: torch.Tensor, meta: Mapping[str, Any]) -> DirectionSet:
        """The set of ``vectors`` described by ``meta`` (the metadata its file or an edit's
        record stores: layers, site, scales, provenance)."""
        return cls(
            vectors=vectors,
            layers=tuple(meta["layers"]),
            site=meta["site"],
            scales=tuple(meta["scales"]),
            model=meta["model"],
            revision=meta["revision"],
            dataset_hashes=dict(meta["dataset_hashes"]),
            description=meta.get("description", ""),
        )
