"""Automatic choice of the refusal direction among the per-layer, per-site candidates.

Following Arditi et al., each candidate is scored by ablating it from every residual writer and
measuring (a) the refusal score on harmful validation prompts and (b) the first-token KL
divergence on harmless validation prompts; candidates from the last layers are discarded. The
refusal score (``--refusal-objective``) is either the next-token refusal log-odds (default) or
the log-odds of the mean probability that an answer opens with one of the model's own refusal
openings (teacher-forced over a few tokens, :mod:`abliterate.search.scoring`; found once from
the unedited model's judged answers).

To keep this affordable on a CPU, candidates are scored several per forward pass
(``edits_per_pass``, each on its own rows of the batch: the same scores as one at a time) in
two stages:

1. *screen*: every distinct candidate on the first ``n_screen`` prompts of each kind. With
   ``screen_halving`` it is *successive halving* instead: after each round only the better half
   of the candidates goes on to twice as many prompts, until ``n_finalists`` remain or the
   validation split is used up, so hopeless candidates are dropped after the cheapest round;
2. *final*: the ``n_finalists`` best screened candidates on the whole validation split, in the
   model's own precision (screening may run on a copy in another precision,
   ``scoring_model``; whether the two precisions ranked the finalists alike is recorded). When
   halving already scored them on the whole split in the model's precision, those scores are
   used.

The chosen candidate is the finalist with the lowest refusal score among those whose KL is at
most ``kl_threshold`` and whose refusal score is below the unedited model's. If none
qualifies, the run says so and picks the best trade-off: the finalist closest to the ideal
point (lowest refusal score, lowest KL) after min-max normalising both over the finalists.

Finally (``refine_steps`` > 0; default off) the chosen direction's edit is *refined*: a few
steps of descent on its per-layer attention and MLP strengths (:mod:`abliterate.search.descent`;
a strength may reach 0) lower the KL while the refusal likelihood stays at most the unrefined
edit's. The refined edit is scored again in the model's precision and kept when it lowers the
KL there without raising the refusal likelihood by more than :data:`REFINE_TOLERANCE`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.errors import ConfigError
from abliterate.measure.candidates import Candidates
from abliterate.measure.refusal import RefusalOpenings
from abliterate.model.layerwise import LayerwiseModel
from abliterate.search.descent import descend
from abliterate.search.objective import scoring_config
from abliterate.search.scoring import EditScorer, EditScores, Scorer, ScoringSet, edit_scorer
from abliterate.types import RefusalObjective, Site

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from abliterate.config import RunConfig

log = logging.getLogger(__name__)

REFINE_TOLERANCE = 0.1
"""Relative rise of the refusal likelihood (in the model's precision) a refined edit may show:
the descent keeps it at the cap in the scoring precision, which the model's can differ from."""

REFUSAL_MEASURES = {
    "next_token": "mean over harmful validation prompts of the next-token refusal log-odds",
    "openings": "log-odds of the mean probability that the answer to a harmful validation "
    "prompt opens with one of the model's own refusal openings",
}


@dataclass
class CandidateScore:
    """Scores of one candidate direction.

    Attributes:
        layer, site: Where the direction was taken.
        screen_refusal, screen_kl: Scores of the last screening round it took part in.
        screen_prompts: Prompts of each kind in that round.
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
    screen_prompts: int | None = None

    @property
    def key(self) -> str:
        """``"layer/site"``."""
        return f"{self.layer}/{self.site}"


@dataclass
class Selection:
    """The outcome of selection, with everything needed to explain it.

    Attributes:
        edit: The edit to apply: the chosen direction at ``--strength`` from every writer,
            with refined per-layer strengths when the refinement was kept.
        objective: The refusal measure the scores are in (``--refusal-objective``).
        details: Optional report entries (openings, screening precision, refinement).
    """

    layer: int
    site: Site
    direction: Direction
    baseline_refusal: float
    met_threshold: bool
    rule: str
    kl_threshold: float
    max_layer: int
    edit: Ablation
    objective: RefusalObjective = "next_token"
    scores: list[CandidateScore] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

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
            "refusal_measure": REFUSAL_MEASURES[self.objective],
            **self.details,
            "scores": [asdict(s) for s in self.scores],
        }


def max_candidate_layer(n_layers: int, prune_last_layers: float) -> int:
    """Highest layer index kept after discarding the last ``prune_last_layers`` fraction."""
    return max(0, math.ceil(n_layers * (1.0 - prune_last_layers)) - 1)


def log_odds(probability: float) -> float:
    """``log p / (1 - p)``, with ``p`` kept inside (1e-7, 1 - 1e-7)."""
    p = min(max(probability, 1e-7), 1 - 1e-7)
    return math.log(p) - math.log1p(-p)


def _values(scores: EditScores, objective: RefusalObjective) -> tuple[float, float]:
    """``(refusal score, KL)`` of one edit. ``next_token``: the mean over prompts of each
    prompt's next-token refusal log-odds (as :func:`~abliterate.core.stats.refusal_scores`);
    ``openings``: the log-odds of the mean probability of a refusal opening (a prompt whose
    opening probability is tiny would dominate a mean of log-odds)."""
    kl = float(scores.kl.detach().mean())
    if objective == "openings":
        return log_odds(float(scores.refusal.detach().mean())), kl
    p = scores.first_token.detach().double().clamp(1e-30, 1 - 1e-7)
    return float((torch.log(p) - torch.log1p(-p)).mean()), kl


def _rank_key(refusal: float, kl: float, threshold: float) -> tuple[int, float]:
    # Candidates under the KL threshold first, by refusal score; the rest after, by KL.
    return (0, refusal) if kl <= threshold else (1, kl)


def _distinct(
    candidates: Candidates, max_layer: int
) -> tuple[list[tuple[int, Site, Direction]], dict[tuple[int, Site], str]]:
    """Every candidate up to ``max_layer`` once ("pre" of layer i+1 is "post" of layer i), and
    for each repeat, the key of the candidate it repeats."""
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
    distinct: list[tuple[int, Site, Direction]] = []
    twins: dict[tuple[int, Site], str] = {}
    for layer, site in keys:
        direction = candidates.direction(layer, site)
        twin = next((d for d in distinct if torch.equal(d[2].vector, direction.vector)), None)
        if twin is None:
            distinct.append((layer, site, direction))
        else:
            twins[layer, site] = f"{twin[0]}/{twin[1]}"
    return distinct, twins


def _screen(
    scorer: Scorer,
    distinct: list[tuple[int, Site, Direction]],
    n_layers: int,
    config: RunConfig,
) -> dict[str, CandidateScore]:
    """The screening stage (module docstring: one round, or successive halving): every
    candidate's last screening scores, the finalists first, in rank order."""
    c = config
    pool = list(distinct)
    n = min(c.n_screen, scorer.n_harmful, scorer.n_harmless)
    out: dict[str, CandidateScore] = {}
    rounds = 0
    while True:
        rounds += 1
        edits = [Ablation.uniform(d, n_layers, c.strength) for _, _, d in pool]
        subset = scorer.subset(n, n)
        scores = subset.score(
            edits, c.edits_per_pass, desc=f"Screening {len(pool)} candidates on {n} + {n} prompts"
        )
        for (layer, site, _), s in zip(pool, scores, strict=True):
            refusal, kl = _values(s, c.refusal_objective)
            out[f"{layer}/{site}"] = CandidateScore(layer, site, refusal, kl, screen_prompts=n)

        def rank(p: tuple[int, Site, Direction]) -> tuple[int, float]:
            entry = out[f"{p[0]}/{p[1]}"]
            return _rank_key(entry.screen_refusal, entry.screen_kl, c.kl_threshold)

        pool.sort(key=rank)
        full = n >= max(scorer.n_harmful, scorer.n_harmless)
        if not c.screen_halving or len(pool) <= c.n_finalists or full:
            break
        pool = pool[: max(c.n_finalists, math.ceil(len(pool) / 2))]
        n = min(2 * n, max(scorer.n_harmful, scorer.n_harmless))
    log.info("screened %d candidates in %d round(s)", len(distinct), rounds)
    finalists = [f"{layer}/{site}" for layer, site, _ in pool[: c.n_finalists]]
    return {k: out[k] for k in finalists} | {k: v for k, v in out.items() if k not in finalists}


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


def _refine(
    scorer: EditScorer, exact: EditScorer, start: Ablation, steps: int
) -> tuple[Ablation, dict[str, Any]]:
    """The descent's edit when it lowers the KL in the model's precision without raising the
    refusal likelihood beyond the tolerance, else ``start``; with what happened."""
    result = descend(scorer, start, steps=steps)
    report: dict[str, Any] = result.to_dict()
    if result.edit is start:
        report["kept"] = False
        return start, report
    before, after = (s.summary() for s in exact.score([start, result.edit], 2))
    report["model_precision"] = {"start": before, "refined": after}
    kept = after["kl"] < before["kl"] and after["refusal"] <= before["refusal"] * (
        1 + REFINE_TOLERANCE
    )
    report["kept"] = kept
    return (result.edit if kept else start), report


def select_direction(
    model: PreTrainedModel | LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    candidates: Candidates,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int],
    openings: RefusalOpenings,
    config: RunConfig,
    scoring_model: PreTrainedModel | None = None,
) -> Selection:
    """Score every candidate direction and choose one (see the module docstring).

    Args:
        model: A loaded model (edits scored under hooks, ``edits_per_pass`` per forward) or a
            layer-streamed one (as many candidates per read of the weights as fit; next-token
            scores only, so ``openings`` must be empty and no refinement runs:
            :func:`~abliterate.search.objective.scoring_config`).
        harmful_val, harmless_val: Chat-formatted validation texts.
        refusal_ids: First tokens of common refusal openings (the next-token proxy, reported).
        openings: The model's own refusal openings (``--refusal-objective openings``; empty
            for ``next_token``).
        config: Its selection options (``kl_threshold``, ``prune_last_layers``, ``n_screen``,
            ``n_finalists``, ``strength``, ``batch_size``, ``refusal_objective``,
            ``edits_per_pass``, ``screen_halving``, ``refine_steps``).
        scoring_model: The model screening and refinement run on (a lower-precision copy of
            ``model``); default ``model``.
    """
    c = scoring_config(model, config)  # a layer-streamed model: next-token scores only
    n_layers = candidates.n_layers
    max_layer = max_candidate_layer(n_layers, c.prune_last_layers)
    fast_model = scoring_model if scoring_model is not None else model
    texts = ScoringSet(harmful_val, harmless_val, refusal_ids, openings, c.batch_size)
    fast = edit_scorer(fast_model, tokenizer, texts)
    exact = fast if fast_model is model else edit_scorer(model, tokenizer, texts)
    baseline_refusal = _values(exact.baseline(), c.refusal_objective)[0]
    distinct, twins = _distinct(candidates, max_layer)
    by_key = {f"{layer}/{site}": d for layer, site, d in distinct}
    screened = _screen(fast, distinct, n_layers, c)
    finalists = list(screened.values())[: c.n_finalists]
    edits = [Ablation.uniform(by_key[s.key], n_layers, c.strength) for s in finalists]
    whole = max(exact.n_harmful, exact.n_harmless)
    if exact is fast and all((s.screen_prompts or 0) >= whole for s in finalists):
        # Halving reached the whole split in the model's precision: those are the final scores.
        for entry in finalists:
            entry.refusal, entry.kl = entry.screen_refusal, entry.screen_kl
    else:
        scored = exact.score(edits, c.edits_per_pass, "Finalists")
        for entry, s in zip(finalists, scored, strict=True):
            entry.refusal, entry.kl = _values(s, c.refusal_objective)
    details: dict[str, Any] = {}
    if c.refusal_objective == "openings":
        details["openings"] = openings.to_dict(tokenizer)
    if scoring_model is not None and exact is not fast:
        dtype = next(scoring_model.parameters()).dtype
        details["screening_dtype"] = str(dtype).removeprefix("torch.")
        # The finalists on the whole split in the screening precision too: does it rank them
        # as the model's precision does, and would it choose the same?
        fast_values = [_values(s, c.refusal_objective) for s in fast.score(edits, c.edits_per_pass)]
        details["precision"] = _agreement(finalists, fast_values, baseline_refusal, c)
    scores = _all_scores(candidates.sites, max_layer, screened, twins)
    best, met, rule = _choose(finalists, baseline_refusal, c.kl_threshold)
    start = Ablation.uniform(by_key[best.key], n_layers, c.strength)
    edit = start
    if c.refine_steps > 0:
        # scoring_config set refine_steps to 0 for a layer-streamed model.
        assert isinstance(fast, EditScorer) and isinstance(exact, EditScorer)
        edit, details["refinement"] = _refine(fast, exact, start, c.refine_steps)
    return Selection(
        layer=best.layer, site=best.site, direction=by_key[best.key],
        baseline_refusal=baseline_refusal, met_threshold=met, rule=rule,
        kl_threshold=c.kl_threshold, max_layer=max_layer, edit=edit,
        objective=c.refusal_objective, scores=scores, details=details,
    )  # fmt: skip


def _all_scores(
    sites: Sequence[Site],
    max_layer: int,
    screened: dict[str, CandidateScore],
    twins: dict[tuple[int, Site], str],
) -> list[CandidateScore]:
    """Every candidate's scores in layer and site order; a twin (a direction equal to one
    screened) carries the scores of the one it equals, under its own layer and site."""
    scores = []
    for layer in range(max_layer + 1):
        for site in sites:
            key = f"{layer}/{site}"
            if key in screened:
                scores.append(screened[key])
            elif (layer, site) in twins:
                twin = screened[twins[layer, site]]
                scores.append(CandidateScore(layer, site, twin.screen_refusal, twin.screen_kl,
                                             twin.refusal, twin.kl, twin.key,
                                             twin.screen_prompts))  # fmt: skip
    return scores


def _agreement(
    finalists: Sequence[CandidateScore],
    fast: Sequence[tuple[float, float]],
    baseline_refusal: float,
    config: RunConfig,
) -> dict[str, Any]:
    """How the screening precision's full-split values of the finalists compare with the
    model's: same rank order, same choice, largest KL difference."""
    t = config.kl_threshold
    exact_order = sorted(finalists, key=lambda s: _rank_key(float(s.refusal), float(s.kl), t))  # type: ignore[arg-type]
    by_key = {s.key: v for s, v in zip(finalists, fast, strict=True)}
    fast_order = sorted(finalists, key=lambda s: _rank_key(*by_key[s.key], t))
    as_fast = [
        CandidateScore(s.layer, s.site, s.screen_refusal, s.screen_kl, *by_key[s.key])
        for s in finalists
    ]
    return {
        "same_order": [s.key for s in exact_order] == [s.key for s in fast_order],
        "same_choice": _choose(as_fast, baseline_refusal, t)[0].key
        == _choose(finalists, baseline_refusal, t)[0].key,
        "max_kl_difference": max(abs(float(s.kl or 0.0) - by_key[s.key][1]) for s in finalists),
    }


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
