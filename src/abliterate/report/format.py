"""How numbers read in every rendering of a report (Markdown, HTML, terminal, charts).

One copy of each formatter, so a rate reads the same in ``report.md``, ``report.html`` and the
table printed at the end of a run. A missing value (None) is shown as an en dash.
"""

from __future__ import annotations

import math
from html import escape

MISSING = "–"


def pct(rate: float | None, digits: int = 1) -> str:
    """A fraction as a percentage: ``0.125 -> "12.5%"``."""
    return MISSING if rate is None else f"{100 * rate:.{digits}f}%"


def fixed(value: float | None, digits: int = 4) -> str:
    """A float with a fixed number of decimals."""
    return MISSING if value is None else f"{value:.{digits}f}"


def sig(value: float | None, digits: int = 4) -> str:
    """A number to ``digits`` significant digits; integers in full."""
    if value is None:
        return MISSING
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def sci(value: float | None) -> str:
    """A small difference in scientific notation (``3.10e-06``); exactly 0 says so."""
    if value is None:
        return MISSING
    return "0 (identical)" if value == 0 else f"{value:.2e}"


def leaf(value: object) -> str:
    """A JSON leaf (``report.json`` listed value by value): numbers to 4 significant digits,
    booleans and null as JSON spells them, strings as they are."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(value) if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


_SIDES = {
    "heal": ("before healing", "healed"),
    "sft": ("before", "fine-tuned"),
    "detox": ("baseline", "detoxified"),
    "steer": ("baseline", "steered"),
    "evaluate": ("baseline", "model"),
}


def side_labels(command: str) -> tuple[str, str]:
    """What a report calls its ``baseline`` and ``edited`` models (``heal``: before healing and
    healed; ``sft``: before and fine-tuned; ``evaluate``: baseline and model; abliteration: baseline
    and abliterated)."""
    return _SIDES.get(command, ("baseline", "abliterated"))


def text(value: object) -> str:
    """Untrusted text for a Markdown table cell: HTML-escaped, pipes as entities (an escaped
    ``\\|`` can still split a row in some renderers), line breaks as ``<br>``."""
    escaped = escape(str(value), quote=False).replace("|", "&#124;")
    return "<br>".join(escaped.splitlines())


def code(value: object) -> str:
    """Untrusted text in code style: an HTML ``<code>`` element around escaped text (a
    Markdown code span would show entities literally and could be closed by a backtick)."""
    return f"<code>{text(value)}</code>"
