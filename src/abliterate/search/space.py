"""The search space of optimized abliteration: every point is an :class:`Ablation`.

A single mean-difference direction removed at full strength from every writer takes most
refusals away but also moves the model on harmless prompts. The search explores a richer space
(:class:`EditParams`) for edits that refuse less *and* move harmless prompts less:

* direction source: a fractional layer position (interpolating the two neighbouring layers'
  directions), or each layer its own direction; optionally *projected* (orthogonal to the
  harmless mean, see :meth:`~abliterate.measure.candidates.Candidates.direction`);
* a strength :class:`Profile` across layers for the attention outputs and one for the MLP
  outputs (peak, position of the peak, width, edge strength; 0 outside the window);
* plain or norm-preserving weight edits (:data:`~abliterate.core.ablation.EDIT_MODES`);
* with ``max_directions > 1``, how many directions to remove at once: the mean difference plus
  the top singular vectors of the per-prompt differences
  (:meth:`~abliterate.measure.candidates.Candidates.extra_directions`).

Every point of the space is an :class:`~abliterate.core.ablation.Ablation`, so it is scored
through hooks and baked into the weights by the same code. :class:`SearchSpace` holds the
bounds and the seeded starting points.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.measure.candidates import Candidates
from abliterate.types import Site

if TYPE_CHECKING:
    import optuna

# Bump when the meaning of a stored parameter changes, so an old study is not resumed by
# mistake (its trials would describe different edits). Options that change the objective or the
# bounds are in the study's fingerprint instead (abliterate.search.optimize).
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
    """One point of the search space; :meth:`to_edit` turns it into an :class:`Ablation`.

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

    def to_edit(self, candidates: Candidates, site: Site) -> Ablation:
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
        return Ablation(
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
    Peaks start above 0 by default because a zero peak leaves those writers alone and the
    search need not rediscover the unedited model; ``mlp_peak`` may start at 0
    (``--mlp-peak-min 0``: the MLPs left untouched, which some models need because they are
    damaged most there). Peaks stop at 1.5 because overshooting a little can cancel what the
    other layers' writers add back. With ``max_directions > 1`` the number
    of directions removed at once is searched too (1 to ``max_directions``).
    """

    n_layers: int
    min_layer: float
    max_layer: float
    peak: tuple[float, float] = (0.2, 1.5)
    mlp_peak: tuple[float, float] = (0.2, 1.5)
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
            bounds = self.peak if c == "attention" else self.mlp_peak
            profiles[c] = Profile(
                peak=trial.suggest_float(f"{c}_peak", *bounds),
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
