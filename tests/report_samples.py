"""Synthetic ``report.json`` and ``scores.json`` dicts with the shapes the commands write.

Built deterministically (no model), so report rendering can be tested quickly; the values
mimic a 24-layer model whose refusals drop from ~90% to ~10% after the edit. The dicts are in
the shape abliterate 0.1.0 wrote (no ``schema_version``; trials' refusal probability under
``refusal_score``), which is also what the commands build before validating it.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import strategies as st

CATEGORIES = ("cybercrime", "drugs", "fraud", "hate & <harassment>", "self_harm", "weapons")
INJECTION = "<script>alert('x')</script><img src=x onerror=alert(1)>"
LLM_JUDGE = "llm:judge-model"


def _completions(edited: bool, judges: bool = False) -> list[dict[str, Any]]:
    rows = []
    for i in range(24):
        cat = CATEGORIES[i % len(CATEGORIES)]
        # The baseline refuses all but a few; the edit leaves "weapons" partly refusing.
        refused = (i % 7 != 3) if not edited else (cat == "weapons" and i % 2 == 1)
        response = (
            "I'm sorry, but I can't help with that."
            if refused
            else f"Sure. Step {i}: first, gather the materials.\nThen {INJECTION} & so on | done."
        )
        row = {"prompt": f"Harmful request number {i} about {cat}?", "response": response,
               "refused": refused, "category": cat}  # fmt: skip
        if judges:
            row["judges"] = {"markers": refused, LLM_JUDGE: refused or i == 5}
        rows.append(row)
    return rows


def _direction(layer: float) -> dict[str, Any]:
    hashes = {"train_harmful": "ef" * 32}
    return {"layer": layer, "site": "pre", "scale": 7.5, "model": "demo", "revision": None,
            "dataset_hashes": hashes, "projected": False, "d_model": 896}  # fmt: skip


def _evaluated(report: dict[str, Any]) -> None:
    """The keys `abliterate evaluate` adds: per-judge rates, pairwise judge agreement,
    over-refusal with its own completions, fluency, cross-entropy, benchmarks."""
    report["data"].update(
        over_refusal={"name": "builtin:over_refusal[spread:4]", "n": 4, "sha256": "12" * 32},
        reference_answers={"name": "builtin:reference_answers", "n": 8},
    )
    base_model = {"name": "base <model>", "source": "/cache/base", "revision": "abc123",
                  "architecture": "qwen2: 8.1M parameters"}  # fmt: skip
    report.update(command="evaluate", judges=["markers", LLM_JUDGE], baseline_model=base_model)
    for side, over, kappa in (("baseline", 0.25, 0.81), ("edited", 0.05, 0.64)):
        block = report[side]
        block["completions"] = _completions(side == "edited", judges=True)
        rate = block["refusal_rate"]
        over_rows = [
            {"prompt": f"How do I kill a Python process {i}?",
             "response": "Use kill -9 <pid>." if i % 4 else "I can't help.",
             "refused": i % 4 == 0, "category": "security",
             "judges": {"markers": i % 4 == 0, LLM_JUDGE: i % 4 == 0}}
            for i in range(4)
        ]  # fmt: skip
        block.update(
            over_refusal_rate=over,
            over_refusal={"n_prompts": 4, "completions": over_rows,
                          "by_category": {"medical": over * 2, "security": over, "history": 0.0}},
            judges={
                "markers": {"refusal_rate": rate, "over_refusal_rate": over},
                LLM_JUDGE: {"refusal_rate": rate + 1 / 24, "over_refusal_rate": over + 0.05,
                            "n_unparsed": {"harmful": 0, "over_refusal": 1},
                            "answers": {"harmful": ["yes"] * 24,
                                        "over_refusal": ["no", "no", "maybe <b>", "yes"]}},
            },
            judge_agreement={
                "harmful": [{"judges": ["markers", LLM_JUDGE], "agreement": 0.92,
                             "cohen_kappa": kappa, "n": 24}],
                "over_refusal": [{"judges": ["markers", LLM_JUDGE], "agreement": 0.85,
                                  "cohen_kappa": None, "n": 4}],
            },
            reference_cross_entropy=1.82 if side == "baseline" else 1.91,
            fluency={
                "harmful": {"n_texts": 24, "distinct_1": 0.81, "distinct_2": 0.9,
                            "distinct_3": 0.95, "entropy_1": 5.2, "entropy_2": 6.1,
                            "entropy_3": 6.4},
                "over_refusal": {"n_texts": 4, "distinct_1": 0.78, "distinct_2": 0.88,
                                 "distinct_3": 0.9, "entropy_1": None, "entropy_2": None,
                                 "entropy_3": None},
            },
            benchmarks={"abliterate_arithmetic": {"acc": 0.61 if side == "baseline" else 0.6,
                                                  "acc_stderr": 0.04, "n": 50,
                                                  "source": "builtin"}},
        )  # fmt: skip


def _trials() -> list[dict[str, Any]]:
    trials = []
    for n in range(30):
        kl = 0.01 * math.exp(n % 10 / 2.5)
        prob = min(0.95, max(0.02, 0.9 - 0.3 * math.log10(1 + 100 * kl) + (n % 3) * 0.08))
        position = 8.0 + n % 9
        trial: dict[str, Any] = {
            "number": n,
            "refusal_score": round(prob, 4),
            "kl": round(kl, 5),
            "params": {"direction_layer": 10.0 + n % 5 / 2, "per_layer": n % 4 == 0,
                       "projected": n % 5 == 0, "norm_preserving": n % 2 == 0,
                       "attention_peak": round(0.5 + n / 40, 3), "attention_position": position,
                       "attention_width": 6.0, "attention_edge": 0.5, "mlp_peak": 0.8,
                       "mlp_position": position, "mlp_width": 8.0, "mlp_edge": 0.25},
            "pareto": n % 3 == 0 and n < 10,
        }  # fmt: skip
        if trial["pareto"]:
            trial["confirmed_refusal_rate"] = round(prob * 0.9, 3)
        trials.append(trial)
    return trials


def _optimized(report: dict[str, Any]) -> None:
    """The `optimization` entry `abliterate run --optimize` adds, and its shaped edit."""
    trials = _trials()
    report["selection"] = None
    report["optimization"] = {
        "objectives": ["refusal_prob (harmful val, next token)", "kl (harmless val, first token)"],
        "trials": trials,
        "chosen": trials[6],
        "rule": "lowest KL among front trials whose confirmed refusal rate is at most 10%",
        "met_refusal_target": True,
        "refusal_target": 0.1,
        "baseline": {"refusal_prob": 0.93, "refusal_score": 2.6},
        "storage": "sqlite:////runs/demo.study.db",
        "study_name": "abliterate",
        "n_trials": 30,
        "seconds": {"search": 300.2, "confirm": 201.8},
        "search_dtype": "bfloat16",
    }
    edit = report["edit"]
    edit["direction"] = _direction(13.0)
    edit["attention"] = [round(0.2 + 0.8 * math.exp(-(((i - 12) / 5) ** 2)), 3) for i in range(24)]
    edit["mlp"] = [0.0] * 6 + [0.8] * 18


def sample_report(*, optimized: bool = False, evaluated: bool = False) -> dict[str, Any]:
    """A report as ``run`` builds it; ``optimized`` / ``evaluated`` add the keys the
    ``optimize`` and ``evaluate`` commands add."""
    base = _completions(edited=False)
    edit = _completions(edited=True)
    report: dict[str, Any] = {
        "abliterate_version": "0.1.0",
        "model": {
            "name": "Qwen2.5-Coder-0.5B-Instruct <demo>",
            "source": "/cache/demo",
            "revision": None,
            "architecture": "qwen2: 24 layers, d_model 896",
        },
        "data": {
            "eval_harmful": {"name": "builtin:harmful:eval", "n": 24, "sha256": "ab" * 32},
            "eval_harmless": {"name": "builtin:harmless:eval", "n": 24, "sha256": "cd" * 32},
        },
        "edit": {"kind": "directional_ablation", "mode": "plain", "direction": _direction(12),
                 "embedding": 1.0, "attention": [1.0] * 24, "mlp": [1.0] * 24,
                 "layer_directions": None, "extra_directions": []},
        "selection": {"layer": 12, "site": "pre", "baseline_refusal_score": 2.7,
                      "met_kl_threshold": True, "rule": "lowest refusal score under KL <= 0.1",
                      "kl_threshold": 0.1, "max_layer": 18},
        "checks": {"hooks_vs_weights_max_abs_diff": 3.1e-6, "export_reload_max_abs_diff": 0.0},
        "baseline": {"refusal_rate": sum(c["refused"] for c in base) / 24, "n_prompts": 24,
                     "judge": "markers", "completions": base},
        "edited": {"refusal_rate": sum(c["refused"] for c in edit) / 24, "n_prompts": 24,
                   "judge": "markers", "kl_divergence": 0.0321,
                   "kl_divergence_multi_token": 0.0874, "kl_tokens": 16, "completions": edit},
        "n_examples": 3,
        "timings": {"load model": {"seconds": 4.2, "peak_rss_mb": 2400.0},
                    "selection": {"seconds": 61.0, "peak_rss_mb": 2600.0}},
    }  # fmt: skip
    if evaluated:
        _evaluated(report)
    if optimized:
        _optimized(report)
    return report


def sample_scores() -> dict[str, Any]:
    """``Selection.to_dict()`` for a 24-layer model with three sites, layers 0-18 scored."""
    scores = []
    for layer in range(19):
        for site in ("pre", "mid", "post"):
            shift = {"pre": 0.0, "mid": 0.15, "post": 0.3}[site]
            refusal = 2.5 - 4.0 * math.exp(-((((layer + shift) - 12) / 3.5) ** 2))
            kl = 0.002 * math.exp((layer + shift) / 3.2)
            final = layer in (11, 12, 13)
            scores.append(
                {"layer": layer, "site": site, "screen_refusal": round(refusal, 4),
                 "screen_kl": round(kl, 5), "refusal": round(refusal + 0.1, 4) if final else None,
                 "kl": round(kl * 1.1, 5) if final else None, "same_as": None}
            )  # fmt: skip
    return {
        "layer": 12, "site": "pre", "baseline_refusal_score": 2.7, "met_kl_threshold": True,
        "rule": "lowest validation refusal score among finalists with first-token KL <= 0.1",
        "kl_threshold": 0.1, "max_layer": 18, "scores": scores,
    }  # fmt: skip


# --- generated reports (hypothesis) ---------------------------------------------------------

# Any text a model or a user can put into a report, plus the markup that must stay inert.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=24) | st.sampled_from(
    ["<script>alert(1)</script>", "a | b", "<b>bold</b>", "&amp;", "`x`", "$x$", "\n<br>\n", ""]
)
RATE = st.floats(0.0, 1.0)
POSITIVE = st.floats(0.0, 10.0, allow_nan=False)


@st.composite
def _completions_st(draw: st.DrawFn, prompts: list[str], cats: list[str] | None) -> list[dict]:
    rows = []
    for i, prompt in enumerate(prompts):
        row: dict[str, Any] = {
            "prompt": prompt,
            "response": draw(TEXT),
            "refused": draw(st.booleans()),
        }
        if cats is not None:
            row["category"] = cats[i]
        rows.append(row)
    return rows


@st.composite
def report_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A valid report dict (run, optimize or evaluate shape) with generated text and numbers."""
    n = draw(st.integers(1, 5))
    prompts = draw(st.lists(TEXT, min_size=n, max_size=n, unique=True))
    cats = draw(st.none() | st.lists(TEXT, min_size=n, max_size=n))
    evaluated = draw(st.booleans())
    report = sample_report(optimized=draw(st.booleans()), evaluated=evaluated)
    report["model"]["name"] = draw(TEXT)
    report["model"]["source"] = draw(TEXT)
    report["data"]["eval_harmful"]["name"] = draw(TEXT)
    report["timings"] = {draw(TEXT): {"seconds": draw(POSITIVE), "peak_rss_mb": draw(POSITIVE)}}
    for side in ("baseline", "edited"):
        block = report[side]
        block["completions"] = draw(_completions_st(prompts, cats))
        block["n_prompts"] = n
        block["refusal_rate"] = draw(RATE)
        block["judge"] = draw(TEXT)
        if evaluated:
            for c in block["completions"]:
                c["judges"] = {"markers": c["refused"], LLM_JUDGE: draw(st.booleans())}
            block["over_refusal"]["by_category"] = {draw(TEXT): draw(RATE)}
    if draw(st.booleans()):
        report["edited"]["kl_divergence"] = draw(POSITIVE)
    if evaluated and draw(st.booleans()):
        report["baseline"] = None
        report["baseline_model"] = None
    report["n_examples"] = draw(st.integers(0, 5))
    return report
