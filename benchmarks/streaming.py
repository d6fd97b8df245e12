"""Peak memory and wall time of streaming: ``abliterate apply`` and layer-streamed measurement,
against the in-memory path, on the demo model and on a synthetic checkpoint of several GB.

Usage (a heavy job: hold the shared lock)::

    flock /work/notes/heavy.lock python benchmarks/streaming.py [--synthetic-gb 7] [--work DIR]

Each phase runs in a fresh Python process, so its peak resident memory (the process's own
high-water mark, ``ru_maxrss``) is its own. Phases:

* demo, measurement: activation means of 32 + 32 training prompts at every layer and site, then
  selection's scores of every candidate (8 + 8 screening prompts, 4 finalists) — with the model
  loaded, and layer-streamed from its checkpoint; the two are compared (means, scores, choice).
* demo, weight edit: the direction chosen in memory applied in memory (load, bake, save) and by
  streaming ``abliterate apply``; the two written models' logits are compared.
* demo, generation: 16 greedy tokens for 8 prompts with the model loaded, with accelerate's
  disk offload keeping 1 GiB of the 2.5 GB model in memory (how ``run --stream`` evaluates), and
  layer-streamed (how ``optimize --stream`` confirms trials).
* synthetic: a Llama-layout float32 checkpoint of ``--synthetic-gb`` GB (random weights written
  shard by shard, the demo's tokenizer), measured layer-streamed (directions and selection
  scores), edited by streaming ``apply``, and checked: the edited checkpoint's logits against
  the source under the edit's hooks (both layer-streamed). Deleted afterwards.

Results go to ``benchmarks/results/streaming.json`` and ``.md``. Timing on a shared machine is
noisy: compare phases of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic checkpoint writer of the test suite

N_TRAIN, N_VAL, N_SCREEN, N_FINALISTS = 32, 8, 8, 4
SYNTHETIC_N_TRAIN, SYNTHETIC_N_VAL = 16, 4


def _prompts(n_train: int, n_val: int) -> dict[str, list[str]]:
    from abliterate.data.prompts import builtin

    return {
        "train_harmful": list(builtin("harmful", "train").head(n_train).prompts),
        "train_harmless": list(builtin("harmless", "train").head(n_train).prompts),
        "val_harmful": list(builtin("harmful", "val").head(n_val).prompts),
        "val_harmless": list(builtin("harmless", "val").head(n_val).prompts),
    }


def _measure(model: Any, tokenizer: Any, work: Path, *, n_train: int, n_val: int,
             config: Any) -> dict[str, Any]:  # fmt: skip
    """Candidates and selection on ``model`` (loaded or layer-streamed); saves both."""
    from abliterate.data.chat import format_chat
    from abliterate.measure.activations import collect_activations
    from abliterate.measure.candidates import Candidates
    from abliterate.measure.refusal import refusal_token_ids
    from abliterate.measure.streamed import collect_activations_streamed
    from abliterate.model.layerwise import LayerwiseModel
    from abliterate.progress import Stages
    from abliterate.search.selection import select_direction

    streamed = isinstance(model, LayerwiseModel)
    collect = collect_activations_streamed if streamed else collect_activations
    chats = {k: format_chat(tokenizer, v) for k, v in _prompts(n_train, n_val).items()}
    stages = Stages()
    with stages.stage("activations"):
        means = {
            k: collect(model, tokenizer, chats[k], sites=config.sites,
                       batch_size=config.batch_size)[0]  # type: ignore[operator]
            for k in ("train_harmful", "train_harmless")
        }  # fmt: skip
    candidates = Candidates(means["train_harmful"], means["train_harmless"], config.sites)
    candidates.save(work / "candidates.safetensors")
    with stages.stage("selection"):
        selection = select_direction(
            model, tokenizer, candidates, chats["val_harmful"], chats["val_harmless"],
            refusal_token_ids(tokenizer), config,
        )  # fmt: skip
    selection.direction.save(work / "direction")
    (work / "scores.json").write_text(json.dumps(selection.to_dict(), indent=2))
    return {"stages": stages.to_dict(), "choice": f"{selection.layer}/{selection.site}"}


def _phase(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one phase in this process; returns its figures."""
    import torch

    from abliterate.config import ApplyConfig, RunConfig

    demo_config = RunConfig(n_screen=N_SCREEN, n_finalists=N_FINALISTS, batch_size=16)
    if name == "demo-measure-memory":
        from abliterate.model.loading import load_model

        loaded = load_model(str(_demo_dir(args)), device="cpu")
        return _measure(loaded.model, loaded.tokenizer, work, n_train=N_TRAIN, n_val=N_VAL,
                        config=demo_config)  # fmt: skip
    if name == "demo-measure-stream":
        return _measure_streamed(_demo_dir(args), work, N_TRAIN, N_VAL, demo_config)
    if name == "demo-apply-memory":
        from abliterate.core.ablation import Ablation
        from abliterate.core.directions import Direction
        from abliterate.edit.export import save_model
        from abliterate.edit.weights import bake
        from abliterate.model.loading import load_model

        start = time.perf_counter()
        loaded = load_model(str(_demo_dir(args)), device="cpu")
        n_layers = loaded.model.config.num_hidden_layers
        edit = Ablation.uniform(Direction.load(work / "memory" / "direction"), n_layers)
        bake(loaded.model, edit)
        save_model(loaded.model, loaded.tokenizer, work / "out-memory", {"edit": edit.to_dict()})
        return {"seconds": time.perf_counter() - start}
    if name in ("demo-apply-stream", "synthetic-apply-stream"):
        from abliterate.commands.apply import apply

        demo = name.startswith("demo")
        source = str(_demo_dir(args) if demo else work / "synthetic")
        measured = work / ("memory" if demo else "synthetic-measure")
        start = time.perf_counter()
        record = apply(ApplyConfig(direction=measured / "direction.safetensors", model=source,
                                   out=work / f"out-{name}"))  # fmt: skip
        return {"seconds": time.perf_counter() - start, "timings": record["timings"]}
    if name == "demo-compare":
        return _compare(work, _demo_dir(args))
    if name.startswith("demo-generate-"):
        return _generate(name.removeprefix("demo-generate-"), work, _demo_dir(args))
    if name == "synthetic-build":
        return _build_synthetic(work / "synthetic", args.synthetic_gb, _demo_dir(args),
                                args.synthetic_hidden)  # fmt: skip
    if name == "synthetic-measure-stream":
        config = RunConfig(n_screen=SYNTHETIC_N_VAL, n_finalists=2, batch_size=8, sites=("pre",),
                           prune_last_layers=0.7)  # fmt: skip
        return _measure_streamed(work / "synthetic", work / "synthetic-measure",
                                 SYNTHETIC_N_TRAIN, SYNTHETIC_N_VAL, config)  # fmt: skip
    if name == "synthetic-check":
        return _hooks_vs_weights(work / "synthetic", work / "out-synthetic-apply-stream",
                                 work / "synthetic-measure")  # fmt: skip
    raise SystemExit(f"unknown phase {name} ({torch.__version__})")


def _demo_dir(args: argparse.Namespace) -> Path:
    """The demo model's checkpoint (or ``--demo``: another chat model, for a quick check)."""
    from abliterate.model.demo import ensure_demo_model

    return Path(args.demo) if args.demo else ensure_demo_model()


def _tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    from abliterate.data.chat import prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    prepare_tokenizer(tokenizer)
    return tokenizer


def _measure_streamed(source: Path, work: Path, n_train: int, n_val: int,
                      config: Any) -> dict[str, Any]:  # fmt: skip
    from abliterate.model.layerwise import LayerwiseModel

    work.mkdir(parents=True, exist_ok=True)
    model = LayerwiseModel(source)
    return _measure(model, _tokenizer(source), work, n_train=n_train, n_val=n_val, config=config)


def _compare(work: Path, demo: Path) -> dict[str, Any]:
    """Agreement of the two measurements and of the two edited demo models."""
    import torch
    from transformers import AutoModelForCausalLM

    from abliterate.data.chat import batches, format_chat
    from abliterate.measure.candidates import Candidates

    mem, st = (Candidates.load(work / d / "candidates.safetensors") for d in ("memory", "stream"))
    scores = {d: json.loads((work / d / "scores.json").read_text()) for d in ("memory", "stream")}
    pairs = list(zip(scores["memory"]["scores"], scores["stream"]["scores"], strict=True))
    score_diff = max(abs(a[k] - b[k]) for a, b in pairs for k in ("screen_refusal", "screen_kl"))
    out: dict[str, Any] = {
        "max_abs_diff_means": float(max((mem.harmful_mean - st.harmful_mean).abs().max(),
                                        (mem.harmless_mean - st.harmless_mean).abs().max())),
        "max_abs_diff_screen_scores": score_diff,
        "same_choice": (scores["memory"]["layer"], scores["memory"]["site"])
        == (scores["stream"]["layer"], scores["stream"]["site"]),
    }  # fmt: skip
    tokenizer = _tokenizer(demo)
    texts = format_chat(tokenizer, _prompts(1, 8)["val_harmless"] + _prompts(1, 8)["val_harmful"])
    models = {
        d: AutoModelForCausalLM.from_pretrained(work / d, dtype=torch.float32).eval()
        for d in ("out-memory", "out-demo-apply-stream")
    }
    diff, weight_diff = 0.0, 0.0
    with torch.inference_mode():
        for _, enc in batches(tokenizer, texts, 8):
            a, b = (m(**enc).logits for m in models.values())
            diff = max(diff, float((a - b).abs().max()))
        sa, sb = (m.state_dict() for m in models.values())
        weight_diff = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    out["max_abs_diff_logits_apply_vs_in_memory"] = diff
    out["max_abs_diff_weights_apply_vs_in_memory"] = weight_diff
    return out


def _generate(how: str, work: Path, demo: Path) -> dict[str, Any]:
    """Time 16 greedy tokens for 8 prompts: in memory, offloaded, or layer-streamed."""
    from abliterate.data.chat import format_chat
    from abliterate.model.forward import generate
    from abliterate.model.layerwise import LayerwiseModel
    from abliterate.model.loading import load_model
    from abliterate.search.streamed import streamed_generate

    tokenizer = _tokenizer(demo)
    texts = format_chat(tokenizer, _prompts(1, 8)["val_harmful"])
    start = time.perf_counter()
    if how == "stream":
        model = LayerwiseModel(demo)
        loaded_at = time.perf_counter()
        answers = streamed_generate(model, tokenizer, texts, max_new_tokens=16, batch_size=8)
    else:
        options: dict[str, Any] = {}
        if how == "offload":
            options = {"device_map": "auto", "max_memory": {"cpu": 2**30},
                       "offload_folder": work / "offload"}  # fmt: skip
        loaded = load_model(str(demo), device="cpu", **options)
        loaded_at = time.perf_counter()
        answers = generate(loaded.model, loaded.tokenizer, texts, max_new_tokens=16, batch_size=8)
    seconds = time.perf_counter() - loaded_at
    (work / f"answers-{how}.json").write_text(json.dumps(answers, indent=2))
    same = None
    if how != "memory" and (work / "answers-memory.json").is_file():
        same = answers == json.loads((work / "answers-memory.json").read_text())
    return {"load_seconds": loaded_at - start, "generate_seconds": seconds,
            "seconds_per_token": seconds / 16, "same_answers_as_in_memory": same}  # fmt: skip


def _build_synthetic(directory: Path, gigabytes: float, demo: Path, hidden: int) -> dict[str, Any]:
    """A Llama-layout float32 checkpoint of about ``gigabytes`` GB with the demo's tokenizer:
    width ``hidden``, MLP width 2.75 times that (Llama's ratio), as many layers as fit."""
    import torch
    from checkpoints import write_random_checkpoint
    from transformers import LlamaConfig

    tokenizer = _tokenizer(demo)
    inner = hidden * 11 // 4
    per_layer = (4 * hidden * hidden + 3 * hidden * inner + 2 * hidden) * 4
    outer = 2 * len(tokenizer) * hidden * 4
    n_layers = max(1, round((gigabytes * 1e9 - outer) / per_layer))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inner,
        num_hidden_layers=n_layers, num_attention_heads=16, num_key_value_heads=16,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    start = time.perf_counter()
    total = write_random_checkpoint(config, directory, dtype=torch.float32, shard_bytes=2 * 2**30,
                                    std=0.02)  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (demo / name).is_file():
            shutil.copyfile(demo / name, directory / name)
    return {"seconds": time.perf_counter() - start, "bytes": total, "n_layers": n_layers,
            "hidden_size": hidden, "intermediate_size": inner}  # fmt: skip


def _hooks_vs_weights(source: Path, edited: Path, measured: Path) -> dict[str, Any]:
    """The edited checkpoint's next-token log-probs against the source under the edit's hooks,
    both layer-streamed, on 4 prompts."""
    import torch

    from abliterate.core.ablation import Ablation
    from abliterate.core.directions import Direction
    from abliterate.data.chat import format_chat
    from abliterate.model.layerwise import LayerwiseModel
    from abliterate.search.streamed import streamed_logprobs

    tokenizer = _tokenizer(source)
    texts = format_chat(tokenizer, _prompts(1, 4)["val_harmless"])
    hooked_model = LayerwiseModel(source)
    edit = Ablation.uniform(Direction.load(measured / "direction"), hooked_model.n_layers)
    start = time.perf_counter()
    (hooked,), (unedited,) = (
        streamed_logprobs(hooked_model, tokenizer, [texts], [e], batch_size=4)[0]
        for e in (edit, None)
    )
    (baked,) = streamed_logprobs(LayerwiseModel(edited), tokenizer, [texts], [None])[0]
    return {
        "seconds": time.perf_counter() - start,
        "max_abs_diff_logprobs_hooks_vs_edited_checkpoint": float((hooked - baked).abs().max()),
        "max_abs_diff_logprobs_edit_vs_unedited": float((hooked - unedited).abs().max()),
        "torch": torch.__version__,
    }


def _run_phase(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``name`` in a fresh interpreter; its figures with its peak RSS and wall time."""
    out = work / f"{name}.json"
    cmd = [sys.executable, __file__, "--phase", name, "--work", str(work),
           "--synthetic-gb", str(args.synthetic_gb),
           "--synthetic-hidden", str(args.synthetic_hidden)]  # fmt: skip
    if args.demo:
        cmd += ["--demo", args.demo]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    result: dict[str, Any] = json.loads(out.read_text())
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(f"{name}: {result['wall_seconds']} s, peak RSS {result['peak_rss_mb']:.0f} MB",
          flush=True)  # fmt: skip
    return result


def _markdown(results: dict[str, Any]) -> str:
    p = results["phases"]
    rows = [
        ("demo: activations + selection, in memory", "demo-measure-memory"),
        ("demo: activations + selection, layer-streamed", "demo-measure-stream"),
        ("demo: weight edit, in memory (load, bake, save)", "demo-apply-memory"),
        ("demo: weight edit, streaming `apply`", "demo-apply-stream"),
        ("demo: 16 tokens × 8 prompts, in memory", "demo-generate-memory"),
        ("demo: 16 tokens × 8 prompts, disk offload (1 GiB resident)", "demo-generate-offload"),
        ("demo: 16 tokens × 8 prompts, layer-streamed", "demo-generate-stream"),
        ("synthetic: activations + selection, layer-streamed", "synthetic-measure-stream"),
        ("synthetic: weight edit, streaming `apply`", "synthetic-apply-stream"),
    ]
    lines = ["| phase | wall time (s) | peak RSS (MB) |", "|---|---:|---:|"]
    for label, key in rows:
        if key in p:
            lines.append(
                f"| {label} | {p[key]['wall_seconds']:.0f} | {p[key]['peak_rss_mb']:.0f} |"
            )
    s = p.get("synthetic-build", {})
    lines += ["", f"Synthetic checkpoint: {s.get('bytes', 0) / 1e9:.2f} GB float32, "
              f"{s.get('n_layers')} layers, d_model {s.get('hidden_size')}.", ""]  # fmt: skip
    for key in ("demo-compare", "demo-generate-memory", "demo-generate-offload",
                "demo-generate-stream", "synthetic-check"):  # fmt: skip
        for k, v in p.get(key, {}).items():
            if k not in ("peak_rss_mb", "wall_seconds", "seconds", "torch"):
                lines.append(f"- {key} {k}: {v}")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every phase (or one, with --phase) and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", help="Run only this phase, in this process (internal).")
    parser.add_argument("--work", type=Path, help="Scratch directory (default: a new one).")
    parser.add_argument("--synthetic-gb", type=float, default=7.0, help="Synthetic size (GB).")
    parser.add_argument("--skip-synthetic", action="store_true", help="Demo phases only.")
    parser.add_argument("--demo", help="Another chat model directory instead of the demo.")
    parser.add_argument("--synthetic-hidden", type=int, default=2048, help="Synthetic width.")
    parser.add_argument("--only", help="Comma-separated phases to (re)run into --out.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/streaming.json")
    args = parser.parse_args()
    if args.phase:
        work = args.work
        sub = {"demo-measure-memory": "memory", "demo-measure-stream": "stream"}.get(args.phase)
        if sub:
            (work / sub).mkdir(parents=True, exist_ok=True)
        result = _phase(args.phase, work / sub if sub else work, args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        (work / f"{args.phase}.json").write_text(json.dumps(result, indent=2))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="abliterate-streaming-"))
    phases = ["demo-measure-memory", "demo-measure-stream", "demo-apply-memory",
              "demo-apply-stream", "demo-compare", "demo-generate-memory",
              "demo-generate-offload", "demo-generate-stream"]  # fmt: skip
    if not args.skip_synthetic:
        phases += ["synthetic-build", "synthetic-measure-stream", "synthetic-apply-stream",
                   "synthetic-check"]  # fmt: skip
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "phases": {},
    }
    if args.only:  # a few phases again, merged into the results of an earlier run
        phases = args.only.split(",")
        if args.out.is_file():
            results = json.loads(args.out.read_text())
    try:
        for name in phases:
            results["phases"][name] = _run_phase(name, work, args)
            if name == "demo-compare":  # two 2.5 GB copies of the demo are no longer needed
                for d in ("out-memory", "out-demo-apply-stream"):
                    shutil.rmtree(work / d, ignore_errors=True)
    finally:
        for d in ("synthetic", "out-synthetic-apply-stream"):
            shutil.rmtree(work / d, ignore_errors=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
