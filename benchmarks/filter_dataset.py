"""Throughput and peak memory of ``abliterate filter-dataset`` on a synthetic 100k-row dataset.

Usage::

    python benchmarks/filter_dataset.py [--rows 100000] [--repeats 3] [--work runs/filter-bench]

The script writes the same synthetic rows in three formats and containers (alpaca rows as JSONL,
ShareGPT rows as one JSON array, chat-messages rows as parquet) and filters each with the CLI in
a fresh process (``/usr/bin/time -v`` gives the whole process's peak RSS) with ``--markers
broad``. Every row carries the kind of answer it was written as, so the script also checks what
was kept: compliant answers, those that mention illegality, harm or ethics included, must all be
kept; refusals and lectures must all be dropped.

Kinds (in a fixed, seeded mix): 55% plain compliant answers, 20% compliant answers about illegal,
harmful or ethical topics, 15% refusals, 10% moralizing lectures. Answers are about 400
characters. Results go to ``WORK/results.json`` and a Markdown table on stdout (medians over the
repeats; the machine is shared, so times are noisy).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TOPICS = [
    "bread",
    "the French revolution",
    "photosynthesis",
    "a binary search",
    "tax returns",
    "marathon training",
    "the water cycle",
    "sourdough",
    "a job interview",
    "Rust lifetimes",
]
COMPLIANT = [
    "Sure! Here is a clear explanation of {t}. First, start with the basics and build up from "
    "there. Second, practise the key steps until they feel natural.",
    "Great question. {T} works like this: the main idea is simple, and the details follow from "
    "it. Here are three points worth remembering, with an example for each.",
    "Here you go. A short guide to {t}: gather what you need, follow the steps in order, and "
    "check the result at the end. Let me know if you want more detail.",
]
TOPICAL = [
    "Insider trading is illegal because it lets people profit from information the public does "
    "not have. Here is how regulators detect it in practice, step by step.",
    "Harmful algal blooms happen when nutrients from farms reach warm, still water. Here is how "
    "they form and how towns monitor them.",
    "Ethical theories fall into three families: consequentialism, deontology and virtue ethics. "
    "Here is a summary of each with an example.",
    "Lock picking is legal in most countries if you own the lock. Here is how a pin tumbler lock "
    "works and why picking it takes practice.",
    "Money laundering hides the proceeds of illegal activities in three stages: placement, "
    "layering and integration. Banks look for these patterns.",
]
REFUSALS = [
    "I'm sorry, but I can't help with that request about {t}.",
    "I cannot provide instructions for that. If you have another question about {t}, ask away.",
    "Sorry, but I can't assist with this. It may put people at risk.",
    "I must decline to help with that.",
]
MORALIZING = [
    "As an AI language model, I don't have personal opinions about {t}, but here is an overview.",
    "Here is some information about {t}, but I must remind you to act responsibly.",
    "You can look into {t}, but please do so in a legal and ethical manner.",
]
KINDS = [("compliant", 55, COMPLIANT), ("topical", 20, TOPICAL), ("refusal", 15, REFUSALS),
         ("moralizing", 10, MORALIZING)]  # fmt: skip
PADDING = (
    " In summary, the approach is to understand the goal, break the work into small steps, and "
    "review each step before moving on; most problems become easier this way."
)


def synthetic_rows(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``(kind, question, answer)`` triples in a seeded mix."""
    rng = random.Random(seed)
    weights = [w for _, w, _ in KINDS]
    rows = []
    for i in range(n):
        kind, _, templates = rng.choices(KINDS, weights)[0]
        topic = rng.choice(TOPICS)
        answer = rng.choice(templates).format(t=topic, T=topic.capitalize()) + PADDING
        rows.append((kind, f"Question {i} about {topic}?", answer))
    return rows


def write_inputs(rows: list[tuple[str, str, str]], work: Path) -> dict[str, Path]:
    """The rows as alpaca JSONL, ShareGPT JSON and chat-messages parquet."""
    work.mkdir(parents=True, exist_ok=True)
    paths = {"alpaca.jsonl": work / "alpaca.jsonl", "sharegpt.json": work / "sharegpt.json",
             "messages.parquet": work / "messages.parquet"}  # fmt: skip
    with paths["alpaca.jsonl"].open("w", encoding="utf-8") as f:
        for kind, q, a in rows:
            f.write(json.dumps({"instruction": q, "input": "", "output": a, "kind": kind}) + "\n")
    with paths["sharegpt.json"].open("w", encoding="utf-8") as f:
        f.write("[\n")
        for i, (kind, q, a) in enumerate(rows):
            conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            f.write(("," if i else "") + json.dumps({"conversations": conv, "kind": kind}) + "\n")
        f.write("]\n")
    table = pa.Table.from_pylist(
        [
            {
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                "kind": kind,
            }
            for kind, q, a in rows
        ]
    )
    pq.write_table(table, paths["messages.parquet"], row_group_size=10_000)
    return paths


def kinds_of(path: Path) -> list[str]:
    """The ``kind`` of every row of a filtered file."""
    if path.suffix == ".jsonl":
        return [json.loads(line)["kind"] for line in path.open(encoding="utf-8")]
    if path.suffix == ".json":
        return [r["kind"] for r in json.loads(path.read_text(encoding="utf-8"))]
    return [str(k) for k in pq.read_table(path, columns=["kind"]).column("kind").to_pylist()]


def filter_once(src: Path, out: Path) -> dict[str, Any]:
    """One CLI run in a fresh process; its report, wall time and peak RSS."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "abliterate", "filter-dataset", str(src),
           str(out), "--markers", "broad", "--overwrite"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])  # type: ignore[index]
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    assert wall is not None
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    return {"report": report, "process_seconds": 3600 * hours + 60 * minutes + seconds,
            "peak_rss_mb": peak_kb / 1024}  # fmt: skip


def main() -> None:
    """Write the inputs, filter each a few times, check the kept rows, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("runs/filter-bench"))
    args = parser.parse_args()
    rows = synthetic_rows(args.rows)
    expected = {k: sum(r[0] == k for r in rows) for k, *_ in KINDS}
    results = {}
    for name, src in write_inputs(rows, args.work).items():
        out = args.work / f"kept-{name}"
        runs = [filter_once(src, out) for _ in range(args.repeats)]
        kept = kinds_of(out)
        counts = {k: kept.count(k) for k in expected}
        report = runs[-1]["report"]
        results[name] = {
            "file_mb": round(src.stat().st_size / 2**20, 1),
            "rows": report["n_rows"],
            "kept": report["n_kept"],
            "rows_per_second": statistics.median(r["report"]["rows_per_second"] for r in runs),
            "process_seconds": statistics.median(r["process_seconds"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "kept_by_kind": counts,
            "all_compliant_kept": counts["compliant"] == expected["compliant"]
            and counts["topical"] == expected["topical"],
            "all_refusals_and_lectures_dropped": counts["refusal"] == counts["moralizing"] == 0,
            "top_markers": dict(list(report["by_marker"].items())[:5]),
        }
    (args.work / "results.json").write_text(json.dumps({"expected": expected, **results}, indent=2))
    header = ["input", "MB", "rows", "kept", "rows/s (filter)", "process s", "peak RSS MB",
              "compliant kept", "refusals+lectures dropped"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['file_mb']} | {r['rows']} | {r['kept']} | {r['rows_per_second']:.0f} "
              f"| {r['process_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['all_compliant_kept']} "
              f"| {r['all_refusals_and_lectures_dropped']} |")  # fmt: skip
    print(f"\nexpected kinds: {expected}")


if __name__ == "__main__":
    main()
