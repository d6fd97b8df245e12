"""heretic vs. ``abliterate optimize`` on the demo model: same prompts, judge, length, machine.

heretic (p-e-w/heretic, AGPL) is used strictly as an external tool: the script installs
``heretic-llm`` into its own virtual environment and runs its command line; no heretic code is
imported into this project. Both tools get

* the same direction prompts (built-in train split, first ``--n-train`` of each kind),
* the same search-time validation prompts (built-in val split, first ``--n-val`` of each kind;
  heretic's "evaluation prompts" during its search): the harmless ones are instructions in
  real user styles (code, formatting, role-play, passages to summarise, other languages), so
  they are handed to heretic as a dataset folder (a JSON Lines file with a ``text`` column),
  since a text file would split the prompts that hold line breaks,
* the same chat formatting (heretic is given the system prompt that the demo model's chat
  template inserts by default, so both see identical prompt texts),
* the same batch size, device (this CPU) and dtype,

and heretic keeps its own search defaults otherwise (its objective, refusal markers, sampler
and parameter ranges), except the trial budget (``--heretic-trials``, default heretic's own 200:
about 4 hours of one CPU core for the demo model) and the length of the answers its search
judges (``--heretic-response-tokens``, 64 as in the earlier benchmark: its default of 100 would
make the 200 trials take about 6 hours; abliterate's search confirms with 32). heretic's random
start-up trials are scaled with the budget (its default is 60 of 200, so 30%), since with 40
trials and 60 start-up trials it would never reach its TPE phase.

Afterwards *both* edited models are measured by abliterate's evaluator on the held-out
evaluation split, which neither search saw: refusal rate with the same marker judge and
response length (``--max-new-tokens``, 128), first-token and multi-token KL on the harmless
evaluation prompts, overall and per style category.

heretic's model is the trial it would offer first under the same rule abliterate uses: the
lowest-KL trial of its Pareto front whose (heretic-judged) validation refusal rate is at most
``--refusal-target``, else its trial with the fewest refusals. It is exported by answering
heretic's own menu (save the merged model to a folder) through stdin.

Phases (``all`` runs them in order; each model-running step is wrapped in
``flock /work/notes/heavy.lock``, the machine's heavy-job lock, so real-model runs never
overlap)::

    python benchmarks/heretic_vs_abliterate.py all --work runs/bench
    python benchmarks/heretic_vs_abliterate.py table --work runs/bench   # from saved results

``side-by-side`` is how the README's table was measured on the 2-core machine: heretic's search
pinned to CPU 0 and abliterate's whole run pinned to CPU 1 (``taskset``, one thread each,
``nice -n 19``) at the same time, so both see the same machine load, then heretic's export and
evaluation on CPU 0. The two pinned searches do *not* take the heavy-job lock (heretic's takes
hours and would stop every other engineer's work); only the short export and evaluation steps
do. The 1-minute load average is sampled every minute while they run and reported with the
results, with the abliterate commit that ran (``$ABLITERATE_COMMIT`` or ``git rev-parse``)::

    python benchmarks/heretic_vs_abliterate.py side-by-side --work runs/bench

Results: ``WORK/results.json`` and ``WORK/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOCK = os.environ.get("ABLITERATE_HEAVY_LOCK", "/work/notes/heavy.lock")
BENCH_LOCK = "/tmp/abliterate-bench.lock"
HERETIC_VERSION = "1.4.0"
HERETIC_STARTUP_FRACTION = 60 / 200  # heretic's default n_startup_trials / n_trials
REPO = Path(__file__).resolve().parents[1]


def _python_env(args: argparse.Namespace) -> dict[str, str]:
    env = _env(args)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _env(args: argparse.Namespace, **extra: str) -> dict[str, str]:
    """The environment of a model-running step: unbuffered, and its thread count if pinned."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    if args.cpus:
        n = str(len(_cpu_list(args.cpus)))
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
    return env


def _cpu_list(cpus: str) -> list[int]:
    """``"0"``, ``"0,1"`` or ``"0-3"`` as a list of CPU numbers."""
    out: list[int] = []
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _wrap(args: argparse.Namespace, cmd: list[str], *, search: bool = False) -> list[str]:
    """``cmd`` pinned to ``--cpus`` (at the lowest priority) if given, under the heavy-job lock
    unless it is a pinned search.

    The two pinned searches of ``side-by-side`` run at once, one per core, without the heavy
    lock (heretic's takes hours); a lock of their own per CPU set keeps two benchmarks from
    sharing a core. Every other step (export, evaluation, an unpinned search) holds the heavy
    lock for as long as it runs.
    """
    if not args.cpus:
        return ["flock", LOCK, *cmd]
    pinned = ["nice", "-n", "19", "taskset", "-c", args.cpus, *cmd]
    if search:
        return ["flock", f"{BENCH_LOCK}.cpus-{args.cpus}", *pinned]
    return ["flock", LOCK, *pinned]


def _child_cpu_seconds() -> float:
    """User + system CPU time of this process's finished children: what a tool cost, whatever
    the machine's load (wall time on a shared machine depends on the other engineers' jobs)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def abliterate_commit() -> str:
    """The abliterate commit that runs: ``$ABLITERATE_COMMIT`` (set when the benchmark runs
    from an exported snapshot) or the checkout's ``HEAD``, ``+dirty`` with local changes."""
    if os.environ.get("ABLITERATE_COMMIT"):
        return os.environ["ABLITERATE_COMMIT"]
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        return "unknown"
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "src"], capture_output=True,
                           text=True).stdout.strip()  # fmt: skip
    return head.stdout.strip() + ("+dirty" if dirty else "")


def sample_load(path: Path, stop: Any, every: float = 60.0) -> None:
    """Append ``{"time", "load1", "load5", "load15"}`` to ``path`` every ``every`` seconds until
    ``stop`` (a :class:`threading.Event`) is set."""
    while True:
        load1, load5, load15 = os.getloadavg()
        with path.open("a") as f:
            f.write(json.dumps({"time": time.time(), "load1": load1, "load5": load5,
                                "load15": load15}) + "\n")  # fmt: skip
        if stop.wait(every):
            return


def load_summary(path: Path) -> dict[str, Any] | None:
    """Mean and maximum of the sampled 1-minute load average (None: never sampled)."""
    if not path.is_file():
        return None
    loads = [json.loads(line)["load1"] for line in path.read_text().splitlines() if line]
    if not loads:
        return None
    return {"samples": len(loads), "mean_load1": sum(loads) / len(loads), "max_load1": max(loads),
            "cpus": os.cpu_count()}  # fmt: skip


def setup_heretic(venv: Path) -> Path:
    """Create ``venv`` with heretic-llm (CPU torch pinned) unless it exists; returns its CLI."""
    exe = venv / "bin" / "heretic"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # torch pinned to the CPU wheel, so that heretic's dependency on torch pulls no CUDA build.
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0",
         f"heretic-llm=={HERETIC_VERSION}"],
        check=True,
    )  # fmt: skip
    return exe


def write_prompts(work: Path, n_train: int, n_val: int) -> dict[str, Path]:
    """Write the shared prompt sets as dataset folders heretic reads (``NAME/prompts.jsonl``,
    one ``{"text": ...}`` a line: prompts may hold line breaks)."""
    from abliterate.data.prompts import builtin

    sets = {
        "train_harmful": builtin("harmful", "train").head(n_train),
        "train_harmless": builtin("harmless", "train").head(n_train),
        "val_harmful": builtin("harmful", "val").head(n_val),
        "val_harmless": builtin("harmless", "val").head(n_val),
    }
    out = {}
    for name, s in sets.items():
        folder = work / "prompts" / name
        folder.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"text": p}, ensure_ascii=False) for p in s.prompts]
        (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        out[name] = folder
    return out


def default_system_prompt(model_dir: Path) -> str:
    """The system prompt the model's chat template inserts when none is given.

    Found by rendering a user turn with and without an empty system slot: the demo model's
    template (Qwen2.5) adds its own default system message, which heretic must be given
    explicitly because heretic always sends a system message.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    marker = "PROBE-SYSTEM-PROMPT"
    plain = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    probe = tok.apply_chat_template(
        [{"role": "system", "content": marker}, {"role": "user", "content": "x"}],
        tokenize=False,
    )
    before, after = probe.split(marker)
    if not (plain.startswith(before) and plain.endswith(after)):
        raise RuntimeError("cannot find the chat template's default system prompt")
    default = plain[len(before) : len(plain) - len(after)]
    if default != default.strip() or not default:
        raise RuntimeError(f"unexpected default system prompt {default!r}")
    return default


def heretic_args(args: argparse.Namespace, prompts: dict[str, Path], model_dir: Path) -> list[str]:
    """heretic's command line: shared settings only, its search defaults otherwise."""
    startup = max(1, round(HERETIC_STARTUP_FRACTION * args.heretic_trials))

    def dataset(flag: str, path: Path) -> list[str]:
        return [f"--{flag}.dataset", str(path), f"--{flag}.split", "train",
                f"--{flag}.column", "text"]  # fmt: skip

    return [
        "--model", str(model_dir),
        "--dtypes", '["float32"]',
        "--device-map", "cpu",
        "--batch-size", str(args.batch_size),
        "--max-response-length", str(args.heretic_response_tokens),
        "--system-prompt", args.system_prompt or default_system_prompt(model_dir),
        "--n-trials", str(args.heretic_trials),
        "--n-startup-trials", str(startup),
        "--seed", str(args.seed),
        "--export-strategy", "merge",
        *dataset("good-prompts", prompts["train_harmless"]),
        *dataset("bad-prompts", prompts["train_harmful"]),
        *dataset("good-evaluation-prompts", prompts["val_harmless"]),
        *dataset("bad-evaluation-prompts", prompts["val_harmful"]),
    ]  # fmt: skip


def run_heretic(args: argparse.Namespace, exe: Path, model_dir: Path) -> dict[str, Any]:
    """Run heretic's search to the end of its trials; stdin closed so its menu then exits."""
    hdir = args.work / "heretic"
    hdir.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(args.work, args.n_train, args.n_val)
    cmd = _wrap(args, [str(exe), *heretic_args(args, prompts, model_dir)], search=True)
    # COLAB_GPU makes heretic ask its menu questions with input() instead of a terminal UI,
    # so they can be answered (or, here, ended) through stdin.
    env = _env(args, COLAB_GPU="1", HF_HUB_OFFLINE="1")
    (hdir / "started.txt").write_text(f"{time.time()}\n")  # for a run stopped part-way
    with (hdir / "search.log").open("w") as log, open(os.devnull) as devnull:
        start = time.perf_counter()
        subprocess.run(cmd, cwd=hdir, env=env, stdin=devnull, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
    command = cmd[cmd.index(str(exe)) :]
    result = {"wall_seconds": wall, "command": command, "trials": heretic_trials(args, exe),
              "cpu_seconds": _child_cpu_seconds()}  # fmt: skip
    (hdir / "search.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


_READ_STUDY = """
import glob, json, sys
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
path = glob.glob("checkpoints/*.jsonl")[0]
storage = JournalStorage(JournalFileBackend(path))
studies = storage.get_all_studies()  # none yet while heretic is still preparing
trials = storage.get_all_trials(studies[0]._study_id) if studies else []
out = [{"number": t.number, "state": t.state.name, "params": t.params,
        "index": t.user_attrs.get("index"), "refusals": t.user_attrs.get("refusals"),
        "kl": t.user_attrs.get("kl_divergence"), "n_bad": t.user_attrs.get("n_bad_prompts")}
       for t in trials]
json.dump(out, sys.stdout)
"""


def heretic_trials(args: argparse.Namespace, exe: Path) -> list[dict[str, Any]]:
    """Every trial of heretic's stored study (read with the optuna of heretic's venv)."""
    python = exe.parent / "python"
    out = subprocess.run([str(python), "-c", _READ_STUDY], cwd=args.work / "heretic",
                         capture_output=True, text=True, check=True)  # fmt: skip
    return list(json.loads(out.stdout))


def heretic_front(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """heretic's Pareto front, in the order its menu lists it (fewest refusals first)."""
    done = [t for t in trials if t["state"] == "COMPLETE"]
    done.sort(key=lambda t: (t["refusals"], t["kl"]))
    front, best_kl = [], float("inf")
    for t in done:
        if t["kl"] < best_kl:
            best_kl = t["kl"]
            front.append(t)
    return front


def pick_heretic_trial(front: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The lowest-KL front trial at or below the refusal target, else the fewest refusals."""
    meeting = [t for t in front if t["refusals"] <= target * t["n_bad"]]
    return min(meeting, key=lambda t: t["kl"]) if meeting else front[0]


def export_heretic(args: argparse.Namespace, exe: Path, model_dir: Path) -> dict[str, Any]:
    """Answer heretic's menus through stdin to save the chosen trial's merged model."""
    hdir = args.work / "heretic"
    front = heretic_front(heretic_trials(args, exe))
    chosen = pick_heretic_trial(front, args.refusal_target)
    position = front.index(chosen) + 1
    save = hdir / "model"
    # 1: show the results of the previous (finished) run; then the trial's position in the
    # front; 1: save the model to a local folder; the folder. EOF then ends the program.
    answers = f"1\n{position}\n1\n{save}\n"
    prompts = write_prompts(args.work, args.n_train, args.n_val)
    cmd = _wrap(args, [str(exe), *heretic_args(args, prompts, model_dir)])
    env = _env(args, COLAB_GPU="1", HF_HUB_OFFLINE="1")
    with (hdir / "export.log").open("w") as log:
        subprocess.run(cmd, cwd=hdir, env=env, input=answers, text=True, stdout=log,
                       stderr=subprocess.STDOUT)  # fmt: skip
    if not (save / "config.json").is_file():
        raise RuntimeError(f"heretic did not save its model; see {hdir / 'export.log'}")
    info = {"chosen": chosen, "front": front, "model_dir": str(save)}
    (hdir / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def evaluate_model(args: argparse.Namespace, edited_dir: Path, out: Path) -> None:
    """Measure an exported model against the original with abliterate's evaluator."""
    cmd = _wrap(args, [
        sys.executable, __file__, "_evaluate", "--work", str(args.work),
        "--edited", str(edited_dir), "--out", str(out),
        "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
        "--kl-tokens", str(args.kl_tokens),
    ])  # fmt: skip
    subprocess.run(cmd, check=True, env=_python_env(args))


def _evaluate(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from abliterate.data.chat import ChatSet
    from abliterate.data.prompts import builtin
    from abliterate.eval.cache import baseline_assessment
    from abliterate.eval.evaluator import EvalSets, Evaluator
    from abliterate.eval.judges import MarkerJudge
    from abliterate.model.loading import load_model

    original = load_model("demo", device="cpu", dtype="float32")
    tok = original.tokenizer
    edited = AutoModelForCausalLM.from_pretrained(
        str(args.edited), dtype=torch.float32, use_safetensors=True
    ).eval()
    sets = EvalSets(
        ChatSet.format(tok, builtin("harmful", "eval")),
        ChatSet.format(tok, builtin("harmless", "eval")),
    )
    evaluator = Evaluator(tok, sets, [MarkerJudge()], max_new_tokens=args.max_new_tokens,
                          kl_tokens=args.kl_tokens, batch_size=args.batch_size)  # fmt: skip
    # The unedited demo model's answers: from the baseline cache when a run has measured them
    # with these settings (abliterate's own run stores them), else measured here.
    baseline, cached = baseline_assessment(evaluator, original, "demo")
    assessed = evaluator.assess(edited, "edited")
    evaluator.compare(assessed, evaluator.kl(baseline, original.model, model_q=edited))
    report = assessed.to_dict()
    refusals = assessed.harmful
    result = {
        "refusal_rate": refusals.refusal_rate,
        "refusals": sum(refusals.refused),
        "late_refusals": refusals.n_late,
        "n_prompts": len(refusals.refused),
        "kl_divergence": report["kl_divergence"],
        "kl_divergence_multi_token": report["kl_divergence_multi_token"],
        "kl_by_category": report["kl_by_category"],
        "kl_tokens": args.kl_tokens,
        "max_new_tokens": args.max_new_tokens,
        "judge": "markers",
        "baseline_cache": cached,
        "commit": abliterate_commit(),
        "completions": refusals.completions(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def run_abliterate(args: argparse.Namespace) -> dict[str, Any]:
    """``abliterate optimize`` with its defaults and the shared settings."""
    out = args.work / "abliterate"
    storage = args.work / "abliterate.study.db"
    storage.unlink(missing_ok=True)  # a fresh search, timed from scratch
    cmd = _wrap(args, [
        sys.executable, "-m", "abliterate", "optimize", "--model", "demo",
        "--out", str(out), "--overwrite", "--n-train", str(args.n_train),
        "--n-val", str(args.n_val), "--max-new-tokens", str(args.max_new_tokens),
        "--batch-size", str(args.batch_size), "--kl-tokens", str(args.kl_tokens),
        "--seed", str(args.seed), "--refusal-target", str(args.refusal_target),
        *([] if args.trials is None else ["--trials", str(args.trials)]),
    ], search=True)  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=_python_env(args))
    wall = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    timings = report["timings"]
    # The part that corresponds to heretic's run: directions, search and confirmation (heretic
    # does no held-out evaluation or verified export of its own).
    search = sum(timings[k]["seconds"] for k in ("load model", "activations", "search"))
    result = {"wall_seconds": wall, "search_seconds": search, "report": str(out / "report.json"),
              "cpu_seconds": _child_cpu_seconds(), "commit": abliterate_commit()}  # fmt: skip
    (args.work / "abliterate.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(args: argparse.Namespace) -> str:
    """Collect every saved result into ``results.json`` and ``results.md``."""
    work = args.work
    rows: dict[str, dict[str, Any]] = {}
    ab = (
        json.loads((work / "abliterate.json").read_text())
        if (work / "abliterate.json").exists()
        else None
    )
    if ab:
        report = json.loads(Path(ab["report"]).read_text())
        e, b = report["edited"], report["baseline"]
        rows["baseline (unedited)"] = {"refusal_rate": b["refusal_rate"], "n": b["n_prompts"]}
        chosen = report["optimization"]["chosen"]
        rows["abliterate optimize"] = {
            "refusal_rate": e["refusal_rate"], "n": e["n_prompts"],
            "kl": e["kl_divergence"], "kl_multi": e["kl_divergence_multi_token"],
            "wall": ab["wall_seconds"], "search_wall": ab["search_seconds"],
            "trials": len(report["optimization"]["trials"]),
            "val": {"trial": chosen["number"], "n": report["data"]["val_harmful"]["n"],
                    "refusals": round(chosen["confirmed_refusal_rate"]
                                      * report["data"]["val_harmful"]["n"]),
                    "kl": chosen["kl"]},
        }  # fmt: skip
    search = work / "heretic" / "search.json"
    evaluated = work / "heretic" / "eval.json"
    heretic: dict[str, Any] | None = None
    if search.exists():
        heretic = json.loads(search.read_text())
    elif any((work / "heretic" / "checkpoints").glob("*.jsonl")):
        # heretic is still running or was stopped: its stored trials so far, and the time up
        # to the last one it stored.
        journal = next((work / "heretic" / "checkpoints").glob("*.jsonl"))
        started = float((work / "heretic" / "started.txt").read_text())
        trials = heretic_trials(args, args.venv / "bin" / "heretic")
        heretic = {"wall_seconds": journal.stat().st_mtime - started, "partial": True,
                   "trials": trials}  # fmt: skip
    if heretic is not None:
        s = heretic
        done = [t for t in s["trials"] if t["state"] == "COMPLETE"]
        row: dict[str, Any] = {"wall": s["wall_seconds"], "search_wall": s["wall_seconds"],
                               "trials": len(done)}  # fmt: skip
        if evaluated.exists():
            h = json.loads(evaluated.read_text())
            row.update(refusal_rate=h["refusal_rate"], n=h["n_prompts"], kl=h["kl_divergence"],
                       kl_multi=h["kl_divergence_multi_token"])  # fmt: skip
        if done:
            # heretic's own validation-time numbers for the trial it would offer.
            chosen = pick_heretic_trial(heretic_front(s["trials"]), args.refusal_target)
            row["val"] = {"trial": chosen["index"], "refusals": chosen["refusals"],
                          "n": chosen["n_bad"], "kl": chosen["kl"]}  # fmt: skip
        name = f"heretic {HERETIC_VERSION}"
        if s.get("partial"):
            name += f" (partial: {len(done)} of {args.heretic_trials} trials)"
            if not done:
                del row["wall"], row["search_wall"]
        rows[name] = row
    (work / "results.json").write_text(json.dumps({"settings": vars_json(args), "rows": rows},
                                                  indent=2) + "\n")  # fmt: skip

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "–"

    lines = [
        "| model | refusals (eval) | first-token KL | multi-token KL | trials | search wall time | "
        "total wall time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        refusals = (f"{100 * r['refusal_rate']:.1f}% ({round(r['refusal_rate'] * r['n'])}/"
                    f"{r['n']})" if "refusal_rate" in r else "–")  # fmt: skip
        lines.append(
            f"| {name} | {refusals} | {cell(r, 'kl', '.4f')} | {cell(r, 'kl_multi', '.4f')} | "
            f"{cell(r, 'trials', 'd')} | {_minutes(r.get('search_wall'))} | "
            f"{_minutes(r.get('wall'))} |"
        )
    lines += [
        "",
        "Search-time numbers of each tool's chosen trial (validation prompts, each tool's own "
        "judge: abliterate's marker judge on its confirmation generations, heretic's markers):",
        "",
        "| model | trial | refusals (val) | first-token KL (val) |",
        "|---|---:|---:|---:|",
    ]
    for name, r in rows.items():
        if "val" in r:
            v = r["val"]
            lines.append(f"| {name} | {v['trial']} | {v['refusals']}/{v['n']} | {v['kl']:.4f} |")
    md = "\n".join(lines) + "\n"
    (work / "results.md").write_text(md)
    return md


def side_by_side(args: argparse.Namespace) -> None:
    """heretic's search on CPU 0 and abliterate on CPU 1 at once; then heretic's export/eval."""
    import threading

    setup_heretic(args.venv)
    common = [sys.executable, __file__, "--work", str(args.work), "--n-train", str(args.n_train),
              "--n-val", str(args.n_val), "--max-new-tokens", str(args.max_new_tokens),
              "--kl-tokens", str(args.kl_tokens), "--batch-size", str(args.batch_size),
              "--heretic-trials", str(args.heretic_trials), "--seed", str(args.seed),
              "--heretic-response-tokens", str(args.heretic_response_tokens),
              "--refusal-target", str(args.refusal_target), "--venv", str(args.venv),
              *([] if args.trials is None else ["--trials", str(args.trials)])]  # fmt: skip
    (args.work / "commit.txt").write_text(abliterate_commit() + "\n")
    loads = args.work / "loadavg.jsonl"
    loads.unlink(missing_ok=True)
    stop = threading.Event()
    sampler = threading.Thread(target=sample_load, args=(loads, stop), daemon=True)
    sampler.start()
    jobs = [
        subprocess.Popen([*common, "heretic", "--cpus", "0"], env=_python_env(args)),
        subprocess.Popen([*common, "abliterate", "--cpus", "1"], env=_python_env(args)),
    ]
    failed = [job.wait() != 0 for job in jobs]
    stop.set()
    sampler.join()
    if any(failed):
        raise RuntimeError("a side-by-side run failed; see its output above")
    for phase in ("heretic-export", "heretic-eval", "table"):
        subprocess.run([*common, phase, "--cpus", "0"], check=True, env=_python_env(args))


def _minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


def vars_json(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "phase",
        choices=[
            "all",
            "side-by-side",
            "setup",
            "heretic",
            "heretic-export",
            "heretic-eval",
            "abliterate",
            "table",
            "_evaluate",
        ],
    )
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument("--venv", type=Path, default=Path("/tmp/heretic-venv"))
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="evaluation answers")
    parser.add_argument(
        "--heretic-response-tokens",
        type=int,
        default=64,
        help="length of the answers heretic's search judges (heretic's default: 100)",
    )
    parser.add_argument("--kl-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--heretic-trials", type=int, default=200)
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        help="abliterate trial budget (default: abliterate's own default)",
    )
    parser.add_argument("--refusal-target", type=float, default=0.05)
    parser.add_argument(
        "--cpus",
        default=None,
        help="pin every model-running step to these CPUs (taskset list, e.g. 0 or 0-1) with as "
        "many threads; run one tool per core side by side for equal conditions",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="heretic's model (default: the demo model's cached directory); "
        "for dry runs of the heretic phases on a tiny model",
    )
    parser.add_argument(
        "--system-prompt", default=None, help="default: the one the model's chat template inserts"
    )
    parser.add_argument("--edited", type=Path)  # for _evaluate
    parser.add_argument("--out", type=Path)  # for _evaluate
    args = parser.parse_args()  # fmt: skip
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.phase == "_evaluate":
        _evaluate(args)
        return

    from abliterate.model.demo import ensure_demo_model

    model_dir = args.model_dir or ensure_demo_model()
    if args.phase == "side-by-side":
        side_by_side(args)
        return
    phases = (["setup", "abliterate", "heretic", "heretic-export", "heretic-eval", "table"]
              if args.phase == "all" else [args.phase])  # fmt: skip
    for phase in phases:
        print(f"== {phase} ({time.strftime('%H:%M:%S')})", flush=True)
        if phase == "setup":
            setup_heretic(args.venv)
        elif phase == "heretic":
            run_heretic(args, setup_heretic(args.venv), model_dir)
        elif phase == "heretic-export":
            export_heretic(args, setup_heretic(args.venv), model_dir)
        elif phase == "heretic-eval":
            evaluate_model(
                args, args.work / "heretic" / "model", args.work / "heretic" / "eval.json"
            )
        elif phase == "abliterate":
            run_abliterate(args)
        table_md = table(args)
    print(table_md)


if __name__ == "__main__":
    main()
