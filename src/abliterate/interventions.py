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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from abliterate.architecture import Architecture, resolve_architecture
from abliterate.directions import Direction

EditMode = Literal["plain", "norm_preserving"]
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


def orthonormal_rows(vectors: list[torch.Tensor], tol: float = 1e-6) -> torch.Tensor:
    """Gram-Schmidt (twice, in float64) of ``vectors``, in order: ``(k, d_model)`` float32.

    The first row is the first vector normalised; a vector whose remainder is below ``tol``
    times its norm (already in the span) is dropped.
    """
    rows: list[torch.Tensor] = []
    for v in vectors:
        w = v.detach().to("cpu", torch.float64).flatten()
        norm = float(w.norm())
        for _ in range(2):  # re-orthogonalising once makes classical Gram-Schmidt stable
            for r in rows:
                w = w - (w @ r) * r
        if norm > 0 and float(w.norm()) > tol * norm:
            rows.append(w / w.norm())
    if not rows:
        raise ValueError("no nonzero direction to build a basis from")
    return torch.stack(rows).float()


def _as_basis(direction: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(d_model,)`` direction or ``(k, d_model)`` orthonormal basis as float32 rows."""
    b = direction.to(like.device, torch.float32)
    return b.unsqueeze(0) if b.ndim == 1 else b


def _remove(xf: torch.Tensor, basis: torch.Tensor, strength: float) -> torch.Tensor:
    """``x - s (x Bᵀ) B`` for float32 ``x`` (..., d_model) and orthonormal rows ``B``."""
    if basis.shape[0] == 1:  # the common case, without a (…, 1) matrix product
        d = basis[0]
        return xf - strength * (xf @ d).unsqueeze(-1) * d
    return xf - strength * (xf @ basis.T) @ basis


def project_out(x: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """``x - strength (x · d) d`` along the last axis (float32 math, result in x's dtype).

    ``direction`` is a unit vector, or ``(k, d_model)`` orthonormal rows whose span is removed.
    """
    return _remove(x.float(), _as_basis(direction, x), strength).to(x.dtype)


def edit_write_vectors(
    rows: torch.Tensor, direction: torch.Tensor, strength: float, mode: EditMode
) -> torch.Tensor:
    """Remove ``strength`` times the ``direction`` component from each row, in float32.

    ``rows`` is ``(n, d_model)``, one residual write vector per row; ``direction`` is a unit
    vector or ``(k, d_model)`` orthonormal rows. In ``norm_preserving`` mode every edited row
    is rescaled to its original norm (a row that the edit reduces to zero stays zero).
    """
    rf = rows.float()
    edited = _remove(rf, _as_basis(direction, rows), strength)
    if mode == "norm_preserving":
        edited = edited * _norm_scales(rf, edited).unsqueeze(-1)
    return edited


def _norm_scales(rows: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Per row, ``|row| / |edited row|`` (1 where the edit left nothing to rescale)."""
    old, new = rows.norm(dim=-1), edited.norm(dim=-1)
    return torch.where(new > 0, old / new.clamp(min=1e-30), torch.ones_like(new))


def _check(spec: EditSpec, arch: Architecture) -> None:
    if spec.n_layers != arch.n_layers:
        raise ValueError(
            f"the edit spec covers {spec.n_layers} layers but the model has {arch.n_layers}"
        )
    directions = [spec.direction, *(spec.layer_directions or ()), *spec.extra_directions]
    for direction in directions:
        if direction.d_model != arch.d_model:
            raise ValueError(
                f"the direction has d_model={direction.d_model} but the model has {arch.d_model}"
            )


def _writers(spec: EditSpec, arch: Architecture) -> Iterator[tuple[nn.Module, float, torch.Tensor]]:
    """Every (writer module, strength, basis) the spec touches, skipping strength 0.

    The basis is the unit direction (``(d_model,)``) for a one-direction spec, else the
    ``(k, d_model)`` orthonormal rows of :meth:`EditSpec.basis`.
    """

    def basis(layer: int | None) -> torch.Tensor:
        if not spec.extra_directions:
            return (spec.direction if layer is None else spec.direction_of(layer)).vector
        return spec.basis(layer)

    if spec.embedding != 0.0:
        yield arch.embedding, spec.embedding, basis(None)
    for i in range(arch.n_layers):
        if spec.attention[i] == 0.0 and spec.mlp[i] == 0.0:
            continue
        b = basis(i)
        if spec.attention[i] != 0.0:
            yield arch.attn_out[i], spec.attention[i], b
        if spec.mlp[i] != 0.0:
            yield arch.mlp_out[i], spec.mlp[i], b


@torch.no_grad()
def _column_scales(linear: nn.Linear, d: torch.Tensor, strength: float) -> torch.Tensor:
    """``(d_in,)`` norm-preserving rescaling of each write vector (weight column)."""
    columns = linear.weight.detach().T.float()  # (d_in, d_model)
    return _norm_scales(columns, _remove(columns, _as_basis(d, columns), strength))


def _edited_linear(
    linear: nn.Linear, d: torch.Tensor, strength: float, mode: EditMode
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The edited weight and bias of a residual writer, in the writer's dtype.

    weight: ``(d_model, d_in)``; its columns are the write vectors, hence the transposes.
    """
    w = linear.weight.detach()
    weight = edit_write_vectors(w.T, d, strength, mode).T.to(w.dtype)
    bias = None
    if linear.bias is not None:
        b = linear.bias.detach()
        bias = edit_write_vectors(b.unsqueeze(0), d, strength, "plain")[0].to(b.dtype)
    return weight.contiguous(), bias


@contextmanager
def ablation_hooks(model: nn.Module, spec: EditSpec) -> Iterator[None]:
    """Temporarily remove ``spec.direction`` from the selected residual writers' outputs.

    The hooks are removed when the block exits, also on error, so the model is unchanged after.
    """
    arch = resolve_architecture(model)
    _check(spec, arch)
    handles = []

    def projecting_hook(vector: torch.Tensor, strength: float) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            return project_out(output, vector, strength)  # (batch, pos, d_model)

        return hook

    def rescaling_hook(vector: torch.Tensor, strength: float) -> Any:
        # An embedding's outputs are rows of its weight, so editing the output rows is the
        # weight edit itself.
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            flat = output.reshape(-1, output.shape[-1])  # (batch * pos, d_model)
            edited = edit_write_vectors(flat, vector, strength, spec.mode)
            return edited.to(output.dtype).view(output.shape)

        return hook

    def input_scaling_hook(scales: torch.Tensor) -> Any:
        def hook(_module: nn.Module, inputs: Any) -> Any:
            return (inputs[0] * scales.to(inputs[0].dtype), *inputs[1:])  # (batch, pos, d_in)

        return hook

    try:
        for module, strength, vector in _writers(spec, arch):
            if spec.mode == "norm_preserving" and isinstance(module, nn.Embedding):
                handles.append(module.register_forward_hook(rescaling_hook(vector, strength)))
                continue
            if spec.mode == "norm_preserving":
                # The norm-preserving weight is (W - s d dᵀW) diag(r), with r the per-column
                # rescaling, so its output is the projection of W (r ⊙ x) (bias included, which
                # is only projected): scale the input, then project the output as in plain mode.
                # No weight copy and no second matrix product.
                handles.append(
                    module.register_forward_pre_hook(
                        input_scaling_hook(_column_scales(module, vector, strength))  # type: ignore[arg-type]
                    )
                )
            handles.append(module.register_forward_hook(projecting_hook(vector, strength)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def maybe_hooks(model: nn.Module, spec: EditSpec | None) -> Iterator[None]:
    """:func:`ablation_hooks` when a spec is given, else nothing (the unedited model)."""
    if spec is None:
        yield
        return
    with ablation_hooks(model, spec):
        yield


def _untie_lm_head(model: nn.Module, arch: Architecture) -> None:
    """Give the output head its own copy of the weights before the embedding is edited."""
    if arch.lm_head.weight is arch.embedding.weight:
        arch.lm_head.weight = nn.Parameter(arch.embedding.weight.detach().clone())
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
        if text_config is not None:
            text_config.tie_word_embeddings = False


@torch.no_grad()
def _orthogonalize_linear(
    linear: nn.Linear, d: torch.Tensor, strength: float, mode: EditMode
) -> None:
    if mode == "plain":
        # weight: (d_model, d_in); the writer's output is W x + b, so project W's columns.
        w = linear.weight.data
        wf = w.float()
        basis = _as_basis(d, wf)  # (k, d_model)
        wf -= strength * basis.T @ (basis @ wf)
        w.copy_(wf.to(w.dtype))
        if linear.bias is not None:
            linear.bias.data.copy_(project_out(linear.bias.data, d, strength))
        return
    # The very function the norm-preserving hook uses, so hooks and weights cannot drift.
    weight, bias = _edited_linear(linear, d, strength, mode)
    linear.weight.data.copy_(weight)
    if bias is not None:
        linear.bias.data.copy_(bias)


@torch.no_grad()
def _orthogonalize_embedding(
    emb: nn.Embedding, d: torch.Tensor, strength: float, mode: EditMode
) -> None:
    # weight: (vocab, d_model); each row is a residual write. Chunked so that a large vocabulary
    # never needs a full float32 copy at once.
    w = emb.weight.data
    for start in range(0, w.shape[0], 16384):
        rows = w[start : start + 16384]
        rows.copy_(edit_write_vectors(rows, d, strength, mode).to(rows.dtype))


def orthogonalize_(model: nn.Module, spec: EditSpec) -> None:
    """Permanently apply ``spec`` to the model's weights, in place.

    The result equals running the unedited model under :func:`ablation_hooks` with the same spec.
    When the embedding is edited and tied to the output head, the head is untied first (and
    ``tie_word_embeddings`` set to False) so the output projection keeps its original weights.
    """
    arch = resolve_architecture(model)
    _check(spec, arch)
    if spec.embedding != 0.0:
        _untie_lm_head(model, arch)
    for module, strength, vector in _writers(spec, arch):
        if isinstance(module, nn.Embedding):
            _orthogonalize_embedding(module, vector, strength, spec.mode)
        else:
            _orthogonalize_linear(module, vector, strength, spec.mode)  # type: ignore[arg-type]
