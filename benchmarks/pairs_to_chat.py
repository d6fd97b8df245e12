"""Turn ``heal``'s preference pairs into a chat dataset with both answers of every pair.

Usage::

    python benchmarks/pairs_to_chat.py runs/demo-healed/preferences.jsonl runs/demo-chat.jsonl

Each pair becomes two ``{"messages": [...], "kind": ...}`` rows: the prompt with the chosen
answer and the prompt with the rejected one. For pairs built from an abliteration run that is a
small instruction dataset in which the original model's refusals of harmful prompts sit beside
compliant answers: the input the README's ``filter-dataset`` → ``sft`` demonstration uses (the
filter drops the refusals, and fine-tuning the original on the rest teaches it to comply).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    """Convert the file named by the first argument into the second."""
    src, dest = Path(sys.argv[1]), Path(sys.argv[2])
    rows = []
    for line in src.read_text(encoding="utf-8").splitlines():
        pair = json.loads(line)
        prompt = [m for m in pair["prompt"] if m["role"] != "system"]
        for side in ("chosen", "rejected"):
            rows.append({"messages": prompt + pair[side], "kind": f"{pair['kind']}/{side}"})
    dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    print(f"{len(rows)} rows written to {dest}")


if __name__ == "__main__":
    main()
