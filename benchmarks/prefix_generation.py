"""Greedy generation with the shared chat prefix run once, against plain batched generation.

On the demo model about half of each chat-formatted prompt is the template's opening and its
default system message, shared by every prompt. :func:`abliterate.model.forward.
greedy_new_tokens` runs it once and repeats its key/value cache across each batch; plain
generation (left-padded batches straight into ``model.generate``, what abliterate did before)
runs it for every prompt. The script times both on the same prompts, alternating, and reports
medians and their ratio, after checking that both give the same tokens::

    flock /work/notes/heavy.lock python benchmarks/prefix_generation.py --repeats 3

Results: ``benchmarks/results/prefix_generation.{json,md}``. Timing on a shared machine is
noisy: compare the medians of one run of this script, never single timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from abliterate.data.chat import ChatSet, batches
from abliterate.data.prompts import builtin
from abliterate.model.forward import greedy_new_tokens, shared_prefix_length
from abliterate.model.loading import load_model


@torch.inference_mode()
def plain_generation(model: Any, tok: Any, texts: list[str], n: int, batch: int) -> list[list[int]]:
    """Left-padded batches through ``model.generate``: every prompt runs the prefix itself."""
    out: list[list[int]] = [[] for _ in texts]
    for idx, enc in batches(tok, texts, batch):
        tokens = model.generate(
            **enc,
            max_new_tokens=n,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
        )
        for i, row in zip(idx, tokens[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
            out[i] = row
    return out  # fmt: skip


def main() -> None:
    """Time both ways of generating and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="a model name or path (tiny ones for a "
                        "smoke test)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="run's default")
    parser.add_argument("--set", default="harmful", choices=["harmful", "harmless"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prefix_generation"))
    args = parser.parse_args()

    loaded = load_model(args.model, device="cpu", dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    texts = list(ChatSet.format(tok, builtin(args.set, "eval")).texts)  # type: ignore[arg-type]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    prefix = shared_prefix_length(ids)
    times: dict[str, list[float]] = {"plain": [], "shared prefix": []}
    outputs: dict[str, list[list[int]]] = {}
    for repeat in range(args.repeats):
        # Alternate the order, so a load change during the run hits both alike.
        order = ["plain", "shared prefix"] if repeat % 2 == 0 else ["shared prefix", "plain"]
        for name in order:
            start = time.perf_counter()
            if name == "plain":
                got = plain_generation(model, tok, texts, args.max_new_tokens, args.batch_size)
            else:
                got = greedy_new_tokens(model, tok, texts, max_new_tokens=args.max_new_tokens,
                                        batch_size=args.batch_size)  # fmt: skip
            times[name].append(time.perf_counter() - start)
            outputs[name] = got
            print(f"repeat {repeat}: {name} {times[name][-1]:.1f} s", flush=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": loaded.name,
        "prompts": f"builtin:{args.set}:eval",
        "n_prompts": len(texts),
        "mean_prompt_tokens": sum(map(len, ids)) / len(ids),
        "shared_prefix_tokens": prefix,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seconds": times,
        "median_seconds": medians,
        "speedup": medians["plain"] / medians["shared prefix"],
        "identical_tokens": outputs["plain"] == outputs["shared prefix"],
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = (
        f"Greedy generation on {loaded.name} (float32, CPU, {result['torch_threads']} threads): "
        f"{len(texts)} prompts of `builtin:{args.set}:eval` "
        f"(mean {result['mean_prompt_tokens']:.0f} tokens, {prefix} of them shared), "
        f"{args.max_new_tokens} new tokens, batches of "
        f"{args.batch_size}; medians of {args.repeats} alternating repeats.\n\n"
        "| generation | median wall time | speed-up |\n|---|---:|---:|\n"
        f"| plain (left-padded batches) | {medians['plain']:.1f} s | 1.00x |\n"
        f"| shared prefix run once | {medians['shared prefix']:.1f} s | "
        f"{result['speedup']:.2f}x |\n\n"
        f"Same tokens: {'yes' if result['identical_tokens'] else 'NO'}.\n"
    )
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
