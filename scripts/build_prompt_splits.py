"""Assign deterministic train/val/eval splits to the built-in contrastive prompt sets.

The refusal-direction pipeline (Arditi et al. 2024) needs two contrastive instruction sets,
``harmful.jsonl`` and ``harmless.jsonl``, stored in ``src/abliterate/prompt_data/``. Each line
is a JSON object ``{"prompt": ..., "category": ..., "split": ...}``.

This script reads both files, ignores any ``split`` field already present, and assigns a new
split stratified by category:

* prompts are grouped by category and sorted by text, so the result depends only on the set
  of prompts and not on the order of the lines in the file;
* each category is shuffled with one ``random.Random(1234)`` generator (categories are
  processed in sorted order);
* the first 20% (rounded half up) of each shuffled category go to ``eval``, the next 20% to
  ``val`` and the rest to ``train``.

The files are written back ordered by split (train, val, eval), then by category, then in the
shuffled order, so running the script twice produces byte-identical files.

Before writing, the script validates the data and exits with status 1 if any prompt is empty,
has leading or trailing whitespace, is not a string, lacks a category, or duplicates another
prompt in harmful.jsonl, harmless.jsonl or over_refusal.jsonl (compared case- and
punctuation-insensitively). ``over_refusal.jsonl`` is read for that check only and is never
rewritten.

Usage::

    python scripts/build_prompt_splits.py            # assign splits and rewrite the files
    python scripts/build_prompt_splits.py --check    # fail if the files are not up to date
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

SEED = 1234
EVAL_FRACTION = 0.2
VAL_FRACTION = 0.2
SPLITS: tuple[str, ...] = ("train", "val", "eval")
SPLIT_FILES: tuple[str, ...] = ("harmful.jsonl", "harmless.jsonl")
CHECK_ONLY_FILES: tuple[str, ...] = ("over_refusal.jsonl",)
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "src" / "abliterate" / "prompt_data"

Record = dict[str, str]


class DataError(Exception):
    """Raised when a prompt file is malformed or contains duplicates."""


def normalize(text: str) -> str:
    """Lower-case ``text`` and drop punctuation so near-identical prompts compare equal."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return " ".join(words)


def round_half_up(value: float) -> int:
    """Round a non-negative number to the nearest integer, with halves rounded up."""
    return int(value + 0.5)


def read_records(path: Path) -> list[Record]:
    """Read a JSONL prompt file and validate the ``prompt`` and ``category`` fields."""
    records: list[Record] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                raise DataError(f"{path.name}:{lineno}: blank line")
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise DataError(f"{path.name}:{lineno}: expected a JSON object")
            prompt = obj.get("prompt")
            category = obj.get("category")
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"{path.name}:{lineno}: empty or missing prompt")
            if prompt != prompt.strip():
                raise DataError(f"{path.name}:{lineno}: prompt has surrounding whitespace")
            if not isinstance(category, str) or not category.strip():
                raise DataError(f"{path.name}:{lineno}: empty or missing category")
            records.append({"prompt": prompt, "category": category})
    if not records:
        raise DataError(f"{path.name}: no prompts")
    return records


def check_duplicates(files: dict[str, list[Record]]) -> None:
    """Raise ``DataError`` if two prompts, in one file or across files, normalize equally."""
    seen: dict[str, str] = {}
    problems: list[str] = []
    for name, records in files.items():
        for record in records:
            key = normalize(record["prompt"])
            if not key:
                problems.append(f"{name}: prompt without letters or digits: {record['prompt']!r}")
            elif key in seen:
                problems.append(f"duplicate: {name}: {record['prompt']!r} (first in {seen[key]})")
            else:
                seen[key] = name
    if problems:
        raise DataError("\n".join(problems))


def assign_splits(records: list[Record], seed: int = SEED) -> list[Record]:
    """Return the records with a stratified ``split`` field, in the stable output order."""
    by_category: dict[str, list[str]] = defaultdict(list)
    for record in records:
        by_category[record["category"]].append(record["prompt"])

    rng = random.Random(seed)
    buckets: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    for category in sorted(by_category):
        prompts = sorted(by_category[category])
        rng.shuffle(prompts)
        n_eval = round_half_up(len(prompts) * EVAL_FRACTION)
        n_val = round_half_up(len(prompts) * VAL_FRACTION)
        buckets["eval"][category] = prompts[:n_eval]
        buckets["val"][category] = prompts[n_eval : n_eval + n_val]
        buckets["train"][category] = prompts[n_eval + n_val :]

    ordered: list[Record] = []
    for split in SPLITS:
        for category in sorted(buckets[split]):
            for prompt in buckets[split][category]:
                ordered.append({"prompt": prompt, "category": category, "split": split})
    return ordered


def render(records: list[Record]) -> str:
    """Serialize records as JSONL: one object per line and a single final newline."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def print_counts(name: str, records: list[Record]) -> None:
    """Print the number of prompts per split and category."""
    counts = Counter((record["split"], record["category"]) for record in records)
    categories = sorted({record["category"] for record in records})
    width = max(len(category) for category in categories)
    print(f"{name}: {len(records)} prompts")
    print(f"  {'category':<{width}}  " + "  ".join(f"{split:>5}" for split in SPLITS))
    for category in categories:
        row = "  ".join(f"{counts[(split, category)]:>5}" for split in SPLITS)
        print(f"  {category:<{width}}  {row}")
    totals = "  ".join(
        f"{sum(counts[(split, category)] for category in categories):>5}" for split in SPLITS
    )
    print(f"  {'total':<{width}}  {totals}")


def main(argv: list[str] | None = None) -> int:
    """Validate the prompt files, assign splits and write them back (or check them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="directory holding harmful.jsonl and harmless.jsonl (default: %(default)s)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit with status 1 if any file would change",
    )
    args = parser.parse_args(argv)
    data_dir: Path = args.data_dir

    try:
        files = {name: read_records(data_dir / name) for name in SPLIT_FILES}
        extra = {
            name: read_records(data_dir / name)
            for name in CHECK_ONLY_FILES
            if (data_dir / name).exists()
        }
        check_duplicates({**files, **extra})
    except (DataError, json.JSONDecodeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    stale: list[str] = []
    for name, records in files.items():
        ordered = assign_splits(records)
        text = render(ordered)
        path = data_dir / name
        if path.read_text(encoding="utf-8") != text:
            stale.append(name)
            if not args.check:
                with path.open("w", encoding="utf-8", newline="\n") as handle:
                    handle.write(text)
        print_counts(name, ordered)

    if args.check and stale:
        print(f"error: out of date: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
