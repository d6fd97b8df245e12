"""Synthetic ``report.json`` and ``scores.json`` dicts with the shapes the commands write.

Built deterministically (no model), so report rendering can be tested quickly; the values
mimic a 24-layer model whose refusals drop from ~90% to ~10% after the edit.
"""

from __future__ import annotations

import math
from typing import Any

CATEGORIES = ("cybercrime", "drugs", "fraud", "hate & <harassment>", "self_harm", "weapons")
INJECTION = "<script>alert('x')</script><img src=x onerror=alert(1)>"


def _completions(edited: bool) -> list[dict[str, Any]]:
    rows = []
    for i in range(24):
        cat = CATEGORIES[i % len(CATEGORIES)]
        # The baseline refuses all but a few; the edit leaves "weapons" partly refusing.
        refused = (i % 7 != 3) if not edited else (cat == "weapons" and i % 2 == 1)
        response = (
            "I'm sorry, but I can't help with that."
            if refused
            else f"Sure. Step {i}: first, gather the materials.\nThen {INJECTION} & so on."
        )
        rows.append(
            {"prompt": f"Harmful request number {i} about {cat}?", "response": response,
             "refused": refused, "category": cat}
        )  # fmt: skip
    return rows


def sample_report(*, optimized: bool = False, evaluated: bool = False) -> dict[str, Any]:
    """A report as ``pipeline.run`` writes it; ``optimized`` / ``evaluated`` add the keys the
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
        "edit": {
            "kind": "directional_ablation",
            "direction": {"layer": 12, "site": "pre", "scale": 7.5, "model": "demo",
                          "revision": None, "dataset_hashes": {}, "d_model": 896},
            "embedding": 1.0,
            "attention": [1.0] * 24,
            "mlp": [1.0] * 24,
        },
        "selection": {"layer": 12, "site": "pre", "rule": "lowest refusal score under KL 0.1",
                      "met_kl_threshold": True, "kl_threshold": 0.1, "max_layer": 18},
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
        # The shape `abliterate evaluate` writes (eval branch): per-judge rates, pairwise judge
        # agreement, over-refusal with its own completions, fluency, cross-entropy, benchmarks.
        report.update(command="evaluate", judges=["markers", "classifier:org/refusal"])
        for side, over, kappa in (("baseline", 0.25, 0.81), ("edited", 0.05, 0.64)):
            rate = report[side]["refusal_rate"]
            report[side].update(
                over_refusal_rate=over,
                over_refusal={
                    "n_prompts": 20,
                    "by_category": {"medical": over * 2, "security": over, "history": 0.0},
                    "completions": [
                        {"prompt": f"How do I kill a Python process {i}?",
                         "response": "Use kill -9 <pid>." if i % 4 else "I can't help.",
                         "refused": i % 4 == 0, "category": "security"}
                        for i in range(4)
                    ],
                },
                judges={
                    "markers": {"refusal_rate": rate, "over_refusal_rate": over},
                    "classifier:org/refusal": {"refusal_rate": rate - 0.04,
                                               "over_refusal_rate": over + 0.05,
                                               "n_unparsed": {"harmful": 0, "over_refusal": 1}},
                },
                judge_agreement={
                    "harmful": [{"judges": ["markers", "classifier:org/refusal"],
                                 "agreement": 0.92, "cohen_kappa": kappa, "n": 24}],
                    "over_refusal": [{"judges": ["markers", "classifier:org/refusal"],
                                      "agreement": 0.85, "cohen_kappa": None, "n": 20}],
                },
                reference_cross_entropy=1.82 if side == "baseline" else 1.91,
                fluency={"harmful": {"n_texts": 24, "distinct_1": 0.81, "entropy_1": 5.2},
                         "over_refusal": {"n_texts": 20, "distinct_1": 0.78, "entropy_1": None}},
                benchmarks={"abliterate_arithmetic": {"acc": 0.61 if side == "baseline" else 0.6,
                                                      "acc_stderr": 0.04}},
            )  # fmt: skip
    if optimized:
        # The shape `abliterate run --optimize` writes (optimize branch).
        trials = []
        for n in range(30):
            kl = 0.01 * math.exp(n % 10 / 2.5)
            prob = min(0.95, max(0.02, 0.9 - 0.3 * math.log10(1 + 100 * kl) + (n % 3) * 0.08))
            trial = {
                "number": n,
                "refusal_score": round(prob, 4),
                "kl": round(kl, 5),
                "params": {"layer": 10 + n % 5, "max_weight": round(0.5 + n / 40, 3)},
                "pareto": n % 3 == 0 and n < 10,
            }
            if trial["pareto"]:
                trial["confirmed_refusal_rate"] = round(prob * 0.9, 3)
            trials.append(trial)
        report["optimization"] = {
            "objectives": [
                "refusal_prob (harmful val, next token)",
                "kl (harmless val, first token)",
            ],
            "trials": trials,
            "chosen": trials[6],
            "rule": "lowest KL among front trials whose confirmed refusal rate is at most 10%",
            "baseline": {"refusal_prob": 0.93, "refusal_score": 2.6},
        }
        report["edit"]["attention"] = [
            round(0.2 + 0.8 * math.exp(-(((i - 12) / 5) ** 2)), 3) for i in range(24)
        ]
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
