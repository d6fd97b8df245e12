"""The steering section of ``report.md`` (``abliterate steer``): what was added or removed,
where, and the behaviour metric against strength with the answers' repetitiveness, so a reader
sees both how far a strength moves the behaviour and where it starts to break the model."""

from __future__ import annotations

from abliterate.report.format import code, fixed, pct, sig, text
from abliterate.report.schema import Report, SweepPoint


def _value(point: SweepPoint, metric: str) -> str:
    return pct(point.value) if metric == "refusal" else sig(point.value)


def steering_lines(report: Report) -> list[str]:
    """Markdown lines of the steering section (empty when the report has no steering)."""
    steering = report.steering
    if steering is None:
        return []
    action = "removed (orthogonalized)" if steering.mode == "remove" else "added"
    layers = ", ".join(str(layer) for layer in steering.layers)
    lines = [
        "",
        "## Steering",
        "",
        f"Direction {code(steering.direction)} ({text(steering.description)}) {action} at "
        f"site {code(steering.site)} of layers {layers}, strength {steering.strength:g}.",
    ]
    if not steering.sweep:
        return lines
    unit = text(steering.metric_unit)
    # With --thinking on the metric reads the answers after the reasoning; the share that never
    # arrived gets a column of its own.
    reasoning = any(p.unfinished_rate is not None for p in steering.sweep)
    note = (
        " Reasoning: the metric reads only the answer after the reasoning block, over the "
        "answers that arrived within the token budget; the others are *unfinished*."
        if reasoning
        else ""
    )
    lines += [
        "",
        f"Strength sweep: {text(steering.metric)} ({unit}) of greedy answers to "
        f"{steering.metric_prompts.n} prompts ({text(steering.metric_prompts.name)}); distinct "
        "3-grams is the mean share of word 3-grams that are not repeats (1: no repetition; it "
        f"falls as a too-strong steering makes the model loop).{note}",
        "",
        f"| strength | {text(steering.metric)} | distinct 3-grams |"
        + (" unfinished |" if reasoning else ""),
        "|---:|---:|---:|" + ("---:|" if reasoning else ""),
    ]
    for point in sorted(steering.sweep, key=lambda p: p.strength):
        lines.append(
            f"| {point.strength:g} | {_value(point, steering.metric)} | "
            f"{fixed(point.distinct_3, 3)} |"
            + (f" {pct(point.unfinished_rate)} |" if reasoning else "")
        )
    return lines
