"""Directions in the residual stream: the value type and the candidates computed from means.

A :class:`Direction` is a unit vector with provenance (model, layer, site, prompt-set hashes) and
the norm of the mean difference it came from. It supports arithmetic (the result is a plain,
unnormalised vector until :meth:`Direction.normalized` is called), exact equality and an exact
save/load round trip as ``NAME.safetensors`` + ``NAME.json``.

:class:`Candidates` holds the per-layer, per-site activation means of the harmful and harmless
sets (float64) and turns them into candidate directions; when the harmful set's per-prompt
activations of one site are kept too, it also gives the further directions of
:meth:`Candidates.extra_directions` (top singular vectors of the per-prompt differences).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from abliterate.core.directions import Direction
from abliterate.files import write_bytes
from abliterate.types import SITES, Site


def _without_component(vector: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``vector`` minus its component along ``other`` (float64)."""
    u = other.double() / other.double().norm().clamp(min=1e-30)
    v = vector.double()
    return v - (v @ u) * u


@dataclass(frozen=True)
class Candidates:
    """Mean last-token activations of both prompt sets at every layer and site.

    Attributes:
        harmful_mean: ``(n_layers, n_sites, d_model)`` float64.
        harmless_mean: ``(n_layers, n_sites, d_model)`` float64.
        sites: Names of the site axis, in order.
        model, revision, dataset_hashes: provenance copied into every direction.
        harmful_acts: Optional ``(n_prompts, n_layers, d_model)`` float32 per-prompt harmful
            activations at site ``acts_site`` (for :meth:`extra_directions`).
        acts_site: The site of ``harmful_acts``.
    """

    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    sites: tuple[Site, ...] = SITES
    model: str = ""
    revision: str | None = None
    dataset_hashes: dict[str, str] = field(default_factory=dict)
    harmful_acts: torch.Tensor | None = None
    acts_site: Site | None = None

    def __post_init__(self) -> None:
        if (self.harmful_acts is None) != (self.acts_site is None):
            raise ValueError("harmful_acts and acts_site go together")
        if self.harmful_acts is not None and (
            self.harmful_acts.ndim != 3 or self.harmful_acts.shape[1:] != (
                self.harmful_mean.shape[0], self.harmful_mean.shape[-1])
        ):  # fmt: skip
            raise ValueError(
                f"harmful_acts must be (n_prompts, n_layers, d_model), got "
                f"{tuple(self.harmful_acts.shape)}"
            )

    @property
    def n_layers(self) -> int:
        """Number of layers the means cover."""
        return int(self.harmful_mean.shape[0])

    def _diff(self, layer: int, site: Site) -> torch.Tensor:
        if site not in self.sites:
            raise ValueError(f"site {site!r} was not collected; collected: {self.sites}")
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range [0, {self.n_layers})")
        s = self.sites.index(site)
        return self.harmful_mean[layer, s] - self.harmless_mean[layer, s]  # (d_model,) float64

    def is_degenerate(self, layer: int, site: Site) -> bool:
        """True when both sets have (numerically) the same mean there, so there is no direction.

        This happens at the block input of layer 0, which is the embedding of the chat
        template's last token: the same token for every prompt.
        """
        scale = float(self.harmless_mean[layer].norm()) + float(self.harmful_mean[layer].norm())
        return float(self._diff(layer, site).norm()) <= 1e-9 * max(scale, 1e-30)

    def has_direction(self) -> bool:
        """Whether any layer and site has a direction: False when the two training sets give the
        same means everywhere (the same prompts, perhaps in another order)."""
        return any(
            not self.is_degenerate(layer, site)
            for layer in range(self.n_layers)
            for site in self.sites
        )

    def direction(self, layer: int, site: Site, *, projected: bool = False) -> Direction:
        """The normalised harmful-minus-harmless mean difference at ``(layer, site)``.

        With ``projected`` the component along the harmless mean is removed first, so ablating
        the direction leaves the part of the stream that harmless prompts share untouched and
        removes only what distinguishes harmful ones.

        Raises:
            ValueError: the site was not collected, the layer is out of range, or the two means
                are equal there (see :meth:`is_degenerate`).
        """
        diff = self._diff(layer, site)
        if self.is_degenerate(layer, site):
            raise ValueError(
                f"harmful and harmless means are identical at layer {layer}, site {site!r}: "
                "there is no direction to take there"
            )
        norm = float(diff.norm())
        if projected:
            harmless = self.harmless_mean[layer, self.sites.index(site)]
            diff = _without_component(diff, harmless)
        return Direction(
            vector=(diff / diff.norm()).float(),
            layer=layer,
            site=site,
            scale=norm,
            model=self.model,
            revision=self.revision,
            dataset_hashes=dict(self.dataset_hashes),
            projected=projected,
        )

    def direction_at(self, position: float, site: Site, *, projected: bool = False) -> Direction:
        """The direction at a fractional layer ``position``.

        ``2.25`` is the normalised ``0.75 d_2 + 0.25 d_3`` of the unit directions of layers 2
        and 3 (:meth:`Direction.interpolate`); with ``projected`` the interpolated direction is
        then made orthogonal to the equally interpolated harmless mean.
        """
        if not 0.0 <= position <= self.n_layers - 1:
            raise ValueError(f"position {position} is out of range [0, {self.n_layers - 1}]")
        lo = min(int(position), self.n_layers - 1)
        hi = min(lo + 1, self.n_layers - 1)
        t = position - lo
        if t == 0.0 or hi == lo:
            return self.direction(lo, site, projected=projected)
        mixed = Direction.interpolate(self.direction(lo, site), self.direction(hi, site), t)
        if not projected:
            return mixed
        s = self.sites.index(site)
        harmless = (1.0 - t) * self.harmless_mean[lo, s] + t * self.harmless_mean[hi, s]
        vec = _without_component(mixed.vector.double(), harmless)
        return replace(mixed, vector=(vec / vec.norm()).float(), projected=True)

    def extra_directions(
        self, main: Direction, layer: int, site: Site, count: int
    ) -> tuple[Direction, ...]:
        """Up to ``count`` further unit directions to remove together with ``main``.

        The per-prompt differences at ``layer`` (each harmful prompt's activation minus the
        harmless mean) are stripped of their component along ``main``; their top ``count``
        right singular vectors are the directions, strongest first. They are orthonormal and
        orthogonal to ``main``: what still separates individual harmful prompts from harmless
        ones once the mean difference is gone (e.g. a kind of request the mean under-weights).
        ``scale`` is each direction's root-mean-square coordinate over the harmful prompts.

        Raises:
            ValueError: no per-prompt activations were kept for ``site``.
        """
        if self.harmful_acts is None or self.acts_site != site:
            raise ValueError(
                f"extra directions need the per-prompt harmful activations of site {site!r}; "
                f"kept: {self.acts_site!r}"
            )
        if count <= 0:
            return ()
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range [0, {self.n_layers})")
        d = main.vector.double()
        d = d / d.norm()
        harmless = self.harmless_mean[layer, self.sites.index(site)]
        diffs = self.harmful_acts[:, layer].double() - harmless  # (n_prompts, d_model)
        diffs = diffs - torch.outer(diffs @ d, d)
        _, sv, vh = torch.linalg.svd(diffs, full_matrices=False)
        out = []
        n = diffs.shape[0]
        for i in range(min(count, vh.shape[0])):
            if float(sv[i]) <= 1e-9 * max(float(sv[0]), 1e-30):
                break
            v = vh[i] - (vh[i] @ d) * d  # exact orthogonality despite rounding
            if float(v[v.abs().argmax()]) < 0:  # a fixed sign, for reproducible files
                v = -v
            out.append(
                Direction(
                    vector=(v / v.norm()).float(),
                    layer=layer,
                    site=site,
                    scale=float(sv[i]) / n**0.5,
                    model=self.model,
                    revision=self.revision,
                    dataset_hashes=dict(self.dataset_hashes),
                )
            )
        return tuple(out)

    def save(self, path: str | Path) -> None:
        """Write the means (and kept activations) as safetensors, provenance in the header."""
        from safetensors.torch import save

        meta = {
            "sites": ",".join(self.sites),
            "model": self.model,
            "revision": self.revision or "",
            "dataset_hashes": json.dumps(self.dataset_hashes),
            "acts_site": self.acts_site or "",
        }
        tensors = {"harmful_mean": self.harmful_mean, "harmless_mean": self.harmless_mean}
        if self.harmful_acts is not None:
            tensors["harmful_acts"] = self.harmful_acts.contiguous()
        write_bytes(Path(path), save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> Candidates:
        """Read candidates written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            harmful = f.get_tensor("harmful_mean")
            harmless = f.get_tensor("harmless_mean")
            acts = f.get_tensor("harmful_acts") if "harmful_acts" in f.keys() else None  # noqa: SIM118
        return cls(
            harmful_mean=harmful,
            harmless_mean=harmless,
            sites=tuple(meta["sites"].split(",")),
            model=meta["model"],
            revision=meta["revision"] or None,
            dataset_hashes=json.loads(meta["dataset_hashes"]),
            harmful_acts=acts,
            acts_site=meta.get("acts_site") or None if acts is not None else None,
        )
