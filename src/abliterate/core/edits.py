"""Edits of the residual stream: the :class:`EditSpec`, reversible hooks and weight edits.

An :class:`EditSpec` says which direction to remove from which residual writers, at which
strength per layer, and how. Two things read it and must agree:

* :func:`ablation_hooks` — a context manager that projects the direction out of the output of
  every selected writer (embedding, attention output, MLP output) and removes its hooks on exit;
* :func:`orthogonalize_` — the permanent, in-place edit of the same writers' weights, so the
  exported model needs no hooks.

For a writer ``y = W x + b`` and unit direction ``d``, removing ``s`` times the projection gives
``y - s d dᵀ y = (W - s d dᵀ W) x + (b - s d dᵀ b)``, so hooks and weights are equal in exact
arithmetic, and with ``s = 1`` every residual write (hence the whole stream) is orthogonal to
``d``. Strength 0 leaves a writer untouched.

Two refinements are part of the spec:

* *per-layer directions*: the writers of layer ``i`` remove ``layer_directions[i]`` instead of
  the one global direction (the embedding always uses the global one);
* *extra directions*: a few more directions removed together with the main one (from every
  writer the spec touches, at the same strength). Each writer then removes the orthogonal
  projection onto the span ``B`` of its direction and the extras: ``y - s B Bᵀ y``, with ``B``
  an orthonormal basis (so one direction is the case ``B = d``);
* *norm-preserving* mode: each residual write vector (a column of a Linear writer's weight, a
  row of the embedding) is projected and then rescaled to its original norm, so the edit only
  rotates what a writer can write instead of also shrinking it. This is no longer a projection
  of the writer's *output* alone: the edited weight is ``(W - s d dᵀW) diag(r)`` with ``r`` the
  per-column rescaling, so its hooks scale the writer's input by ``r`` and project its output.
  Biases are only projected (a bias is one constant offset, not a family of write
  vectors whose relative sizes matter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from abliterate.core.directions import Direction
from abliterate.core.linalg import EditMode, orthonormal_rows

EDIT_MODES: tuple[EditMode, ...] = ("plain", "norm_preserving")


@dataclass(frozen=True)
class EditSpec:
    """The complete, serializable description of a directional ablation.

    Attributes:
        direction: Unit direction to remove (from the embedding, and from every layer when
            ``layer_directions`` is None).
        embedding: Strength applied to the token embedding.
        attention: Per-layer strength for the attention output projections.
        mlp: Per-layer strength for the MLP output projections.
        layer_directions: Optional unit direction per layer, removed from that layer's writers.
        extra_directions: Further directions removed together with each writer's direction
            (the span of both is projected out; see the module docstring).
        mode: ``"plain"`` projection, or ``"norm_preserving"`` (project, then restore each
            write vector's norm; see the module docstring).
    """

    direction: Direction
    embedding: float
    attention: tuple[float, ...]
    mlp: tuple[float, ...]
    layer_directions: tuple[Direction, ...] | None = None
    mode: EditMode = "plain"
    extra_directions: tuple[Direction, ...] = ()

    def __post_init__(self) -> None:
        if len(self.attention) != len(self.mlp):
            raise ValueError("attention and mlp strengths must cover the same layers")
        if self.layer_directions is not None and len(self.layer_directions) != len(self.attention):
            raise ValueError(
                f"layer_directions has {len(self.layer_directions)} entries for "
                f"{len(self.attention)} layers"
            )
        if self.mode not in EDIT_MODES:
            raise ValueError(f"mode must be one of {EDIT_MODES}, got {self.mode!r}")

    @classmethod
    def uniform(cls, direction: Direction, n_layers: int, strength: float = 1.0) -> EditSpec:
        """Remove ``direction`` at ``strength`` from every writer of every layer."""
        return cls(
            direction=direction,
            embedding=strength,
            attention=(strength,) * n_layers,
            mlp=(strength,) * n_layers,
        )

    @property
    def n_layers(self) -> int:
        """Number of layers the spec covers."""
        return len(self.attention)

    def direction_of(self, layer: int) -> Direction:
        """The direction removed from the writers of ``layer``."""
        if self.layer_directions is None:
            return self.direction
        return self.layer_directions[layer]

    def basis(self, layer: int | None) -> torch.Tensor:
        """``(k, d_model)`` orthonormal rows spanning what the writers of ``layer`` remove.

        ``layer=None`` is the embedding. Without extra directions this is the unit direction
        itself; extras that the span already contains (numerically) add nothing.
        """
        main = self.direction if layer is None else self.direction_of(layer)
        return orthonormal_rows([main.vector, *(d.vector for d in self.extra_directions)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description; the vectors themselves are saved by :meth:`save`."""
        return {
            "kind": "directional_ablation",
            "mode": self.mode,
            "direction": self.direction.metadata(),
            "embedding": self.embedding,
            "attention": list(self.attention),
            "mlp": list(self.mlp),
            "layer_directions": None
            if self.layer_directions is None
            else [d.metadata() for d in self.layer_directions],
            "extra_directions": [d.metadata() for d in self.extra_directions],
        }

    def save(self, directory: str | Path) -> None:
        """Write ``edit_spec.json`` and the direction(s) into ``directory``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.direction.save(d / "direction")
        if self.layer_directions is not None:
            stacked = torch.stack([x.vector for x in self.layer_directions])  # (layers, d_model)
            save_file(
                {"layer_directions": stacked.contiguous()}, d / "layer_directions.safetensors"
            )
        if self.extra_directions:
            stacked = torch.stack([x.vector for x in self.extra_directions])  # (k, d_model)
            save_file(
                {"extra_directions": stacked.contiguous()}, d / "extra_directions.safetensors"
            )
        (d / "edit_spec.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> EditSpec:
        """Read a spec written by :meth:`save`."""
        from safetensors.torch import load_file

        d = Path(directory)
        data = json.loads((d / "edit_spec.json").read_text())
        layer_directions = None
        if data.get("layer_directions") is not None:
            stacked = load_file(d / "layer_directions.safetensors")["layer_directions"]
            layer_directions = tuple(
                Direction.from_metadata(vec, meta)
                for vec, meta in zip(stacked, data["layer_directions"], strict=True)
            )
        extra: tuple[Direction, ...] = ()
        if data.get("extra_directions"):
            stacked = load_file(d / "extra_directions.safetensors")["extra_directions"]
            extra = tuple(
                Direction.from_metadata(vec, meta)
                for vec, meta in zip(stacked, data["extra_directions"], strict=True)
            )
        return cls(
            direction=Direction.load(d / "direction"),
            embedding=float(data["embedding"]),
            attention=tuple(float(x) for x in data["attention"]),
            mlp=tuple(float(x) for x in data["mlp"]),
            layer_directions=layer_directions,
            mode=data.get("mode", "plain"),
            extra_directions=extra,
        )
