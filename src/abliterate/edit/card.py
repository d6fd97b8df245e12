"""The model card of an uploaded abliteration: base model, edit, measured numbers, reproduction.

:func:`model_card` renders ``templates/model_card.md.j2`` (Jinja2) from what a run directory
records: the typed ``report.json`` (refusal rates before and after with the judge named, the KL
divergences, benchmarks when the run measured any, the checks of every export), its
``config.json`` (turned back into the command that reproduces the run: every option that differs
from its default) and the SHA-256 of every weight file uploaded.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from abliterate.config import OptimizeConfig, RunConfig, option_name
from abliterate.report.schema import ExportCheck, Report

_ENV = Environment(
    loader=PackageLoader("abliterate.edit", "templates"),
    autoescape=False,  # Markdown, not HTML; values are escaped for tables by _cell
    keep_trailing_newline=True,
    undefined=StrictUndefined,
    trim_blocks=False,
)


def _quoted(value: object) -> str:
    """A double-quoted string valid in YAML and in Python (JSON's escapes are both's)."""
    return json.dumps(str(value), ensure_ascii=False)


_ENV.filters["quoted"] = _quoted


def _cell(value: object) -> str:
    """A value as a Markdown table cell (pipes and line breaks cannot appear raw)."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _rate(rate: float, n: int) -> str:
    return f"{100 * rate:.1f}% ({round(rate * n)}/{n})"


def _num(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1000  # type: ignore[assignment]
    return f"{n} B"


def _span(strengths: list[float]) -> str:
    """Per-layer strengths in a few words: ``1.0 in all 24 layers``, ``0–1.0 (19 of 24 layers)``."""
    if not strengths:
        return "–"
    on = [s for s in strengths if s != 0.0]
    if len(set(strengths)) == 1:
        return f"{strengths[0]:g} in all {len(strengths)} layers"
    return f"{min(on):.3g}–{max(on):.3g} in {len(on)} of {len(strengths)} layers"


def reproduce_command(config: Mapping[str, Any], command: str) -> str:
    """``abliterate COMMAND`` with every option of ``config`` (a run's ``config.json``) that
    differs from the command's default."""
    cls = OptimizeConfig if command == "optimize" else RunConfig
    defaults = cls.model_validate({}).model_dump(mode="json")
    words = ["abliterate", command]
    for name, value in config.items():
        if name not in cls.model_fields or defaults.get(name) == value:
            continue
        flag = option_name(cls, name)
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            words.extend([flag, *(str(v) for v in value)])
        elif value is not None:
            words.extend([flag, str(value)])
    return shlex.join(words)


@dataclass(frozen=True)
class CardInputs:
    """What a model card is made of.

    Attributes:
        repo: Hub repository ``ORG/NAME``.
        report: The run's typed ``report.json``.
        config: The run's ``config.json``.
        files: Path in the repository -> SHA-256 of every weight file uploaded.
        is_adapter: The repository's root holds a PEFT adapter, not a model.
    """

    repo: str
    report: Report
    config: Mapping[str, Any]
    files: Mapping[str, str]
    is_adapter: bool


def _edit_rows(report: Report) -> dict[str, Any]:
    edit = report.edit.model_dump(mode="json") if report.edit is not None else {}
    direction = edit.get("direction") or {}
    layer = direction.get("layer")
    rows: dict[str, Any] = {
        "kind": edit.get("kind", "–"),
        "mode": edit.get("mode"),
        "direction": None if layer is None else f"{layer:.3g}",
        "site": direction.get("site"),
        "projected": direction.get("projected", False),
        "n_directions": 1 + len(edit.get("extra_directions") or []) if edit else None,
        "embedding": edit.get("embedding"),
        "attention": _span(edit.get("attention") or []),
        "mlp": _span(edit.get("mlp") or []),
        "chosen_by": None,
    }
    if report.optimization is not None:
        rows["chosen_by"] = f"search (trial {report.optimization.chosen.number})"
    elif report.selection is not None:
        rows["chosen_by"] = "automatic selection"
    return rows


def _benchmarks(report: Report) -> list[dict[str, str]]:
    rows = []
    edited = report.edited.benchmarks or {}
    base = (report.baseline.benchmarks or {}) if report.baseline is not None else {}
    for task, scores in sorted(edited.items()):
        for metric, value in sorted(scores.metrics.items()):
            if metric.endswith("_stderr"):
                continue
            before = base[task].metric(metric) if task in base else None
            rows.append({"name": _cell(task), "metric": metric, "baseline": _num(before),
                         "edited": _num(value)})  # fmt: skip
    return rows


def _export_row(e: ExportCheck) -> dict[str, str]:
    return {
        "format": e.format,
        "path": _cell(e.path),
        "size": _size(e.size_bytes),
        "max_abs_logit": _num(e.max_abs_logit, 3),
        "mean_kl": _num(e.mean_kl, 3),
    }


def model_card(inputs: CardInputs) -> str:
    """The model card (Markdown with a YAML header) of ``inputs``."""
    report = inputs.report
    base, edited = report.baseline, report.edited
    exports = report.checks.exports if report.checks is not None else None
    context = {
        "repo": inputs.repo,
        "base_model": report.model.name,
        "revision": report.model.revision,
        "version": report.abliterate_version,
        "library": "peft" if inputs.is_adapter else "transformers",
        "is_adapter": inputs.is_adapter,
        "extra_tags": ["gguf"] if any(p.endswith(".gguf") for p in inputs.files) else [],
        "edit": _edit_rows(report),
        "judge": edited.judge,
        "n_harmful": edited.n_prompts,
        "n_harmless": report.data["eval_harmless"].n if "eval_harmless" in report.data else "–",
        "refusal": {
            "baseline": "–" if base is None else _rate(base.refusal_rate, base.n_prompts),
            "edited": _rate(edited.refusal_rate, edited.n_prompts),
        },
        "kl": None if edited.kl_divergence is None else _num(edited.kl_divergence),
        "kl_multi": None
        if edited.kl_divergence_multi_token is None
        else _num(edited.kl_divergence_multi_token),
        "kl_tokens": edited.kl_tokens or "–",
        "benchmarks": _benchmarks(report),
        "exports": [_export_row(e) for e in exports or []],
        "edits_embedding": bool(_edit_rows(report)["embedding"]),
        "gguf_files": [p for p in inputs.files if p.endswith(".gguf") and "adapter" not in p],
        "gguf_adapters": [p for p in inputs.files if p.endswith(".gguf") and "adapter" in p],
        "command": reproduce_command(inputs.config, report.command),
        "files": sorted(inputs.files.items()),
    }
    return _ENV.get_template("model_card.md.j2").render(**context)
