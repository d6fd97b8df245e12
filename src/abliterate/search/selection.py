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
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.core.stats import kl_divergence, refusal_scores
from abliterate.edit.hooks import edit_hooks
from abliterate.errors import ConfigError
from abliterate.measure.candidates import Candidates
from abliterate.model.forward import next_token_logprobs
from abliterate.model.layerwise import LayerwiseModel
from abliterate.progress import progress
from abliterate.search.streamed import streamed_logprobs
from abliterate.types import Site

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from abliterate.config import RunConfig

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


LogprobsFn = Callable[
    [Sequence[Sequence[str]], Sequence[Ablation | None], str], list[list[torch.Tensor]]
]
"""``(text_sets, edits, desc)`` -> per edit, per text set, next-token log-probabilities."""


def logprobs_backend(
    model: PreTrainedModel | LayerwiseModel, tokenizer: PreTrainedTokenizerBase, batch_size: int
) -> LogprobsFn:
    """How edits are scored on ``model``: under hooks on a loaded model, one edit at a time;
    layer-streamed, many edits per read of the weights (:mod:`abliterate.search.streamed`)."""
    if isinstance(model, LayerwiseModel):
        loaded = model

        def streamed(
            text_sets: Sequence[Sequence[str]], edits: Sequence[Ablation | None], desc: str
        ) -> list[list[torch.Tensor]]:
            return streamed_logprobs(
                loaded, tokenizer, text_sets, edits, batch_size=batch_size, desc=desc
            )

        return streamed

    def hooked(
        text_sets: Sequence[Sequence[str]], edits: Sequence[Ablation | None], desc: str
    ) -> list[list[torch.Tensor]]:
        out = []
        for edit in progress(edits, desc=desc) if len(edits) > 1 else edits:
            with nullcontext() if edit is None else edit_hooks(model, edit):
                out.append(
                    [next_token_logprobs(model, tokenizer, t, batch_size=batch_size)
                     for t in text_sets]
                )  # fmt: skip
        return out

    return hooked


class _Scorer:
    """Scores edits on a fixed pair of harmful / harmless prompt lists, against the unedited
    model's next-token distributions on the harmless ones."""

    def __init__(
        self,
        logprobs: LogprobsFn,
        harmful: Sequence[str],
        harmless: Sequence[str],
        refusal_ids: Sequence[int],
    ) -> None:
        self.logprobs, self.refusal_ids = logprobs, refusal_ids
        self.sets = (harmful, harmless)
        base_harmful, self.base_harmless = logprobs(self.sets, [None], "Unedited model")[0]
        self.baseline_refusal = float(refusal_scores(base_harmful, refusal_ids).mean())

    def many(self, edits: Sequence[Ablation], desc: str) -> list[tuple[float, float]]:
        """``(mean refusal score, mean first-token KL)`` of the model under each edit."""
        out = []
        for lp_harmful, lp_harmless in self.logprobs(self.sets, edits, desc):
            refusal = float(refusal_scores(lp_harmful, self.refusal_ids).mean())
            kl = float(kl_divergence(self.base_harmless, lp_harmless).mean())
            out.append((refusal, kl))
        return out


def _rank_key(refusal: float, kl: float, threshold: float) -> tuple[int, float]:
    # Candidates under the KL threshold first, by refusal score; the rest after, by KL.
    return (0, refusal) if kl <= threshold else (1, kl)


def _screen(
    candidates: Candidates, max_layer: int, score: _Scorer, strength: float
) -> tuple[list[CandidateScore], dict[str, Direction]]:
    """Every candidate up to ``max_layer`` scored on the screening prompts; identical
    candidates ("pre" of layer i+1 is "post" of layer i) are scored once."""
    keys = [
        (layer, site)
        for layer in range(max_layer + 1)
        for site in candidates.sites
        if not candidates.is_degenerate(layer, site)
    ]
    if not keys:
        raise ConfigError(
            "the harmful and harmless training prompts give identical activations at every "
            "layer, so there is no direction to find; are the two prompt sets the same?"
        )
    directions: dict[str, Direction] = {}
    twins: dict[str, str] = {}
    for layer, site in keys:
        direction = candidates.direction(layer, site)
        twin = next((k for k, d in directions.items() if torch.equal(d.vector, direction.vector)),
                    None)  # fmt: skip
        if twin is None:
            directions[f"{layer}/{site}"] = direction
        else:
            twins[f"{layer}/{site}"] = twin
    edits = [Ablation.uniform(d, candidates.n_layers, strength) for d in directions.values()]
    scored = dict(zip(directions, score.many(edits, "Screening candidates"), strict=True))
    scores = []
    for layer, site in keys:
        key = f"{layer}/{site}"
        refusal, kl = scored[twins.get(key, key)]
        scores.append(CandidateScore(layer, site, refusal, kl, same_as=twins.get(key)))
    return scores, directions


def _choose(
    finalists: Sequence[CandidateScore], baseline_refusal: float, kl_threshold: float
) -> tuple[CandidateScore, bool, str]:
    """The finalist the rule picks, whether it met the KL threshold, and the rule in words."""
    qualified = [
        s
        for s in finalists
        if s.kl is not None
        and s.refusal is not None
        and s.kl <= kl_threshold
        and s.refusal < baseline_refusal
    ]
    if qualified:
        best = min(qualified, key=lambda s: float(s.refusal))  # type: ignore[arg-type]
        rule = (
            f"lowest validation refusal score among finalists with first-token KL <= "
            f"{kl_threshold} and a refusal score below the unedited model's"
        )
        return best, True, rule
    rule = (
        f"no finalist had first-token KL <= {kl_threshold} with fewer refusals than the "
        "unedited model; chose the best trade-off (closest to the ideal point after "
        "min-max normalising refusal score and KL over the finalists)"
    )
    log.warning(rule)
    return _best_tradeoff(finalists), False, rule


def select_direction(
    model: PreTrainedModel | LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    candidates: Candidates,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int],
    config: RunConfig,
) -> Selection:
    """Score every candidate direction and choose one (see the module docstring for the rule).

    Args:
        model: A loaded model (edits scored under hooks) or a layer-streamed one (every
            candidate of a stage scored in one pass over the weights).
        harmful_val, harmless_val: Chat-formatted validation texts.
        refusal_ids: Token ids whose probability makes up the refusal score.
        config: Its selection options (``kl_threshold``, ``prune_last_layers``, ``n_screen``,
            ``n_finalists``, ``strength``, ``batch_size``).
    """
    c = config
    max_layer = max_candidate_layer(candidates.n_layers, c.prune_last_layers)
    logprobs = logprobs_backend(model, tokenizer, c.batch_size)
    screen = _Scorer(logprobs, harmful_val[: c.n_screen], harmless_val[: c.n_screen], refusal_ids)
    full = _Scorer(logprobs, harmful_val, harmless_val, refusal_ids)
    baseline_refusal = full.baseline_refusal
    scores, directions = _screen(candidates, max_layer, screen, c.strength)

    distinct = [s for s in scores if s.same_as is None]
    distinct.sort(key=lambda s: _rank_key(s.screen_refusal, s.screen_kl, c.kl_threshold))
    finalists = distinct[: c.n_finalists]
    edits = [
        Ablation.uniform(directions[e.key], candidates.n_layers, c.strength) for e in finalists
    ]
    for entry, (refusal, kl) in zip(finalists, full.many(edits, "Scoring finalists"), strict=True):
        entry.refusal, entry.kl = refusal, kl
    for s in scores:
        if s.same_as is not None:
            twin = next(t for t in distinct if t.key == s.same_as)
            s.refusal, s.kl = twin.refusal, twin.kl
    best, met, rule = _choose(finalists, baseline_refusal, c.kl_threshold)
    return Selection(
        layer=best.layer,
        site=best.site,
        direction=directions[best.key],
        baseline_refusal=baseline_refusal,
        met_threshold=met,
        rule=rule,
        kl_threshold=c.kl_threshold,
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
