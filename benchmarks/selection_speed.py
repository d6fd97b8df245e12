"""Wall time of selection's screening: one candidate per forward pass against several, and
successive halving, on the same model, candidates and validation prompts.

Usage::

    python benchmarks/selection_speed.py [--model demo] [--repeats 3]
        [--out benchmarks/results/selection_speed.json]

Every variant runs :func:`abliterate.search.selection.select_direction` with the default
(next-token) objective and no refinement; the first is the baseline (``--edits-per-pass 1``).
The script reports the median wall time of each, its ratio to the baseline's, the chosen
candidate, and the largest difference of whole-split (finalist) scores against the baseline's
(batched scoring must give the same scores). Timing on shared machines is noisy: compare
medians from one run of the script, never single runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

VARIANTS: dict[str, dict[str, Any]] = {
    "one per pass (baseline)": {"edits_per_pass": 1},
    "4 per pass (default)": {"edits_per_pass": 4},
    "8 per pass": {"edits_per_pass": 8},
    "4 per pass, halving from 4 prompts": {
        "edits_per_pass": 4,
        "screen_halving": True,
        "n_screen": 4,
    },
}


def main() -> None:
    """Run the variants and print the table."""
    from abliterate.config import RunConfig
    from abliterate.data.chat import ChatSet
    from abliterate.data.prompts import builtin
    from abliterate.measure.activations import mean_activations
    from abliterate.measure.candidates import Candidates
    from abliterate.measure.refusal import RefusalOpenings, refusal_token_ids
    from abliterate.model.loading import load_model
    from abliterate.search.selection import select_direction

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/selection_speed.json"))
    args = parser.parse_args()

    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    sets = {(k, s): ChatSet.format(tok, builtin(k, s).head(128 if s == "train" else 32))
            for k in ("harmful", "harmless") for s in ("train", "val")}  # fmt: skip
    candidates = Candidates(
        harmful_mean=mean_activations(model, tok, sets["harmful", "train"].texts),
        harmless_mean=mean_activations(model, tok, sets["harmless", "train"].texts),
    )
    rows: dict[str, dict[str, Any]] = {}
    for name, options in VARIANTS.items():
        seconds, selection = [], None
        for _ in range(args.repeats):
            started = time.perf_counter()
            selection = select_direction(
                model, tok, candidates, sets["harmful", "val"].texts,
                sets["harmless", "val"].texts, refusal_token_ids(tok), RefusalOpenings(),
                RunConfig(**options),
            )  # fmt: skip
            seconds.append(time.perf_counter() - started)
        assert selection is not None
        rows[name] = {"seconds": statistics.median(seconds), "all_seconds": seconds,
                      "chosen": f"{selection.layer}/{selection.site}",
                      "scores": {s.key: (s.screen_refusal, s.screen_kl, s.refusal, s.kl)
                                 for s in selection.scores}}  # fmt: skip
    base = rows["one per pass (baseline)"]
    lines = ["| variant | median s | vs. baseline | chosen | max |Δ score| vs. baseline |",
             "|---|---:|---:|---|---:|"]  # fmt: skip
    for name, row in rows.items():
        # Screening scores of different rounds are on different prompts: compare the scores
        # on the whole validation split (finalists of both).
        diffs = [abs(a - b) for k, v in row["scores"].items() if k in base["scores"]
                 for a, b in zip(v[2:], base["scores"][k][2:], strict=True)
                 if a is not None and b is not None]  # fmt: skip
        row["max_score_difference"] = max(diffs, default=0.0)
        lines.append(f"| {name} | {row['seconds']:.1f} | {row['seconds'] / base['seconds']:.2f}x "
                     f"| {row['chosen']} | {row['max_score_difference']:.2g} |")  # fmt: skip
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "variants": rows}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
