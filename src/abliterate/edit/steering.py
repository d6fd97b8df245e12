"""Steering files and where they apply: read a direction file as a steering (or removal) edit,
and check that the model has a writer for every addition.

:func:`load_steering` accepts what ``abliterate direction`` writes (a one-file
:class:`~abliterate.core.directions.DirectionSet`) and what ``abliterate run`` writes (a single
refusal :class:`~abliterate.core.directions.Direction`: ``direction.safetensors`` beside its
``direction.json``), so re-adding refusal is ``--direction RUN/direction.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction, DirectionSet
from abliterate.core.steering import Steering, site_of_writer
from abliterate.errors import ConfigError, UnsupportedArchitectureError
from abliterate.model.anatomy import BoundAnatomy


def read_directions(path: Path, strength: float, layers: tuple[int, ...] | None) -> Steering:
    """A steering edit from a direction-set file or a run's single direction.

    A single direction is added at its own layer and site at its natural magnitude (strength 1
    adds the mean difference it came from, see :meth:`Steering.from_direction`).

    Raises:
        ConfigError: the file is neither, or ``layers`` asks for layers it does not have.
    """
    if not path.is_file():
        raise ConfigError(f"direction file {path} does not exist.")
    try:
        if path.with_suffix(".json").is_file():
            direction = Direction.load(path)
            steering = Steering.from_direction(direction, strength)
            if layers is not None and tuple(layers) != steering.steered_layers:
                raise ConfigError(
                    f"{path} holds one direction, taken at layer {direction.layer}; --layers "
                    "cannot choose others."
                )
            return steering
        return Steering(DirectionSet.load(path), strength, layers)
    except (ValueError, KeyError, OSError) as exc:  # a wrong file type or a bad layer choice
        raise ConfigError(f"cannot steer with {path}: {exc}") from exc


def removal(steering: Steering, n_layers: int) -> Ablation:
    """The directional ablation that removes each steered layer's (unit) direction from that
    layer's residual writers at ``steering.strength`` (1 removes it; other layers untouched)."""
    unit = steering.directions.normalized()
    chosen = steering.steered_layers
    rows = {layer: unit[layer] for layer in chosen}
    first = rows[chosen[0]]
    strengths = tuple(steering.strength if i in rows else 0.0 for i in range(n_layers))
    return Ablation(
        direction=first,
        embedding=0.0,
        attention=strengths,
        mlp=strengths,
        layer_directions=tuple(rows.get(i, first) for i in range(n_layers)),
    )


def require_targets(steering: Steering, bound: BoundAnatomy) -> None:
    """Check that every steered layer has a writer to add through.

    Raises:
        UnsupportedArchitectureError: a layer has none (a mixture-of-experts MLP, whose experts
            write only for the tokens routed to them, cannot add a constant for every token).
        ConfigError: the direction set does not fit the model.
    """
    try:
        steering.check(bound.d_model, bound.n_layers)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    reachable = {
        (site, layer) for w in bound.writers for site, layer in site_of_writer(bound.writer_info(w))
    }
    missing = [x for x in steering.steered_layers if (steering.site, x) not in reachable]
    if missing:
        raise UnsupportedArchitectureError(
            f"the '{bound.anatomy.family}' model has no single writer before site "
            f"'{steering.site}' of layer(s) {missing}, so a constant cannot be added there."
        )
