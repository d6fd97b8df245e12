"""The pure parts of ``benchmarks/heretic_vs_abliterate.py``: front, choice rule, CPU pinning."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "heretic_vs_abliterate.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("heretic_vs_abliterate", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trial(number: int, refusals: int, kl: float, state: str = "COMPLETE") -> dict[str, Any]:
    return {"number": number, "index": number + 1, "state": state, "refusals": refusals,
            "kl": kl, "n_bad": 32, "params": {}}  # fmt: skip


def test_front_and_choice_follow_abliterates_rule(bench: ModuleType) -> None:
    trials = [
        trial(0, 2, 0.09),
        trial(1, 9, 0.03),
        trial(2, 2, 0.12),  # dominated by trial 0
        trial(3, 1, 0.20),
        trial(4, 0, 0.40),
        trial(5, 0, 0.01, state="RUNNING"),  # unfinished trials are ignored
    ]
    front = bench.heretic_front(trials)
    assert [t["number"] for t in front] == [4, 3, 0, 1]  # fewest refusals first, as its menu
    # At most 5% of 32 prompts (1 refusal): the lowest-KL such trial.
    assert bench.pick_heretic_trial(front, 0.05)["number"] == 3
    # None meets 0%... except trial 4; and with no trial meeting the target, the fewest refusals.
    assert bench.pick_heretic_trial(front, 0.0)["number"] == 4
    assert bench.pick_heretic_trial(front[2:], 0.0)["number"] == 0


def test_cpu_pinning(bench: ModuleType) -> None:
    assert bench._cpu_list("0") == [0]
    assert bench._cpu_list("0-2,5") == [0, 1, 2, 5]
    pinned = argparse.Namespace(cpus="1")
    # A pinned search runs at the lowest priority without the heavy-job lock (heretic's takes
    # hours), under a lock of its own per CPU set: the two pinned tools run together.
    search = bench._wrap(pinned, ["python", "-V"], search=True)
    assert search[-8:] == ["nice", "-n", "19", "taskset", "-c", "1", "python", "-V"]
    assert search[1].endswith(".cpus-1") and bench.LOCK not in search
    # Every other pinned step (export, evaluation) holds the heavy-job lock.
    assert bench._wrap(pinned, ["python"])[:2] == ["flock", bench.LOCK]
    assert bench._env(pinned)["OMP_NUM_THREADS"] == "1"
    unpinned = argparse.Namespace(cpus=None)
    assert bench._wrap(unpinned, ["python"]) == ["flock", bench.LOCK, "python"]
    assert bench._wrap(unpinned, ["python"], search=True) == ["flock", bench.LOCK, "python"]


def test_prompts_reach_heretic_as_datasets_with_line_breaks(
    bench: ModuleType, tmp_path: Path
) -> None:
    import json

    folders = bench.write_prompts(tmp_path, 4, 40)
    rows = (folders["val_harmless"] / "prompts.jsonl").read_text().splitlines()
    texts = [json.loads(r)["text"] for r in rows]
    assert len(texts) == 40 and any("\n" in t for t in texts)
    args = argparse.Namespace(heretic_trials=200, heretic_response_tokens=64, batch_size=8,
                              system_prompt="S", seed=0)  # fmt: skip
    cli = bench.heretic_args(args, folders, tmp_path)
    at = cli.index("--good-evaluation-prompts.dataset")
    assert cli[at : at + 6] == [
        "--good-evaluation-prompts.dataset", str(folders["val_harmless"]),
        "--good-evaluation-prompts.split", "train", "--good-evaluation-prompts.column", "text",
    ]  # fmt: skip
    assert cli[cli.index("--n-startup-trials") + 1] == "60"
    assert cli[cli.index("--max-response-length") + 1] == "64"


def test_load_average_is_sampled_and_summarised(bench: ModuleType, tmp_path: Path) -> None:
    import threading

    stop = threading.Event()
    stop.set()  # one sample, then stop
    bench.sample_load(tmp_path / "load.jsonl", stop)
    summary = bench.load_summary(tmp_path / "load.jsonl")
    assert summary["samples"] == 1 and summary["max_load1"] >= 0
    assert bench.load_summary(tmp_path / "missing.jsonl") is None
