"""Descent on per-layer strengths: the cheap objective is differentiable in them.

An :class:`~abliterate.core.ablation.Ablation`'s hooks compute ``y - s (y · d) d`` (plus an
input rescaling in norm-preserving mode, an offset in affine mode), smooth functions of each
writer's strength ``s``; so are the scorer's refusal likelihood and KL
(:mod:`abliterate.search.scoring`). :func:`descend` runs a few Adam steps on the attention and
MLP strength of every layer, through the same hooks (:class:`StrengthEdit` hands
:func:`~abliterate.edit.hooks.edit_hooks` writer edits whose strengths are tensors), minimising

    KL + penalty · max(0, log refusal - log cap)

on the validation prompts: damage goes down while the refusal likelihood stays at or below the
cap (the starting edit's, unless given). Sampling (TPE) picks the discrete parts of an edit and
a starting point; the descent tunes the 2 × n_layers continuous strengths that sampling would
need hundreds of trials for. Strengths are kept in ``[0, max_strength]`` (0: the writer is left
alone, which some models need most at their MLPs). The result is the best point visited: the
lowest KL among the steps whose refusal likelihood met the cap.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from abliterate.core.ablation import Ablation, ProjectionEdit
from abliterate.core.edits import Edit, WriterEdit, WriterInfo, edit_from_dict
from abliterate.edit.hooks import edit_hooks
from abliterate.progress import progress
from abliterate.search.scoring import EditScorer

log = logging.getLogger(__name__)


class StrengthEdit(Edit):
    """An :class:`Ablation` whose attention and MLP strengths are tensors (``(n_layers,)``,
    possibly requiring gradients); the embedding keeps its float strength.

    Its writer edits are the ablation's own, with the strength (and the affine offset, which is
    proportional to it) taken from the tensors, so hooks compute exactly what the hooks of
    :meth:`current` compute. Serialising it serialises :meth:`current`.
    """

    def __init__(self, shape: Ablation, attention: torch.Tensor, mlp: torch.Tensor) -> None:
        n = shape.n_layers
        if attention.shape != (n,) or mlp.shape != (n,):
            raise ValueError(f"strength tensors must have shape ({n},)")
        self.shape, self.attention, self.mlp = shape, attention, mlp
        # The same edit at strength 1 everywhere: every writer's basis and unit offset.
        self._unit = replace(shape, attention=(1.0,) * n, mlp=(1.0,) * n)

    def current(self) -> Ablation:
        """The ablation at the tensors' current values."""
        return replace(
            self.shape,
            attention=tuple(float(x) for x in self.attention.detach()),
            mlp=tuple(float(x) for x in self.mlp.detach()),
        )

    def writer_edit(self, writer: WriterInfo) -> WriterEdit | None:
        if writer.role == "embedding" or writer.layer is None:
            return self.shape.writer_edit(writer)
        unit = self._unit.writer_edit(writer)
        assert isinstance(unit, ProjectionEdit)
        tensors = self.attention if writer.role in ("attention", "mixer") else self.mlp
        s = tensors[writer.layer]
        offset = None if unit.offset is None else s * unit.offset
        # A tensor strength: ProjectionEdit's arithmetic is the same for floats and 0-d tensors.
        return replace(unit, strength=s, offset=offset)  # type: ignore[arg-type]

    def check(self, d_model: int, n_layers: int) -> None:
        self.shape.check(d_model, n_layers)

    def to_dict(self) -> dict[str, Any]:
        return self.current().to_dict()

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.current().tensors()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Edit:
        return edit_from_dict(data, tensors)


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """The model's parameters need no gradients while active (restored on exit): the descent
    differentiates with respect to strengths only, and weight gradients would double the cost
    of every backward pass."""
    needs = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in needs:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in needs:
            p.requires_grad_(flag)


@dataclass
class DescentResult:
    """The outcome of :func:`descend`.

    Attributes:
        edit: The best point visited (the start when no step improved on it).
        start, best: ``{"refusal", "refusal_prob", "kl"}`` at the start and at ``edit``.
        cap: The refusal likelihood the descent had to stay under.
        steps: Per step: ``{"step", "refusal", "kl", "loss"}`` at the point before its update.
    """

    edit: Ablation
    start: dict[str, float]
    best: dict[str, float]
    cap: float
    steps: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the edit is reported by its caller)."""
        return {"start": self.start, "best": self.best, "cap": self.cap, "steps": self.steps}


def descend(
    scorer: EditScorer,
    start: Ablation,
    *,
    steps: int,
    cap: float | None = None,
    lr: float = 0.05,
    penalty: float = 1.0,
    max_strength: float = 1.5,
    desc: str = "Descending on strengths",
) -> DescentResult:
    """Tune ``start``'s per-layer attention and MLP strengths (module docstring).

    Args:
        scorer: The validation prompts and the model the objective runs on.
        steps: Adam steps (each one forward and one backward pass over the prompts).
        cap: Refusal likelihood to stay under (default: ``start``'s).
        lr: Adam's step size, in strength units.
        penalty: Weight of the log refusal excess against the KL.
        max_strength: Upper bound of every strength.
    """
    model = scorer.model
    attention = torch.tensor(start.attention, requires_grad=True)
    mlp = torch.tensor(start.mlp, requires_grad=True)
    optimizer = torch.optim.Adam([attention, mlp], lr=lr)
    edit = StrengthEdit(start, attention, mlp)
    best_edit, best, first, limit = start, None, None, cap
    history: list[dict[str, float]] = []
    with frozen(model):
        for step in progress(range(steps + 1), desc=desc):
            optimizer.zero_grad()
            scores = scorer.measure(lambda: edit_hooks(model, edit))
            refusal, kl = scores.refusal.mean(), scores.kl.mean()
            now = scores.summary()
            if first is None:
                first = now
                limit = now["refusal"] if limit is None else limit
            assert limit is not None
            excess = torch.relu(torch.log(refusal.clamp(min=1e-12)) - math.log(max(limit, 1e-12)))
            loss = kl + penalty * excess
            history.append({"step": step, "refusal": now["refusal"], "kl": now["kl"],
                            "loss": float(loss.detach())})  # fmt: skip
            if now["refusal"] <= limit and (best is None or now["kl"] < best["kl"]):
                # The start itself at step 0, so callers can tell "no step improved" by identity.
                best, best_edit = now, (start if step == 0 else edit.current())
            if step == steps:
                break  # the last point is measured, not moved
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                attention.clamp_(0.0, max_strength)
                mlp.clamp_(0.0, max_strength)
    assert first is not None and limit is not None
    if best is None:
        log.info("descent: no step met the refusal cap %.4f; keeping the start", limit)
        best = first
    log.info("descent: refusal %.4f -> %.4f, KL %.4f -> %.4f", first["refusal"],
             best["refusal"], first["kl"], best["kl"])  # fmt: skip
    return DescentResult(best_edit, first, best, limit, history)
