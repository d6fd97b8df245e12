"""Edits of the residual stream: the :class:`EditSpec`, reversible hooks and weight edits.

An :class:`EditSpec` says which direction to remove from which residual writers, at which
strength per layer. Two things read it and must agree:

* :func:`ablation_hooks` — a context manager that projects the direction out of the output of
  every selected writer (embedding, attention output, MLP output) and removes its hooks on exit;
* :func:`orthogonalize_` — the permanent, in-place edit of the same writers' weights, so the
  exported model needs no hooks.

For a writer ``y = W x + b`` and unit direction ``d``, removing ``s`` times the projection gives
``y - s d dᵀ y = (W - s d dᵀ W) x + (b - s d dᵀ b)``, so hooks and weights are equal in exact
arithmetic, and with ``s = 1`` every residual write (hence the whole stream) is orthogonal to
``d``. Strength 0 leaves a writer untouched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abliterate.architecture import Architecture, resolve_architecture
from abliterate.directions import Direction


@dataclass(frozen=True)
class EditSpec:
    """The complete, serializable description of a directional ablation.

    Attributes:
        direction: Unit direction to remove.
        embedding: Strength applied to the token embedding.
        attention: Per-layer strength for the attention output projections.
        mlp: Per-layer strength for the MLP output projections.
    """

    direction: Direction
    embedding: float
    attention: tuple[float, ...]
    mlp: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.attention) != len(self.mlp):
            raise ValueError("attention and mlp strengths must cover the same layers")

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description; the vector itself is saved by :meth:`save`."""
        return {
            "kind": "directional_ablation",
            "direction": self.direction.metadata(),
            "embedding": self.embedding,
            "attention": list(self.attention),
            "mlp": list(self.mlp),
        }

    def save(self, directory: str | Path) -> None:
        """Write ``edit_spec.json`` and the direction into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.direction.save(d / "direction")
        (d / "edit_spec.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> EditSpec:
        """Read a spec written by :meth:`save`."""
        d = Path(directory)
        data = json.loads((d / "edit_spec.json").read_text())
        return cls(
            direction=Direction.load(d / "direction"),
            embedding=float(data["embedding"]),
            attention=tuple(float(x) for x in data["attention"]),
            mlp=tuple(float(x) for x in data["mlp"]),
        )


def project_out(x: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """``x - strength (x · d) d`` along the last axis (float32 math, result in x's dtype)."""
    d = direction.to(x.device, torch.float32)
    xf = x.float()
    return (xf - strength * (xf @ d).unsqueeze(-1) * d).to(x.dtype)


def _check(spec: EditSpec, arch: Architecture) -> None:
    if spec.n_layers != arch.n_layers:
        raise ValueError(
            f"the edit spec covers {spec.n_layers} layers but the model has {arch.n_layers}"
        )
    if spec.direction.d_model != arch.d_model:
        raise ValueError(
            f"the direction has d_model={spec.direction.d_model} but the model has {arch.d_model}"
        )


def _writers(spec: EditSpec, arch: Architecture) -> Iterator[tuple[nn.Module, float]]:
    """Every (writer module, strength) pair the spec touches, skipping strength 0."""
    pairs: list[tuple[nn.Module, float]] = [(arch.embedding, spec.embedding)]
    pairs += list(zip(arch.attn_out, spec.attention, strict=True))
    pairs += list(zip(arch.mlp_out, spec.mlp, strict=True))
    for module, strength in pairs:
        if strength != 0.0:
            yield module, strength


@contextmanager
def ablation_hooks(model: nn.Module, spec: EditSpec) -> Iterator[None]:
    """Temporarily remove ``spec.direction`` from the selected residual writers' outputs.

    The hooks are removed when the block exits, also on error, so the model is unchanged after.
    """
    arch = resolve_architecture(model)
    _check(spec, arch)
    vector = spec.direction.vector
    handles = []

    def make_hook(strength: float) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            return project_out(output, vector, strength)  # (batch, pos, d_model)

        return hook

    try:
        for module, strength in _writers(spec, arch):
            handles.append(module.register_forward_hook(make_hook(strength)))
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
def _orthogonalize_linear(linear: nn.Linear, d: torch.Tensor, strength: float) -> None:
    # weight: (d_model, d_in); the writer's output is W x + b, so project W's columns.
    w = linear.weight.data
    wf = w.float()
    dd = d.to(w.device, torch.float32)
    wf -= strength * torch.outer(dd, dd @ wf)
    w.copy_(wf.to(w.dtype))
    if linear.bias is not None:
        linear.bias.data.copy_(project_out(linear.bias.data, d, strength))


@torch.no_grad()
def _orthogonalize_embedding(emb: nn.Embedding, d: torch.Tensor, strength: float) -> None:
    # weight: (vocab, d_model); each row is a residual write. Chunked so that a large vocabulary
    # never needs a full float32 copy at once.
    w = emb.weight.data
    for start in range(0, w.shape[0], 16384):
        rows = w[start : start + 16384]
        rows.copy_(project_out(rows, d, strength))


def orthogonalize_(model: nn.Module, spec: EditSpec) -> None:
    """Permanently apply ``spec`` to the model's weights, in place.

    The result equals running the unedited model under :func:`ablation_hooks` with the same spec.
    When the embedding is edited and tied to the output head, the head is untied first (and
    ``tie_word_embeddings`` set to False) so the output projection keeps its original weights.
    """
    arch = resolve_architecture(model)
    _check(spec, arch)
    d = spec.direction.vector
    if spec.embedding != 0.0:
        _untie_lm_head(model, arch)
    for module, strength in _writers(spec, arch):
        if isinstance(module, nn.Embedding):
            _orthogonalize_embedding(module, d, strength)
        else:
            _orthogonalize_linear(module, d, strength)  # type: ignore[arg-type]
