"""Layer rules: which kind each decoder layer is, read from the model's config.

Hybrid and mixture-of-experts families mix layers of several kinds (attention or linear
attention, dense MLP or MoE). Each family of :mod:`abliterate.model.families` lists rules; a
rule gives every layer a label (``moe``/``dense``, a ``layer_types`` entry, …) computed from
the config exactly as the family's modelling code decides it, and a writer slot exists only in
the layers carrying all of its labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """``config.key`` of a transformers config (aliases resolved) or of a plain mapping."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class Listed:
    """The label is ``config.<key>[layer]`` (``layer_types``, ``layers_block_type``)."""

    key: str

    def label(self, config: Any, layer: int) -> str | None:
        values = config_value(config, self.key)
        if not isinstance(values, Sequence) or isinstance(values, str) or layer >= len(values):
            raise KeyError(f"config.{self.key} does not list a kind for layer {layer}")
        return str(values[layer])


@dataclass(frozen=True)
class Flag:
    """``yes`` on every layer when ``config.<key>`` is set (truthy), else ``no``."""

    key: str
    yes: str
    no: str | None = None

    def label(self, config: Any, layer: int) -> str | None:
        return self.yes if config_value(config, self.key) else self.no


@dataclass(frozen=True)
class MoeFrom:
    """``moe`` from layer ``config.<key>`` on (``first_k_dense_replace``), ``dense`` before."""

    key: str

    def label(self, config: Any, layer: int) -> str | None:
        return "moe" if layer >= int(config_value(config, self.key, 0) or 0) else "dense"


@dataclass(frozen=True)
class MoeEvery:
    """``moe`` on every ``step``-th layer (1-based: ``(layer + 1) % step == 0``), within
    ``start`` … ``end`` when given, except the layers listed under ``skip``, and only when
    ``count`` (the number of experts) is non-zero; ``dense`` elsewhere."""

    step: str
    skip: str | None = None
    start: str | None = None
    end: str | None = None
    count: str | None = None

    def label(self, config: Any, layer: int) -> str | None:
        step = int(config_value(config, self.step, 1) or 1)
        moe = (layer + 1) % step == 0
        if self.skip is not None:
            moe = moe and layer not in (config_value(config, self.skip) or ())
        if self.start is not None:
            moe = moe and layer >= int(config_value(config, self.start, 0))
        if self.end is not None:
            moe = moe and layer <= int(config_value(config, self.end, layer))
        if self.count is not None:
            moe = moe and bool(config_value(config, self.count))
        return "moe" if moe else "dense"


@dataclass(frozen=True)
class MoeIn:
    """``moe`` on the layers listed in ``config.<key>`` (Llama 4's ``moe_layers``)."""

    key: str

    def label(self, config: Any, layer: int) -> str | None:
        return "moe" if layer in (config_value(config, self.key) or ()) else "dense"


@dataclass(frozen=True)
class MoePeriodic:
    """``moe`` where ``layer % config.<period> == config.<offset>`` (Jamba), else ``dense``."""

    period: str
    offset: str
    count: str

    def label(self, config: Any, layer: int) -> str | None:
        period = int(config_value(config, self.period, 1))
        moe = layer % period == int(config_value(config, self.offset, 0))
        return "moe" if moe and int(config_value(config, self.count, 1) or 1) > 1 else "dense"


LayerRule = Listed | Flag | MoeFrom | MoeEvery | MoeIn | MoePeriodic
