"""lm-evaluation-harness on the shipped offline tasks with a tiny random model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from abliterate.errors import BenchmarkError
from abliterate.eval.benchmarks import (
    LOCAL_TASKS_DIR,
    check_task_names,
    local_task_configs,
    local_task_names,
    run_benchmarks,
)


def test_local_tasks_are_shipped_with_valid_items() -> None:
    names = local_task_names()
    assert names == ["abliterate_arithmetic", "abliterate_general_knowledge"]
    for config in local_task_configs().values():
        (path,) = config["dataset_kwargs"]["data_files"].values()
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        assert 50 <= len(rows) <= 100
        for row in rows:
            assert len(row["choices"]) == len(set(row["choices"])) == 4
            assert 0 <= row["answer"] < 4
        # Questions are unique, so no item is counted twice.
        assert len({r["question"] for r in rows}) == len(rows)
    assert LOCAL_TASKS_DIR.is_dir()


def test_arithmetic_answers_are_correct() -> None:
    config = local_task_configs()["abliterate_arithmetic"]
    (path,) = config["dataset_kwargs"]["data_files"].values()
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        a, op, b = row["question"].removeprefix("What is ").removesuffix("?").split()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert int(row["choices"][row["answer"]]) == expected


def test_misspelt_builtin_task_suggests_the_right_one() -> None:
    with pytest.raises(BenchmarkError, match="Did you mean 'abliterate_arithmetic'"):
        check_task_names(["abliterate_arithmatic"])
    check_task_names(["abliterate_arithmetic", "hellaswag"])  # hub names pass through


def test_lm_eval_runs_offline_on_a_local_task(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    make_model: Callable[[str], Any],
    tokenizer: Any,
) -> None:
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    scores = run_benchmarks(
        make_model("llama"), tokenizer, ["abliterate_general_knowledge"], limit=6, batch_size=4
    )
    result = scores["abliterate_general_knowledge"]
    assert result["n"] == 6 and result["source"] == "builtin"
    # Accuracy over 6 items is a multiple of 1/6.
    for metric in ("acc", "acc_norm"):
        assert 0.0 <= result[metric] <= 1.0
        assert abs(result[metric] * 6 - round(result[metric] * 6)) < 1e-9
    assert "acc_stderr" in result
