"""Trials as reported, the Pareto front, the documented choice rule and its renderings.

``report.json`` carries every trial as ``{"number", "refusal_score", "kl", "params", "pareto",
"confirmed_refusal_rate"?}`` plus ``"chosen"``; :func:`pareto_table` and :func:`front_plot`
render exactly that shape for ``report.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TrialRecord:
    """One finished trial as reported (the ``report.json`` ``optimization.trials`` entries)."""

    number: int
    refusal_score: float
    kl: float
    params: dict[str, Any]
    pareto: bool = False
    confirmed_refusal_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``confirmed_refusal_rate`` only for confirmed trials."""
        out = asdict(self)
        if self.confirmed_refusal_rate is None:
            del out["confirmed_refusal_rate"]
        return out


def pareto_front(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Records not dominated in (refusal_score, kl), sorted by KL."""
    front = [
        r
        for r in records
        if not any(
            o.refusal_score <= r.refusal_score
            and o.kl <= r.kl
            and (o.refusal_score < r.refusal_score or o.kl < r.kl)
            for o in records
        )
    ]
    return sorted(front, key=lambda r: (r.kl, r.refusal_score))


def choose(
    front: Sequence[TrialRecord],
    confirm: Callable[[TrialRecord], float],
    target: float,
    max_confirm: int,
) -> tuple[TrialRecord, bool]:
    """The lowest-KL front trial whose confirmed refusal rate is at most ``target``.

    Along the front (sorted by KL) refusals fall as KL rises, so the first trial that meets
    the target is found by bisection: the most compliant end is confirmed first, then the
    midpoint of the interval that still contains the boundary, at most ``max_confirm`` times.
    Each confirmation's rate is stored on the record. Returns ``(chosen, met_target)``; when no
    confirmed trial meets the target, the one with the lowest confirmed rate (then KL).
    """
    if not front:
        raise ValueError("the study has no completed trials to choose from")
    budget = [max_confirm]

    def rate(i: int) -> float:
        rec = front[i]
        if rec.confirmed_refusal_rate is None:
            budget[0] -= 1
            rec.confirmed_refusal_rate = confirm(rec)
        return rec.confirmed_refusal_rate

    lo, hi = -1, len(front) - 1  # invariant: front[hi] meets the target, front[lo] does not
    if rate(hi) <= target:
        while hi - lo > 1 and budget[0] > 0:
            mid = (lo + hi) // 2
            if rate(mid) <= target:
                hi = mid
            else:
                lo = mid
    confirmed = [r for r in front if r.confirmed_refusal_rate is not None]
    meeting = [r for r in confirmed if r.confirmed_refusal_rate <= target]  # type: ignore[operator]
    if meeting:
        return min(meeting, key=lambda r: r.kl), True
    return min(confirmed, key=lambda r: (r.confirmed_refusal_rate, r.kl)), False


def pareto_table(optimization: dict[str, Any]) -> str:
    """A Markdown table of the Pareto-front trials (from the ``optimization`` report entry)."""
    chosen = optimization["chosen"]["number"]
    front = [t for t in optimization["trials"] if t["pareto"]]
    front.sort(key=lambda t: t["kl"])
    lines = [
        "| trial | refusal prob (val) | first-token KL (val) | judged refusals (val) | "
        "direction layer | attn peak @ pos | MLP peak @ pos | per-layer | projected | "
        "norm-pres. | |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|:---:|:---|",
    ]
    for t in front:
        p = t["params"]
        rate = t.get("confirmed_refusal_rate")
        lines.append(
            f"| {t['number']} | {t['refusal_score']:.3f} | {t['kl']:.4f} | "
            f"{'' if rate is None else f'{100 * rate:.1f}%'} | {p['direction_layer']:.2f} | "
            f"{p['attention_peak']:.2f} @ {p['attention_position']:.1f} | "
            f"{p['mlp_peak']:.2f} @ {p['mlp_position']:.1f} | {_yes(p['per_layer'])} | "
            f"{_yes(p['projected'])} | {_yes(p['norm_preserving'])} | "
            f"{'◀ chosen' if t['number'] == chosen else ''} |"
        )
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def front_plot(optimization: dict[str, Any], width: int = 60, height: int = 16) -> str:
    """A text scatter plot of every trial: KL (x, log scale) against refusal probability (y).

    ``·`` is a trial, ``o`` a Pareto-front trial, ``*`` the chosen one.
    """
    trials = optimization["trials"]
    kls = [max(t["kl"], 1e-6) for t in trials]
    lo, hi = math.log10(min(kls)), math.log10(max(kls))
    span = (hi - lo) or 1.0
    grid = [[" "] * width for _ in range(height)]
    for t, kl in sorted(zip(trials, kls, strict=True), key=lambda p: p[0]["pareto"]):
        x = round((math.log10(kl) - lo) / span * (width - 1))
        y = round((1.0 - min(max(t["refusal_score"], 0.0), 1.0)) * (height - 1))
        mark = "o" if t["pareto"] else "·"
        if t["number"] == optimization["chosen"]["number"]:
            mark = "*"
        if grid[y][x] not in ("*",):
            grid[y][x] = mark
    rows = ["refusal prob", "1.0 ┤" + "".join(grid[0])]
    rows += ["    │" + "".join(r) for r in grid[1:-1]]
    rows += ["0.0 ┤" + "".join(grid[-1]), "    └" + "─" * width]
    rows.append(f"     KL {10**lo:.2g} … {10**hi:.2g} (log scale)")
    return "\n".join(rows)


def describe_edit(edit: dict[str, Any]) -> str:
    """One paragraph describing an optimized edit (from its ``EditSpec.to_dict``)."""
    d = edit["direction"]
    source = (
        "each layer's own direction"
        if edit.get("layer_directions")
        else f"the direction at layer position {float(d['layer']):.2f}, site `{d['site']}`"
    )
    touched = [i for i, (a, m) in enumerate(zip(edit["attention"], edit["mlp"], strict=True))
               if a or m]  # fmt: skip
    span = f"layers {touched[0]}–{touched[-1]}" if touched else "no layer"
    extra = len(edit.get("extra_directions") or [])
    together = f" together with {extra} further direction{'s' * (extra > 1)}" if extra else ""
    return (
        f"Removed {source}{' (projected off the harmless mean)' if d.get('projected') else ''}"
        f"{together} in {edit.get('mode', 'plain').replace('_', '-')} mode from {span}: peak "
        f"attention strength {max(edit['attention']):.2f}, peak MLP strength "
        f"{max(edit['mlp']):.2f}, embedding {edit['embedding']:g}."
    )
