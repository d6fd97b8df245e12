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
    cmd = bench._wrap(pinned, ["python", "-V"])
    assert cmd[-5:] == ["taskset", "-c", "1", "python", "-V"]
    assert cmd[1].endswith(".cpus-1")  # a lock of its own: the two pinned tools run together
    assert bench._env(pinned)["OMP_NUM_THREADS"] == "1"
    unpinned = argparse.Namespace(cpus=None)
    assert bench._wrap(unpinned, ["python"]) == ["flock", bench.LOCK, "python"]
