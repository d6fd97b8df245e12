"""Renderings of an optimization (the ``optimization`` entry of ``report.json``) and of the
edit it chose, for ``report.md``: the Pareto table, a text plot of the trials and one paragraph
describing the edit."""

from __future__ import annotations

import math

from abliterate.report.format import pct
from abliterate.report.schema import AblationEdit, Optimization, Trial, TrialParams


def pareto_front(optimization: Optimization) -> list[Trial]:
    """The trials the search marked as Pareto-optimal, by increasing KL."""
    return sorted((t for t in optimization.trials if t.pareto), key=lambda t: t.kl)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _param_cells(p: TrialParams) -> str:
    return (
        f"{p.direction_layer:.2f} | {p.attention_peak:.2f} @ {p.attention_position:.1f} | "
        f"{p.mlp_peak:.2f} @ {p.mlp_position:.1f} | {_yes(p.per_layer)} | {_yes(p.projected)} | "
        f"{_yes(p.norm_preserving)}"
    )


def pareto_table(optimization: Optimization) -> str:
    """A Markdown table of the Pareto-front trials, the chosen one marked."""
    chosen = optimization.chosen.number
    lines = [
        "| trial | refusal prob (val) | first-token KL (val) | judged refusals (val) | "
        "direction layer | attn peak @ pos | MLP peak @ pos | per-layer | projected | "
        "norm-pres. | |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|:---:|:---|",
    ]
    for t in pareto_front(optimization):
        rate = "" if t.confirmed_refusal_rate is None else pct(t.confirmed_refusal_rate)
        lines.append(
            f"| {t.number} | {t.objective_refusal:.3f} | {t.kl:.4f} | {rate} | "
            f"{_param_cells(t.params)} | {'◀ chosen' if t.number == chosen else ''} |"
        )
    return "\n".join(lines)


def front_plot(optimization: Optimization, width: int = 60, height: int = 16) -> str:
    """A text scatter plot of every trial: KL (x, log scale) against refusal probability (y).

    ``·`` is a trial, ``o`` a Pareto-front trial, ``*`` the chosen one.
    """
    trials = optimization.trials
    kls = [max(t.kl, 1e-6) for t in trials]
    lo, hi = math.log10(min(kls)), math.log10(max(kls))
    span = (hi - lo) or 1.0
    grid = [[" "] * width for _ in range(height)]
    # Front trials are drawn last so that they stay visible where points overlap.
    for t, kl in sorted(zip(trials, kls, strict=True), key=lambda p: p[0].pareto):
        x = round((math.log10(kl) - lo) / span * (width - 1))
        y = round((1.0 - t.objective_refusal) * (height - 1))
        mark = "o" if t.pareto else "·"
        if t.number == optimization.chosen.number:
            mark = "*"
        if grid[y][x] != "*":
            grid[y][x] = mark
    rows = ["refusal prob", "1.0 ┤" + "".join(grid[0])]
    rows += ["    │" + "".join(r) for r in grid[1:-1]]
    rows += ["0.0 ┤" + "".join(grid[-1]), "    └" + "─" * width]
    rows.append(f"     KL {10**lo:.2g} … {10**hi:.2g} (log scale)")
    return "\n".join(rows)


def describe_edit(edit: AblationEdit) -> str:
    """One paragraph describing an optimized directional-ablation edit."""
    d = edit.direction
    source = (
        "each layer's own direction"
        if edit.layer_directions
        else f"the direction at layer position {float(d.layer):.2f}, site `{d.site}`"
    )
    touched = [i for i, (a, m) in enumerate(zip(edit.attention, edit.mlp, strict=True)) if a or m]
    span = f"layers {touched[0]}–{touched[-1]}" if touched else "no layer"
    extra = len(edit.extra_directions)
    together = f" together with {extra} further direction{'s' * (extra > 1)}" if extra else ""
    return (
        f"Removed {source}{' (projected off the harmless mean)' if d.projected else ''}"
        f"{together} in {edit.mode.replace('_', '-')} mode from {span}: peak "
        f"attention strength {max(edit.attention, default=0.0):.2f}, peak MLP strength "
        f"{max(edit.mlp, default=0.0):.2f}, embedding {edit.embedding:g}."
    )


def _corr(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def search_notes(optimization: Optimization) -> list[str]:
    """Markdown bullet lines on the opt-in parts of a search, where present: the refusal
    openings, the precision check, the refinement and the calibration of the cheap objective
    against the judge."""
    o, lines = optimization, []
    if o.openings is not None:
        shown = ", ".join(repr(op.text) for op in o.openings.openings) or "none"
        lines.append(
            f"- refusal openings (the objective asks about them): {shown}; they cover "
            f"{pct(o.openings.coverage)} of the {o.openings.n_refused} judged refusals"
        )
    if o.precision is not None:
        p = o.precision
        lines.append(
            f"- front re-scored in {p.model_dtype} ({p.n_rescored} trials, searched in "
            f"{p.search_dtype}): same KL order {_yes(p.same_order)}, same front "
            f"{_yes(p.same_front)}, largest KL difference {p.max_kl_difference:.2g}; the choice "
            f"used the {p.model_dtype} values"
        )
    if o.refinement is not None:
        r = o.refinement
        lines.append(
            f"- descent on the chosen trial's per-layer strengths: KL {r.start['kl']:.4f} → "
            f"{r.best['kl']:.4f} at refusal ≤ {r.cap:.4f}; kept: {_yes(r.kept)}"
        )
    if o.calibration is not None:
        c = o.calibration
        lines.append(
            f"- calibration against the judge ({len(c.trials)} confirmed trials, {c.n_prompts} "
            f"answers): Spearman across trials {_corr(c.spearman)} (next-token proxy "
            f"{_corr(c.spearman_next_token)}), per-answer AUC {_corr(c.auc)} (proxy "
            f"{_corr(c.auc_next_token)})"
        )
    return lines
