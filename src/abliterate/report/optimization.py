"""Trials as reported, the Pareto front, the documented choice rule and its renderings.

``report.json`` carries every trial as ``{"number", "refusal_score", "kl", "params", "pareto",
"confirmed_refusal_rate"?}`` plus ``"chosen"``; :func:`pareto_table` and :func:`front_plot`
render exactly that shape for ``report.md``.
"""

from __future__ import annotations

import math
from typing import Any


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
    """One paragraph describing an optimized edit (from its ``Ablation.to_dict``)."""
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
