"""Optimized abliteration: a multi-objective Optuna search over how the direction is removed.

A single mean-difference direction removed at full strength from every writer takes most
refusals away but also moves the model on harmless prompts. This module searches a richer edit
space (:class:`EditParams`) for edits that refuse less *and* move harmless prompts less:

* direction source: a fractional layer position (interpolating the two neighbouring layers'
  directions), or each layer its own direction; optionally *projected* (orthogonal to the
  harmless mean, see :meth:`~abliterate.directions.Candidates.direction`);
* a strength :class:`Profile` across layers for the attention outputs and one for the MLP
  outputs (peak, position of the peak, width, edge strength; 0 outside the window);
* plain or norm-preserving weight edits (:data:`~abliterate.interventions.EDIT_MODES`);
* with ``max_directions > 1``, how many directions to remove at once: the mean difference plus
  the top singular vectors of the per-prompt differences
  (:meth:`~abliterate.directions.Candidates.extra_directions`).

Every point of the space is an :class:`~abliterate.interventions.EditSpec`, so it is scored
through hooks and baked into the weights by the same code.

The search never generates text. Each trial costs one forward pass (last position only) over
the harmful and harmless *validation* prompts: the objectives are the mean next-token refusal
probability on harmful prompts and the first-token KL divergence on harmless prompts, both
minimised with multi-objective TPE. Only Pareto-front trials are then *confirmed* by
generating answers to the harmful validation prompts and judging them, and the chosen trial is
(:func:`choose`) the lowest-KL confirmed trial whose refusal rate is at most the target. The
evaluation prompts are not touched here: the caller evaluates the chosen edit on them once.

The study lives in Optuna storage (by default a SQLite file beside the run directory), so a
killed run resumes where it stopped and several workers can share one study: trials of a worker
that died (same host and a dead process id, or a stale heartbeat) are marked failed and not
counted, and the search runs until the number of *completed* trials reaches the budget (see
:mod:`abliterate.study`; the front and the choice rule are in :mod:`abliterate.pareto`).
"""

from __future__ import annotations

import copy
import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from abliterate.config import Site
from abliterate.directions import Candidates, Direction
from abliterate.errors import ConfigError
from abliterate.evaluation import generate
from abliterate.interventions import EditSpec, maybe_hooks
from abliterate.judges import Judge
from abliterate.pareto import TrialRecord, choose, pareto_front
from abliterate.prefix import SharedPrefixScorer
from abliterate.scoring import kl_divergence, refusal_scores
from abliterate.study import completed, open_study, run_trials

if TYPE_CHECKING:
    import optuna
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Bump when the meaning of a stored parameter changes, so an old study is not resumed by
# mistake (its trials would describe different edits).
SPACE_VERSION = 1
COMPONENTS = ("attention", "mlp")


@dataclass(frozen=True)
class Profile:
    """Strength of one kind of writer across layers: a peak that falls off linearly.

    ``strength(i) = peak * (1 - (1 - edge) * |i - position| / width)`` for layers within
    ``width`` of ``position``, and 0 (untouched) beyond.

    Attributes:
        peak: Strength at ``position`` (1 removes the direction completely).
        position: Fractional layer index of the peak.
        width: Distance in layers at which the strength has fallen to ``edge * peak``.
        edge: Strength at the window's edge, as a fraction of the peak.
    """

    peak: float
    position: float
    width: float
    edge: float

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ValueError(f"width must be positive, got {self.width}")
        if not 0.0 <= self.edge <= 1.0:
            raise ValueError(f"edge must be in [0, 1], got {self.edge}")

    def strengths(self, n_layers: int) -> tuple[float, ...]:
        """Per-layer strengths."""
        out = []
        for i in range(n_layers):
            distance = abs(i - self.position)
            if distance > self.width:
                out.append(0.0)
            else:
                out.append(self.peak * (1.0 - (1.0 - self.edge) * distance / self.width))
        return tuple(out)


@dataclass(frozen=True)
class EditParams:
    """One point of the search space; :meth:`to_spec` turns it into an :class:`EditSpec`.

    Attributes:
        direction_layer: Fractional layer position of the global direction.
        per_layer: Each layer's writers remove that layer's own direction (the embedding,
            untouched by the search, and degenerate layers use the global one).
        projected: Directions are made orthogonal to the harmless mean.
        norm_preserving: Edit in norm-preserving mode instead of plain projection.
        attention, mlp: Strength profiles of the two kinds of writer.
        n_directions: Directions removed at once: the mean difference and ``n_directions - 1``
            extra directions taken at the layer nearest ``direction_layer``.
    """

    direction_layer: float
    per_layer: bool
    projected: bool
    norm_preserving: bool
    attention: Profile
    mlp: Profile
    n_directions: int = 1

    def to_params(self) -> dict[str, Any]:
        """Flat ``{name: value}`` as stored in the Optuna study."""
        out: dict[str, Any] = {
            "direction_layer": self.direction_layer,
            "per_layer": self.per_layer,
            "projected": self.projected,
            "norm_preserving": self.norm_preserving,
        }
        for component in COMPONENTS:
            for key, value in asdict(getattr(self, component)).items():
                out[f"{component}_{key}"] = value
        if self.n_directions != 1:  # absent from the one-direction space's studies
            out["n_directions"] = self.n_directions
        return out

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EditParams:
        """Inverse of :meth:`to_params`."""
        profiles = {
            c: Profile(
                peak=float(params[f"{c}_peak"]),
                position=float(params[f"{c}_position"]),
                width=float(params[f"{c}_width"]),
                edge=float(params[f"{c}_edge"]),
            )
            for c in COMPONENTS
        }
        return cls(
            direction_layer=float(params["direction_layer"]),
            per_layer=bool(params["per_layer"]),
            projected=bool(params["projected"]),
            norm_preserving=bool(params["norm_preserving"]),
            attention=profiles["attention"],
            mlp=profiles["mlp"],
            n_directions=int(params.get("n_directions", 1)),
        )

    def to_spec(self, candidates: Candidates, site: Site) -> EditSpec:
        """The edit these parameters describe, with directions taken at ``site``."""
        n = candidates.n_layers
        direction = candidates.direction_at(self.direction_layer, site, projected=self.projected)
        layer_directions: tuple[Direction, ...] | None = None
        if self.per_layer:
            layer_directions = tuple(
                direction
                if candidates.is_degenerate(i, site)
                else candidates.direction(i, site, projected=self.projected)
                for i in range(n)
            )
        extra: tuple[Direction, ...] = ()
        if self.n_directions > 1:
            layer = min(max(round(self.direction_layer), 0), n - 1)
            extra = candidates.extra_directions(direction, layer, site, self.n_directions - 1)
        return EditSpec(
            direction=direction,
            embedding=0.0,
            attention=self.attention.strengths(n),
            mlp=self.mlp.strengths(n),
            layer_directions=layer_directions,
            mode="norm_preserving" if self.norm_preserving else "plain",
            extra_directions=extra,
        )


@dataclass(frozen=True)
class SearchSpace:
    """Bounds of the searched parameters for a model of ``n_layers`` layers.

    The direction may come from ``min_layer`` to ``max_layer`` (the last layers are pruned as in
    selection: they encode output tokens rather than the concept); peaks may sit anywhere.
    Peak strengths start above 0 because a zero peak is the unedited model, which the search
    need not rediscover, and stop at 1.5 because overshooting a little can cancel what the
    other layers' writers add back. With ``max_directions > 1`` the number of directions
    removed at once is searched too (1 to ``max_directions``).
    """

    n_layers: int
    min_layer: float
    max_layer: float
    peak: tuple[float, float] = (0.2, 1.5)
    max_directions: int = 1

    def suggest(self, trial: optuna.Trial) -> EditParams:
        """Sample one point (every parameter always, which multivariate TPE needs)."""
        last = float(self.n_layers - 1)
        direction_layer = trial.suggest_float("direction_layer", self.min_layer, self.max_layer)
        per_layer = trial.suggest_categorical("per_layer", [False, True])
        projected = trial.suggest_categorical("projected", [False, True])
        norm_preserving = trial.suggest_categorical("norm_preserving", [False, True])
        profiles = {}
        for c in COMPONENTS:
            profiles[c] = Profile(
                peak=trial.suggest_float(f"{c}_peak", *self.peak),
                position=trial.suggest_float(f"{c}_position", 0.0, last),
                width=trial.suggest_float(f"{c}_width", 1.0, float(self.n_layers)),
                edge=trial.suggest_float(f"{c}_edge", 0.0, 1.0),
            )
        n_directions = 1
        if self.max_directions > 1:
            n_directions = trial.suggest_int("n_directions", 1, self.max_directions)
        return EditParams(
            direction_layer=direction_layer,
            per_layer=bool(per_layer),
            projected=bool(projected),
            norm_preserving=bool(norm_preserving),
            attention=profiles["attention"],
            mlp=profiles["mlp"],
            n_directions=n_directions,
        )

    def seeds(self) -> list[EditParams]:
        """Starting points enqueued in a new study.

        The classic edit (one direction at full strength from every writer) at 60, 70 and 80%
        depth, where the demo model's refusal direction is strongest (selection on
        Qwen2.5-Coder-0.5B-Instruct prefers layers 17 to 19 of 24), and a gentler variant of
        each: strength peaking at the direction's own layer and fading to half over half the
        stack. They give TPE a compliant corner of the front from the first trials on.
        """
        n = self.n_layers
        out = []
        for frac in (0.6, 0.7, 0.8):
            layer = min(max(frac * (n - 1), self.min_layer), self.max_layer)
            everywhere = Profile(peak=1.0, position=(n - 1) / 2, width=float(n), edge=1.0)
            out.append(EditParams(layer, False, False, False, everywhere, everywhere))
        for frac in (0.6, 0.7, 0.8):
            layer = min(max(frac * (n - 1), self.min_layer), self.max_layer)
            fading = Profile(peak=1.0, position=layer, width=n / 2, edge=0.5)
            out.append(EditParams(layer, False, False, False, fading, fading))
        # Small models clamp several depths to the same layer; each point once.
        return list(dict.fromkeys(out))

    def seed_params(self) -> list[dict[str, Any]]:
        """:meth:`seeds` as stored parameters, with every parameter this space samples."""
        out = []
        for p in self.seeds():
            params = p.to_params()
            if self.max_directions > 1:
                params["n_directions"] = p.n_directions
            out.append(params)
        return out


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (so faster than float32).

    CUDA: the device supports bf16. CPU: the x86 flags ``avx512_bf16`` or ``amx_bf16`` (Linux's
    ``/proc/cpuinfo``), or the Arm ``bf16`` feature. Elsewhere False: bf16 emulated on a CPU
    without those instructions can be slower than float32.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags: set[str] = set()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def search_model(model: PreTrainedModel, search_dtype: str) -> PreTrainedModel:
    """The model the search scores with: ``model`` itself, or a copy in another precision.

    ``"auto"`` copies a float32 model to bfloat16 where that is native (:func:`native_bf16`);
    ``"model"`` never copies; a dtype name converts to it (a copy unless already so). The copy
    costs memory (half the float32 model for bfloat16) for as long as the search runs.
    """
    current = next(model.parameters()).dtype
    if search_dtype == "model":
        return model
    if search_dtype == "auto":
        device = next(model.parameters()).device
        if current != torch.float32 or not native_bf16(device):
            return model
        target = torch.bfloat16
    else:
        target = getattr(torch, search_dtype)
    if current == target:
        return model
    log.info("search scores trials in %s on a copy of the model", str(target).split(".")[-1])
    # Each parameter is converted straight into the copy (no transient full-precision copy);
    # a shared parameter (tied embeddings) stays shared, as deepcopy's memo maps it once.
    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(p.detach().to(target), requires_grad=False)
        for p in model.parameters()
    }
    clone = copy.deepcopy(model, memo)
    return clone.to(target)  # type: ignore[arg-type]  # buffers too; parameters are done


class CheapObjective:
    """The generation-free objectives of one edit: refusal probability and first-token KL.

    Args:
        harmful, harmless: Chat-formatted validation texts.
        refusal_ids: Token ids whose probability makes up the refusal probability.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        harmful: Sequence[str],
        harmless: Sequence[str],
        refusal_ids: Sequence[int],
        batch_size: int = 32,
    ) -> None:
        # The chat template's shared opening is computed once per batch (see abliterate.prefix).
        self.harmful = SharedPrefixScorer(model, tokenizer, harmful, batch_size)
        self.harmless = SharedPrefixScorer(model, tokenizer, harmless, batch_size)
        self.refusal_ids = list(refusal_ids)
        self.base_harmless = self.harmless.logprobs()
        self.baseline = self._refusal(self.harmful.logprobs())

    def _refusal(self, logprobs: torch.Tensor) -> dict[str, float]:
        # Mean probability that the answer opens like a refusal: bounded and close in meaning
        # to a refusal *rate*, unlike the mean log-odds, which a few prompts can dominate.
        prob = torch.logsumexp(logprobs[:, self.refusal_ids], dim=-1).exp()
        return {
            "refusal_prob": float(prob.mean()),
            "refusal_score": float(refusal_scores(logprobs, self.refusal_ids).mean()),
        }

    def __call__(self, spec: EditSpec) -> dict[str, float]:
        """``{"refusal_prob", "refusal_score", "kl"}`` of ``spec`` on the validation prompts."""
        harmless = self.harmless.logprobs(spec)
        kl = float(kl_divergence(self.base_harmless, harmless).mean())
        return {**self._refusal(self.harmful.logprobs(spec)), "kl": kl}


@dataclass
class SearchResult:
    """The outcome of :func:`optimize_edit`."""

    spec: EditSpec
    chosen: TrialRecord
    trials: list[TrialRecord]
    rule: str
    met_target: bool
    refusal_target: float
    baseline: dict[str, float]
    storage: str
    study_name: str
    n_trials: int
    seconds: dict[str, float]
    search_dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` ``optimization`` entry."""
        return {
            "objectives": [
                "refusal_prob (harmful val, next token)",
                "kl (harmless val, first token)",
            ],
            "trials": [t.to_dict() for t in self.trials],
            "chosen": self.chosen.to_dict(),
            "rule": self.rule,
            "met_refusal_target": self.met_target,
            "refusal_target": self.refusal_target,
            "baseline": self.baseline,
            "storage": self.storage,
            "study_name": self.study_name,
            "n_trials": self.n_trials,
            "seconds": self.seconds,
            "search_dtype": self.search_dtype,
        }


def _scoring(
    objective: CheapObjective, candidates: Candidates, site: Site
) -> Callable[[EditParams], dict[str, float]]:
    def score(params: EditParams) -> dict[str, float]:
        return objective(params.to_spec(candidates, site))

    return score


def optimize_edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    candidates: Candidates,
    *,
    harmful_val: Sequence[str],
    harmful_val_prompts: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int],
    judge: Judge,
    site: Site,
    storage: str,
    study_name: str,
    fingerprint: dict[str, Any],
    n_trials: int,
    refusal_target: float,
    max_confirm: int,
    prune_last_layers: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    trial: int | None = None,
    max_directions: int = 1,
    search_dtype: str = "model",
) -> SearchResult:
    """Search the edit space on validation prompts and choose an edit (see module docstring).

    Args:
        harmful_val, harmless_val: Chat-formatted validation texts.
        harmful_val_prompts: The raw harmful validation instructions (for the judge).
        trial: Skip the automatic choice and use this trial number of the study.
        max_new_tokens: Tokens generated per prompt when confirming a trial.
        max_directions: Search how many directions to remove at once, up to this many (needs
            ``candidates.harmful_acts`` at ``site``).
        search_dtype: Precision of the cheap scoring (:func:`search_model`); confirmation
            generates with ``model`` itself. The returned spec does not depend on it, only
            which trials look best.
    """
    from abliterate.selection import max_candidate_layer

    n = candidates.n_layers
    degenerate_first = candidates.is_degenerate(0, site)
    space = SearchSpace(
        n_layers=n,
        min_layer=1.0 if degenerate_first else 0.0,
        max_layer=float(max(max_candidate_layer(n, prune_last_layers), 1)),
        max_directions=max_directions,
    )
    if max_directions > 1 and (candidates.harmful_acts is None or candidates.acts_site != site):
        raise ConfigError(
            f"--max-directions {max_directions} needs the per-prompt harmful activations of "
            f"site {site!r} in the candidates."
        )
    scorer_model = search_model(model, search_dtype)
    dtype = str(next(scorer_model.parameters()).dtype).removeprefix("torch.")
    # A resumed study must score in the same precision: KL values of two precisions differ.
    fingerprint = {**fingerprint, "space_version": SPACE_VERSION, "site": site, "n_layers": n,
                   "prune_last_layers": prune_last_layers,
                   "max_directions": max_directions, "search_dtype": dtype}  # fmt: skip
    study = open_study(storage, study_name, fingerprint)
    objective = CheapObjective(
        scorer_model, tokenizer, harmful_val, harmless_val, refusal_ids, batch_size=batch_size
    )
    baseline = objective.baseline
    started = time.perf_counter()
    run_trials(study, space, _scoring(objective, candidates, site), n_trials, seed)
    search_seconds = time.perf_counter() - started
    # The scoring copy and its cached inputs are not needed any more: free them before the
    # confirmations and the caller's evaluation.
    del objective, scorer_model
    gc.collect()

    records = [
        TrialRecord(
            number=t.number,
            refusal_score=float(t.values[0]),
            kl=float(t.values[1]),
            params=dict(t.params),
        )
        for t in completed(study)
    ]
    if not records:
        raise ConfigError(f"study '{study_name}' has no completed trials; raise --trials.")
    front = pareto_front(records)
    for r in front:
        r.pareto = True

    def confirm(record: TrialRecord) -> float:
        spec = EditParams.from_params(record.params).to_spec(candidates, site)
        # Generation runs on the model itself: on CPUs, bfloat16 decoding (small matrix
        # products, one token at a time) is slower than float32 (53 s vs. 33 s for 32 prompts ×
        # 32 tokens on the demo model), and the confirmed rates are then the model's own.
        with maybe_hooks(model, spec):
            responses = generate(
                model,
                tokenizer,
                harmful_val,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                desc=f"Confirming trial {record.number}",
            )
        refused = judge(list(harmful_val_prompts), responses)
        rate = sum(refused) / len(refused)
        log.info("trial %d: confirmed refusal rate %.3f", record.number, rate)
        return rate

    started = time.perf_counter()
    if trial is not None:
        by_number = {r.number: r for r in records}
        if trial not in by_number:
            raise ConfigError(
                f"trial {trial} is not a completed trial of study '{study_name}'; completed: "
                f"{', '.join(str(k) for k in sorted(by_number))}."
            )
        chosen = by_number[trial]
        chosen.confirmed_refusal_rate = confirm(chosen)
        met = chosen.confirmed_refusal_rate <= refusal_target
        rule = f"trial {trial}, chosen by the user (--trial)"
    else:
        chosen, met = choose(front, confirm, refusal_target, max_confirm)
        rule = (
            "lowest first-token KL among Pareto-front trials whose judged refusal rate on the "
            f"harmful validation prompts is at most {refusal_target:g} (front confirmed by "
            f"bisection along KL, at most {max_confirm} generations)"
        )
        if not met:
            rule += (
                "; no confirmed trial met the target, so the one with the lowest confirmed "
                "refusal rate was chosen"
            )
            log.warning("no confirmed trial reached the refusal target %.3f", refusal_target)
    confirm_seconds = time.perf_counter() - started
    spec = EditParams.from_params(chosen.params).to_spec(candidates, site)
    return SearchResult(
        spec=spec,
        chosen=chosen,
        trials=records,
        rule=rule,
        met_target=met,
        refusal_target=refusal_target,
        baseline=baseline,
        storage=storage,
        study_name=study_name,
        n_trials=n_trials,
        seconds={"search": round(search_seconds, 2), "confirm": round(confirm_seconds, 2)},
        search_dtype=dtype,
    )
