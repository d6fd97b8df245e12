"""Directions from every harmful training prompt against directions from the ones the model
refuses (``--refusal-filter``), on the demo model, scored without generation.

Usage::

    flock /work/notes/heavy.lock python benchmarks/direction_filter.py \\
        [--model demo] [--candidates 14/post,15/post,14/mid,15/mid] \\
        [--out benchmarks/results/direction_filter.json]

Both variants take their directions from the built-in train split (128 + 128 prompts, as
``run`` does); the filtered one keeps the harmful prompts whose next-token refusal probability
is above one half (at least ``--min-refused``, :func:`abliterate.search.objective.
refused_prompts`). Each candidate direction is removed at full strength from every writer and
scored on the validation split and on the evaluation split (the filtered ones also at lower
``--strengths``: a purer direction may need less of its removal): the mean next-token refusal
probability on the harmful prompts and the mean first-token KL to the unedited model on the
harmless ones (real-instruction styles). One forward pass per edit and split, no generation:
the judged refusal rates of a chosen edit come from ``abliterate run``'s report. (Selection and
search never read the evaluation split; this benchmark reads it to tell whether the filter's
gain on validation carries over to held-out prompts.) About 75 s per edit on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def main() -> None:
    """Score the candidates both ways and write the table."""
    from abliterate.core.ablation import Ablation
    from abliterate.data.chat import ChatSet
    from abliterate.data.prompts import builtin
    from abliterate.measure.activations import mean_activations
    from abliterate.measure.candidates import Candidates
    from abliterate.measure.refusal import RefusalOpenings, refusal_token_ids
    from abliterate.model.loading import load_model
    from abliterate.search.objective import refusal_probabilities, refused_prompts
    from abliterate.search.scoring import ScoringSet, edit_scorer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--candidates", default="14/post,18/mid,19/post")
    parser.add_argument(
        "--strengths", default="1.0,0.85,0.7",
        help="strengths at which the filtered directions are also scored (the unfiltered ones "
        "at full strength only)",
    )  # fmt: skip
    parser.add_argument("--min-refused", type=int, default=16)
    default_out = Path("benchmarks/results/direction_filter.json")
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()

    start = time.time()
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    ids = refusal_token_ids(tok)

    def texts(kind: str, split: str, n: int | None = None) -> list[str]:
        prompts = builtin(kind, split)  # type: ignore[arg-type]
        return list(ChatSet.format(tok, prompts.head(n) if n else prompts, None).texts)

    harmful, harmless = texts("harmful", "train", 128), texts("harmless", "train", 128)
    probs = refusal_probabilities(model, tok, harmful, ids)
    kept = refused_prompts(probs, args.min_refused)
    harmless_mean = mean_activations(model, tok, harmless)
    variants = {
        "all": Candidates(mean_activations(model, tok, harmful), harmless_mean),
        "refused": Candidates(
            mean_activations(model, tok, [harmful[i] for i in kept]), harmless_mean
        ),
    }
    sets = {s: ScoringSet(texts("harmful", s), texts("harmless", s), ids, RefusalOpenings())
            for s in ("val", "eval")}  # fmt: skip
    scorers = {split: edit_scorer(model, tok, scoring) for split, scoring in sets.items()}
    result: dict[str, Any] = {
        "model": loaded.name,
        "n_harmful_train": len(harmful),
        "n_refused_used": len(kept),
        "train_refusal_probability_mean": float(probs.mean()),
        "baseline": {s: sc.baseline().summary()["refusal"] for s, sc in scorers.items()},
        "rows": [],
    }
    print(f"{len(kept)} of {len(harmful)} harmful training prompts kept", flush=True)
    for key in args.candidates.split(","):
        layer, site = key.split("/")
        plan = [("all", 1.0)] + [("refused", float(x)) for x in args.strengths.split(",")]
        for name, strength in plan:
            cands = variants[name]
            direction = cands.direction(int(layer), site)
            edit = Ablation.uniform(direction, cands.n_layers, strength)
            row: dict[str, Any] = {"candidate": key, "directions_from": name, "strength": strength}
            for split, scorer in scorers.items():
                s = scorer.score([edit], 1)[0].summary()
                row[split] = {"refusal_probability": s["refusal"], "first_token_kl": s["kl"]}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    result["seconds"] = round(time.time() - start, 1)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'candidate':10} {'from':8} {'strength':>8} {'val refusal':>11} {'val KL':>7} "
          f"{'eval refusal':>12} {'eval KL':>7}")  # fmt: skip
    for r in result["rows"]:
        v, e = r["val"], r["eval"]
        print(f"{r['candidate']:10} {r['directions_from']:8} {r['strength']:8.2f} "
              f"{v['refusal_probability']:11.3f} "
              f"{v['first_token_kl']:7.4f} {e['refusal_probability']:12.3f} "
              f"{e['first_token_kl']:7.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
