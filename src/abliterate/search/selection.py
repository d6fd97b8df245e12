"""Automatic choice of the refusal direction among the per-layer, per-site candidates.

Following Arditi et al., each candidate is scored by ablating it from every residual writer and
measuring (a) the refusal score on harmful validation prompts and (b) the first-token KL
divergence on harmless validation prompts; candidates from the last layers are discarded. To
keep this affordable on a CPU it runs in two stages:

1. *screen*: every distinct candidate on the first ``n_screen`` prompts of each kind;
2. *final*: the ``n_finalists`` best screened candidates on the whole validation split.

The chosen candidate is the finalist with the lowest refusal score among those whose KL is at
most ``kl_threshold`` and whose refusal score is below the unedited model's. If none qualifies,
the run says so and picks the best trade-off: the finalist closest to the ideal point (lowest
refusal score, lowest KL) after min-max normalising both over the finalists.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from abliterate.core.directions import Direction
from abliterate.core.edits import EditSpec
from abliterate.core.stats import kl_divergence, refusal_scores
from abliterate.measure.candidates import Candidates
from abliterate.model.forward import next_token_logprobs
from abliterate.progress import progress
from abliterate.types import Site

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class CandidateScore:
    """Scores of one candidate direction.

    Attributes:
        layer, site: Where the direction was taken.
        screen_refusal, screen_kl: Scores on the screening subset.
        refusal, kl: Scores on the whole validation split (finalists only, else None).
        same_as: ``"L/site"`` of an identical earlier candidate whose scores were reused.
    """

    layer: int
    site: Site
    screen_refusal: float
    screen_kl: float
    refusal: float | None = None
    kl: float | None = None
    same_as: str | None = None

    @property
    def key(self) -> str:
        """``"layer/site"``."""
        return f"{self.layer}/{self.site}"


@dataclass
class Selection:
    """The outcome of selection, with everything needed to explain it."""

    layer: int
    site: Site
    direction: Direction
    baseline_refusal: float
    met_threshold: bool
    rule: str
    kl_threshold: float
    max_layer: int
    scores: list[CandidateScore] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the direction's vector is saved separately)."""
        return {
            "layer": self.layer,
            "site": self.site,
            "baseline_refusal_score": self.baseline_refusal,
            "met_kl_threshold": self.met_threshold,
            "rule": self.rule,
            "kl_threshold": self.kl_threshold,
            "max_layer": self.max_layer,
            "scores": [asdict(s) for s in self.scores],
        }


def max_candidate_layer(n_layers: int, prune_last_layers: float) -> int:
    """Highest layer index kept after discarding the last ``prune_last_layers`` fraction."""
    return max(0, math.ceil(n_layers * (1.0 - prune_last_layers)) - 1)


def _measure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: EditSpec,
    harmful: Sequence[str],
    harmless: Sequence[str],
    harmless_base: torch.Tensor,
    refusal_ids: Sequence[int],
    batch_size: int,
) -> tuple[float, float]:
    lp_harmful = next_token_logprobs(model, tokenizer, harmful, spec=spec, batch_size=batch_size)
    lp_harmless = next_token_logprobs(model, tokenizer, harmless, spec=spec, batch_size=batch_size)
    refusal = float(refusal_scores(lp_harmful, refusal_ids).mean())
    kl = float(kl_divergence(harmless_base, lp_harmless).mean())
    return refusal, kl


def _rank_key(refusal: float, kl: float, threshold: float) -> tuple[int, float]:
    # Candidates under the KL threshold first, by refusal score; the rest after, by KL.
    return (0, refusal) if kl <= threshold else (1, kl)


def select_direction(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    candidates: Candidates,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int],
    *,
    kl_threshold: float = 0.1,
    prune_last_layers: float = 0.2,
    n_screen: int = 8,
    n_finalists: int = 8,
    strength: float = 1.0,
    batch_size: int = 32,
) -> Selection:
    """Score every candidate direction and choose one (see the module docstring for the rule).

    Args:
        harmful_val, harmless_val: Chat-formatted validation texts.
        refusal_ids: Token ids whose probability makes up the refusal score.
    """
    n_layers = candidates.n_layers
    max_layer = max_candidate_layer(n_layers, prune_last_layers)
    screen_harmful, screen_harmless = harmful_val[:n_screen], harmless_val[:n_screen]
    base_screen = next_token_logprobs(model, tokenizer, screen_harmless, batch_size=batch_size)
    base_full = next_token_logprobs(model, tokenizer, harmless_val, batch_size=batch_size)
    base_harmful = next_token_logprobs(model, tokenizer, harmful_val, batch_size=batch_size)
    baseline_refusal = float(refusal_scores(base_harmful, refusal_ids).mean())

    # Distinct candidates only: "pre" of layer i+1 is the same tensor as "post" of layer i.
    directions: dict[str, Direction] = {}
    scores: list[CandidateScore] = []
    seen: list[tuple[Direction, CandidateScore]] = []
    keys = [
        (layer, site)
        for layer in range(max_layer + 1)
        for site in candidates.sites
        if not candidates.is_degenerate(layer, site)
    ]
    for layer, site in progress(keys, desc="Screening candidates"):
        direction = candidates.direction(layer, site)
        twin = next((s for d, s in seen if torch.equal(d.vector, direction.vector)), None)
        if twin is not None:
            scores.append(
                CandidateScore(layer, site, twin.screen_refusal, twin.screen_kl, same_as=twin.key)
            )
            continue
        spec = EditSpec.uniform(direction, n_layers, strength)
        refusal, kl = _measure(
            model,
            tokenizer,
            spec,
            screen_harmful,
            screen_harmless,
            base_screen,
            refusal_ids,
            batch_size,
        )
        score = CandidateScore(layer, site, refusal, kl)
        scores.append(score)
        seen.append((direction, score))
        directions[score.key] = direction

    distinct = [s for s in scores if s.same_as is None]
    distinct.sort(key=lambda s: _rank_key(s.screen_refusal, s.screen_kl, kl_threshold))
    finalists = distinct[:n_finalists]
    for score in progress(finalists, desc="Scoring finalists"):
        spec = EditSpec.uniform(directions[score.key], n_layers, strength)
        score.refusal, score.kl = _measure(
            model, tokenizer, spec, harmful_val, harmless_val, base_full, refusal_ids, batch_size
        )
    for s in scores:
        if s.same_as is not None:
            twin = next(t for t in distinct if t.key == s.same_as)
            s.refusal, s.kl = twin.refusal, twin.kl

    qualified = [
        s
        for s in finalists
        if s.kl is not None
        and s.refusal is not None
        and s.kl <= kl_threshold
        and s.refusal < baseline_refusal
    ]
    if qualified:
        best = min(qualified, key=lambda s: s.refusal)  # type: ignore[arg-type, return-value]
        met = True
        rule = (
            f"lowest validation refusal score among finalists with first-token KL <= "
            f"{kl_threshold} and a refusal score below the unedited model's"
        )
    else:
        best = _best_tradeoff(finalists)
        met = False
        rule = (
            f"no finalist had first-token KL <= {kl_threshold} with fewer refusals than the "
            "unedited model; chose the best trade-off (closest to the ideal point after "
            "min-max normalising refusal score and KL over the finalists)"
        )
        log.warning(rule)
    return Selection(
        layer=best.layer,
        site=best.site,
        direction=directions[best.key],
        baseline_refusal=baseline_refusal,
        met_threshold=met,
        rule=rule,
        kl_threshold=kl_threshold,
        max_layer=max_layer,
        scores=scores,
    )


def _best_tradeoff(finalists: Sequence[CandidateScore]) -> CandidateScore:
    refusals = [float(s.refusal) for s in finalists]  # type: ignore[arg-type]
    kls = [float(s.kl) for s in finalists]  # type: ignore[arg-type]

    def norm(x: float, xs: Sequence[float]) -> float:
        lo, hi = min(xs), max(xs)
        return 0.0 if hi == lo else (x - lo) / (hi - lo)

    return min(
        finalists,
        key=lambda s: math.hypot(norm(float(s.refusal), refusals), norm(float(s.kl), kls)),  # type: ignore[arg-type]
    )
