"""Wall time and peak memory of each stage of ``abliterate run`` on the demo model.

Usage::

    python benchmarks/stages.py [--repeats N] [--out benchmarks/results/stages.json]

Each repeat is a full default run (a fresh process state is not needed: the model is reloaded
by every run). The script reports, per stage, the median wall time and the largest peak RSS over
the repeats, plus the headline metrics, as JSON and as a Markdown table on stdout. Timing on
shared machines is noisy: compare medians from the same script and machine, never single runs.
Peak RSS is sampled every 50 ms within each stage (see ``abliterate.progress``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from abliterate import __version__
from abliterate.commands.run import run
from abliterate.config import RunConfig


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="Full runs to take medians over.")
    parser.add_argument("--model", default="demo", help="Model to benchmark (default: demo).")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/stages.json"), help="JSON output."
    )
    args = parser.parse_args()

    runs: list[dict[str, Any]] = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = run(RunConfig(model=args.model, out=Path(tmp) / "run", save_model=True))
            total = time.perf_counter() - start
        runs.append({"timings": report["timings"], "total_seconds": total, "report": report})
        print(f"repeat {i + 1}/{args.repeats}: {total:.0f} s")

    stages = list(runs[0]["timings"])
    table = {
        name: {
            "median_seconds": statistics.median(r["timings"][name]["seconds"] for r in runs),
            "peak_rss_mb": max(r["timings"][name]["peak_rss_mb"] for r in runs),
        }
        for name in stages
    }
    last = runs[-1]["report"]
    result = {
        "abliterate": __version__,
        "model": last["model"]["name"],
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "repeats": args.repeats,
        "stages": table,
        "total_median_seconds": statistics.median(r["total_seconds"] for r in runs),
        "metrics": {
            "baseline_refusal_rate": last["baseline"]["refusal_rate"],
            "edited_refusal_rate": last["edited"]["refusal_rate"],
            "kl_divergence": last["edited"]["kl_divergence"],
            "kl_divergence_multi_token": last["edited"]["kl_divergence_multi_token"],
            "direction": {k: last["edit"]["direction"][k] for k in ("layer", "site")},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| stage | median wall time (s) | peak RSS (MB) |\n|---|---:|---:|")
    for name, row in table.items():
        print(f"| {name} | {row['median_seconds']:.1f} | {row['peak_rss_mb']:.0f} |")
    print(f"| **total** | {result['total_median_seconds']:.1f} | |")


if __name__ == "__main__":
    main()
