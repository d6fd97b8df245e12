"""Directional ablation: remove a direction (or a few) from the residual writers.

An :class:`Ablation` says which direction to remove from which writers, at which strength per
layer, and how. For a writer ``y = W x + b`` and unit direction ``d``, removing ``s`` times the
projection gives ``y - s d dᵀ y = (W - s d dᵀ W) x + (b - s d dᵀ b)``, so hooks and weights are
equal in exact arithmetic, and with ``s = 1`` every residual write (hence the whole stream) is
orthogonal to ``d``. Strength 0 leaves a writer untouched.

Refinements that are part of the edit:

* *per-layer directions*: the writers of layer ``i`` remove ``layer_directions[i]`` instead of
  the one global direction (the embedding always uses the global one);
* *extra directions*: a few more directions removed together with the main one (from every
  writer the edit touches, at the same strength). Each writer then removes the orthogonal
  projection onto the span ``B`` of its direction and the extras: ``y - s B Bᵀ y``, with ``B``
  an orthonormal basis (so one direction is the case ``B = d``);
* *norm-preserving* mode: each write vector (a column of a writer's weight, a row of the
  embedding) is projected and then rescaled to its original norm, so the edit only rotates
  what a writer can write instead of also shrinking it. The edited weight is
  ``(W - s d dᵀW) diag(r)`` with ``r`` the per-column rescaling, so the hook scales the
  writer's input by ``r`` and projects its output. Biases are only projected (a bias is one
  constant offset, not a family of write vectors whose relative sizes matter);
* *post-norm writers* (Gemma 2/3, OLMo 2): the write is ``g ⊙ y / rms(y)``, whose component
  along ``v`` is ``(y · (g ⊙ v)) / rms(y)``; removing the normalised ``g ⊙ v`` from ``y`` makes
  it exactly zero;
* *affine* mode (affine concept editing, Marshall et al. 2024): each attention and MLP writer
  removes the direction around its own mean write ``μ`` on harmless prompts instead of through
  the origin: ``y - s ((y - μ) · d) d = (W - s d dᵀ W) x + (b - s d dᵀ b) + s (μ · d) d``. At
  full strength every write's component along ``d`` is the harmless mean's, so the stream's is
  too (the stream is the sum of the writes): harmful prompts are moved to where harmless ones
  sit along ``d``, not to 0, which harmless prompts never visit. The weight form adds a
  constant to the writer's bias, so it needs writers that have one
  (:attr:`~abliterate.core.edits.WriterEdit.needs_bias`). The embedding (whose mean at the
  last prompt token is one fixed template token) is projected through the origin as in plain
  mode; post-norm writers and experts (whose writes are normalised or gated, so a constant
  added to them is not a constant in the stream) are refused.

Which strength applies to which writer: the embedding takes ``embedding``; attention outputs
and other token mixers take ``attention[layer]``; MLP outputs, routed experts and shared
experts take ``mlp[layer]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from abliterate.core.directions import Direction
from abliterate.core.edits import Edit, WriterEdit, WriterInfo, strengths_finite
from abliterate.core.linalg import (
    as_basis,
    edit_write_vectors,
    norm_scales,
    orthonormal_rows,
    project_out,
    remove_span,
)

EditMode = Literal["plain", "norm_preserving", "affine"]
EDIT_MODES: tuple[EditMode, ...] = ("plain", "norm_preserving", "affine")


@dataclass(frozen=True, eq=False)
class ProjectionEdit(WriterEdit):
    """Remove ``strength`` times the span of ``basis`` from one writer.

    Attributes:
        basis: ``(d_model,)`` unit vector, or ``(k, d_model)`` orthonormal rows.
        strength: 1 removes the span, 0 leaves the writer alone.
        norm_preserving: Rescale every edited write vector to its original norm.
        embedding: The writer is the token embedding (its outputs are its write vectors).
        offset: ``(d_model,)`` constant added to the projected output (affine mode:
            ``s B Bᵀ μ``), held by the bias in the weight form; None adds nothing.
    """

    basis: torch.Tensor
    strength: float
    norm_preserving: bool
    embedding: bool
    offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.offset is not None and (self.embedding or self.norm_preserving):
            raise ValueError("only plain linear writers take an affine offset")

    @property
    def needs_bias(self) -> bool:
        return self.offset is not None

    def input_scale(self, weight: torch.Tensor) -> torch.Tensor | None:
        if not self.norm_preserving or self.embedding:
            return None
        columns = weight.detach().T.float()  # (d_in, d_model)
        edited = remove_span(columns, as_basis(self.basis, columns), self.strength)
        return norm_scales(columns, edited)

    def output(self, y: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        if self.embedding and self.norm_preserving:
            # An embedding's outputs are columns of its weight: edit them as the weight is.
            flat = y.reshape(-1, y.shape[-1])  # (batch * pos, d_model)
            return (
                edit_write_vectors(flat, self.basis, self.strength, True).to(y.dtype).view(y.shape)
            )
        # Norm-preserving linear writers: the input was rescaled (input_scale), so projecting the
        # output gives (W - s B Bᵀ W) diag(r) x + (b - s B Bᵀ b), the edited weight's output.
        if self.offset is None:
            return project_out(y, self.basis, self.strength)
        projected = remove_span(y.float(), as_basis(self.basis, y), self.strength)
        return (projected + self.offset.to(y.device)).to(y.dtype)

    def columns(self, w: torch.Tensor, start: int) -> torch.Tensor:
        if self.embedding or self.norm_preserving:
            return edit_write_vectors(w.T, self.basis, self.strength, self.norm_preserving).T
        wf = w.float()  # (d_model, k); the writer's output is W x + b, so project W's columns
        basis = as_basis(self.basis, wf)  # (k_dirs, d_model)
        return wf - self.strength * basis.T @ (basis @ wf)

    def bias(self, b: torch.Tensor) -> torch.Tensor:
        if self.offset is None:
            return project_out(b, self.basis, self.strength)
        projected = remove_span(b.float(), as_basis(self.basis, b), self.strength)
        return (projected + self.offset.to(b.device)).to(b.dtype)


@dataclass(frozen=True, eq=False)
class Ablation(Edit):
    """The complete, serializable description of a directional ablation.

    Attributes:
        direction: Unit direction to remove (from the embedding, and from every layer when
            ``layer_directions`` is None).
        embedding: Strength applied to the token embedding.
        attention: Per-layer strength for attention outputs (and other token mixers).
        mlp: Per-layer strength for MLP outputs (and every routed and shared expert).
        layer_directions: Optional unit direction per layer, removed from that layer's writers.
        mode: ``"plain"`` projection, ``"norm_preserving"`` or ``"affine"`` (see the module
            docstring).
        extra_directions: Further directions removed together with each writer's direction.
        harmless_means: Affine mode only: ``(2, n_layers, d_model)`` mean write of each
            attention (row 0) and MLP (row 1) writer on harmless prompts
            (:meth:`~abliterate.measure.candidates.Candidates.writer_means`).
    """

    direction: Direction
    embedding: float
    attention: tuple[float, ...]
    mlp: tuple[float, ...]
    layer_directions: tuple[Direction, ...] | None = None
    mode: EditMode = "plain"
    extra_directions: tuple[Direction, ...] = ()
    harmless_means: torch.Tensor | None = None
    kind: ClassVar[str] = "directional_ablation"

    def __post_init__(self) -> None:
        object.__setattr__(self, "embedding", strengths_finite([self.embedding], "strength")[0])
        object.__setattr__(self, "attention", strengths_finite(self.attention, "strength"))
        object.__setattr__(self, "mlp", strengths_finite(self.mlp, "strength"))
        if len(self.attention) != len(self.mlp):
            raise ValueError("attention and mlp strengths must cover the same layers")
        if self.layer_directions is not None and len(self.layer_directions) != len(self.attention):
            raise ValueError(
                f"layer_directions has {len(self.layer_directions)} entries for "
                f"{len(self.attention)} layers"
            )
        if self.mode not in EDIT_MODES:
            raise ValueError(f"mode must be one of {EDIT_MODES}, got {self.mode!r}")
        self._check_means()
        for d in self._all_directions():
            if not bool(torch.isfinite(d.vector).all()):
                raise ValueError("an ablation's directions must be finite")

    def _check_means(self) -> None:
        means = self.harmless_means
        if (self.mode == "affine") != (means is not None):
            raise ValueError("harmless_means are needed in affine mode, and only there")
        if means is None:
            return
        if tuple(means.shape[:2]) != (2, self.n_layers) or means.ndim != 3:
            raise ValueError(
                f"harmless_means must be (2, {self.n_layers}, d_model), got {tuple(means.shape)}"
            )
        if not bool(torch.isfinite(means).all()):
            raise ValueError("an ablation's harmless means must be finite")

    @classmethod
    def uniform(cls, direction: Direction, n_layers: int, strength: float = 1.0) -> Ablation:
        """Remove ``direction`` at ``strength`` from every writer of every layer."""
        return cls(
            direction=direction,
            embedding=strength,
            attention=(strength,) * n_layers,
            mlp=(strength,) * n_layers,
        )

    @property
    def n_layers(self) -> int:
        """Number of layers the edit covers."""
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

    def strength_for(self, writer: WriterInfo) -> float:
        """The strength this edit applies to ``writer``."""
        if writer.role == "embedding" or writer.layer is None:
            return self.embedding
        if writer.role in ("attention", "mixer"):
            return self.attention[writer.layer]
        return self.mlp[writer.layer]

    def writer_edit(self, writer: WriterInfo) -> WriterEdit | None:
        strength = self.strength_for(writer)
        if strength == 0.0:
            return None
        layer = None if writer.role == "embedding" else writer.layer
        if writer.norm_gain is not None:
            # Post-norm writer: remove g ⊙ v (see the module docstring).
            gain = writer.norm_gain.detach().to("cpu", torch.float32)
            basis = orthonormal_rows([gain * row for row in self.basis(layer)])
        elif not self.extra_directions:
            basis = (self.direction if layer is None else self.direction_of(layer)).vector
        else:
            basis = self.basis(layer)
        return ProjectionEdit(
            basis=basis,
            strength=strength,
            norm_preserving=self.mode == "norm_preserving",
            embedding=writer.role == "embedding",
            offset=self._offset(writer, basis, strength),
        )

    def _offset(
        self, writer: WriterInfo, basis: torch.Tensor, strength: float
    ) -> torch.Tensor | None:
        """Affine mode: ``s B Bᵀ μ`` for an attention or MLP writer (module docstring)."""
        if self.harmless_means is None or writer.role == "embedding" or writer.layer is None:
            return None
        if writer.norm_gain is not None or writer.role not in ("attention", "mlp"):
            what = "a post-norm writer" if writer.norm_gain is not None else f"a {writer.role}"
            raise ValueError(
                f"affine mode cannot edit {writer.name}, {what}: its write is normalised or "
                "gated, so a constant added to it is not a constant in the residual stream"
            )
        mean = self.harmless_means[0 if writer.role == "attention" else 1, writer.layer].float()
        rows = basis[None] if basis.ndim == 1 else basis  # (k, d_model) orthonormal
        return strength * (rows.T @ (rows @ mean))

    def _all_directions(self) -> list[Direction]:
        return [self.direction, *(self.layer_directions or ()), *self.extra_directions]

    def check(self, d_model: int, n_layers: int) -> None:
        if self.n_layers != n_layers:
            raise ValueError(f"the edit covers {self.n_layers} layers but the model has {n_layers}")
        for direction in self._all_directions():
            if direction.d_model != d_model:
                raise ValueError(
                    f"the direction has d_model={direction.d_model} but the model has {d_model}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
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

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"direction": self.direction.vector}
        if self.harmless_means is not None:
            out["harmless_means"] = self.harmless_means
        if self.layer_directions is not None:
            out["layer_directions"] = torch.stack([d.vector for d in self.layer_directions])
        if self.extra_directions:
            out["extra_directions"] = torch.stack([d.vector for d in self.extra_directions])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Ablation:
        def stacked(key: str) -> tuple[Direction, ...] | None:
            if data.get(key) is None or (key == "extra_directions" and not data[key]):
                return None
            return tuple(
                Direction.from_metadata(vec, meta)
                for vec, meta in zip(tensors[key], data[key], strict=True)
            )

        return cls(
            direction=Direction.from_metadata(tensors["direction"], data["direction"]),
            embedding=float(data["embedding"]),
            attention=tuple(float(x) for x in data["attention"]),
            mlp=tuple(float(x) for x in data["mlp"]),
            layer_directions=stacked("layer_directions"),
            mode=data.get("mode", "plain"),
            extra_directions=stacked("extra_directions") or (),
            harmless_means=tensors.get("harmless_means"),
        )

    def save(self, directory: str | Path) -> None:
        """Write the edit, plus ``direction.safetensors``/``.json`` (reusable with
        ``--direction``)."""
        super().save(directory)
        self.direction.save(Path(directory) / "direction")

    @classmethod
    def load_legacy(cls, directory: Path, data: Mapping[str, Any]) -> Ablation:
        """Read the layout of abliterate 0.1 runs: ``edit_spec.json`` beside
        ``direction.safetensors`` (+ ``layer_directions``/``extra_directions.safetensors``)."""
        from safetensors.torch import load_file

        tensors = {"direction": Direction.load(directory / "direction").vector}
        for key in ("layer_directions", "extra_directions"):
            if data.get(key):
                tensors[key] = load_file(str(directory / f"{key}.safetensors"))[key]
        return cls.from_dict(data, tensors)
