"""Capability benchmarks through EleutherAI's lm-evaluation-harness, on the in-memory model.

The package ships small project-written tasks (``benchmark_tasks/*.yaml`` with ``.jsonl`` data)
that run offline: their YAML names the data file relative to itself, and :func:`run_benchmarks`
renders them into a temporary include directory with absolute ``data_files`` paths (lm-eval and
``datasets`` resolve relative paths against the working directory, not the YAML). Local task
names all start with ``abliterate_``; any other name is passed to lm-eval unchanged, so its own
tasks work when their datasets can be downloaded.

The model is wrapped as ``HFLM(pretrained=model, tokenizer=tokenizer)``: the very model object
that was evaluated (with its edits) is scored, never a reload from disk.
"""

from __future__ import annotations

import difflib
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate.errors import BenchmarkError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

LOCAL_TASKS_DIR = Path(__file__).parent / "benchmark_tasks"
LOCAL_PREFIX = "abliterate_"


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml comes with lm-eval
        raise BenchmarkError(_INSTALL_HINT) from exc
    return yaml


_INSTALL_HINT = "benchmarks need lm-evaluation-harness: pip install 'abliterate[eval]'."


def local_task_configs() -> dict[str, dict[str, Any]]:
    """The shipped task configs by task name, with ``data_files`` made absolute."""
    yaml = _yaml()
    configs: dict[str, dict[str, Any]] = {}
    for path in sorted(LOCAL_TASKS_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {
            split: str((path.parent / name).resolve()) for split, name in files.items()
        }
        configs[str(config["task"])] = config
    return configs


def local_task_names() -> list[str]:
    """Names of the shipped offline tasks."""
    return sorted(local_task_configs())


def check_task_names(names: Sequence[str]) -> None:
    """Reject misspelt local task names before any model is loaded.

    Raises:
        BenchmarkError: a name starts with ``abliterate_`` but is no shipped task; the message
            suggests the closest one.
    """
    local = local_task_names()
    for name in names:
        if name.startswith(LOCAL_PREFIX) and name not in local:
            close = difflib.get_close_matches(name, local, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise BenchmarkError(
                f"unknown built-in benchmark '{name}'.{hint} Built-in tasks: {', '.join(local)}."
            )


def _flatten(task_results: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": x, "acc_stderr,none": s, "alias": ...}`` -> ``{"acc": x, "acc_stderr": s}``.

    Metrics under a filter other than ``none`` keep it, as ``metric/filter``.
    """
    out: dict[str, float] = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, int | float):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
    return out


def run_benchmarks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Score the in-memory ``model`` on lm-eval ``tasks`` (zero-shot, no chat template).

    Args:
        tasks: Built-in task names (:func:`local_task_names`) and/or lm-eval task names.
        limit: Items per task (all when None).

    Returns:
        ``{task: {"acc": …, "acc_stderr": …, …, "n": items scored, "source": "builtin" |
        "lm-eval"}}`` with lm-eval's metric names.

    Raises:
        BenchmarkError: lm-eval is missing, a task is unknown, or the evaluation failed.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise BenchmarkError(_INSTALL_HINT) from exc

    check_task_names(tasks)
    local = local_task_configs()
    external = [t for t in tasks if t not in local]
    yaml = _yaml()
    with tempfile.TemporaryDirectory(prefix="abliterate-tasks-") as include:
        for name in tasks:
            if name in local:
                (Path(include) / f"{name}.yaml").write_text(yaml.safe_dump(local[name]))
        # Indexing lm-eval's thousands of built-in task files takes half a minute on a small
        # CPU, so it is only done when a task outside the package is asked for.
        manager = TaskManager(include_path=include, include_defaults=bool(external))
        unknown = [t for t in external if t not in manager.all_tasks]
        if unknown:
            close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise BenchmarkError(f"unknown lm-eval task '{unknown[0]}'.{hint}")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            results = simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=manager,
                limit=limit,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except (OSError, ValueError, ConnectionError) as exc:
            raise BenchmarkError(f"lm-eval failed on {', '.join(tasks)}: {exc}") from exc
    if results is None:  # pragma: no cover - only on non-zero ranks of distributed runs
        raise BenchmarkError("lm-eval returned no results.")
    out: dict[str, dict[str, Any]] = {}
    for name in tasks:
        scores: dict[str, Any] = _flatten(results["results"][name])
        scores["n"] = int(results["n-samples"][name]["effective"])
        scores["source"] = "builtin" if name in local else "lm-eval"
        out[name] = scores
    return out
