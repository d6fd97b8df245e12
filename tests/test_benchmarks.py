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
        # The data ships beside its YAML, whose relative path was made absolute.
        assert Path(path).parent == LOCAL_TASKS_DIR.resolve()
    # Every YAML in the package is a task, named after its file.
    yamls = sorted(f"abliterate_{p.stem}" for p in LOCAL_TASKS_DIR.glob("*.yaml"))
    assert yamls == names


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


N_ITEMS = 7


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
    model = make_model("llama")
    scores = run_benchmarks(
        model, tokenizer, ["abliterate_general_knowledge"], limit=N_ITEMS, batch_size=4
    )
    result = scores["abliterate_general_knowledge"]
    assert result["n"] == N_ITEMS and result["source"] == "builtin"
    # The same items scored by hand: the summed log-probability of " " + choice after
    # "Question: …\nAnswer:" picks the answer (acc), or that sum per character (acc_norm).
    config = local_task_configs()["abliterate_general_knowledge"]
    (path,) = config["dataset_kwargs"]["data_files"].values()
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()][:N_ITEMS]
    expected = {"acc": 0.0, "acc_norm": 0.0}
    for row in rows:
        lls = [_loglikelihood(model, tokenizer, f"Question: {row['question']}\nAnswer:", f" {c}")
               for c in row["choices"]]  # fmt: skip
        norm = [ll / len(c) for ll, c in zip(lls, row["choices"], strict=True)]
        expected["acc"] += (lls.index(max(lls)) == row["answer"]) / N_ITEMS
        expected["acc_norm"] += (norm.index(max(norm)) == row["answer"]) / N_ITEMS
    # On these items the two metrics differ (2/7 and 1/7), so swapping them would show.
    assert expected["acc"] != expected["acc_norm"]
    for metric, value in expected.items():
        assert result[metric] == pytest.approx(value, abs=1e-9), metric
        # lm-eval's standard error of a mean of 0/1 scores: sqrt(p (1 - p) / (n - 1)).
        stderr = (value * (1 - value) / (N_ITEMS - 1)) ** 0.5
        assert result[f"{metric}_stderr"] == pytest.approx(stderr, abs=1e-9), metric


def _loglikelihood(model: Any, tokenizer: Any, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as lm-eval does (whole text, then split)."""
    import torch

    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    start = len(tokenizer.encode(context, add_special_tokens=False))
    with torch.no_grad():
        logprobs = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)  # (pos, vocab)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(start, len(whole)))
