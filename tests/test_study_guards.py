"""The search's study is checked before the model is loaded (storage errors, ``--trial``), and
Ctrl-C during a trial ends in the CLI's one line, not in Optuna's traceback."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from cli_errors import one_error

from abliterate.config import RunConfig
from abliterate.errors import ConfigError
from abliterate.search.space import EditParams
from abliterate.search.study import check_study, completed, open_study, run_trials, sqlite_path


def test_storage_errors_are_reported_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: list[str]
) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not an SQLite database " * 100)
    cases = {
        "nonsense": "Could not parse",
        "foo://bar": "Can't load plugin",
        f"sqlite:///{tmp_path / 'missing' / 'study.db'}": "does not exist",
        f"sqlite:///{corrupt}": "file is not a database",
    }
    for storage, message in cases.items():
        argv = ["optimize", "--model", "demo", "--out", str(tmp_path / "out"),
                "--storage", storage]  # fmt: skip
        msg = one_error(argv, capsys)
        assert "study storage" in msg and message in msg, msg
    assert no_model_load == []
    assert corrupt.read_bytes().startswith(b"this is not")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.db"]


def test_a_fresh_default_storage_is_not_created_by_the_check(tmp_path: Path) -> None:
    config = RunConfig(out=tmp_path / "runs" / "new", optimize=True, trials=4)
    check_study(config)
    assert list(tmp_path.iterdir()) == []


def test_trial_numbers_the_search_will_never_have_are_refused_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: list[str]
) -> None:
    argv = ["optimize", "--model", "demo", "--out", str(tmp_path / "out"), "--trials", "4",
            "--trial", "999"]  # fmt: skip
    msg = one_error(argv, capsys)
    assert "--trial 999" in msg and "up to number 3" in msg
    assert no_model_load == []
    # The last number a fresh study of four trials reaches is fine.
    check_study(RunConfig(out=tmp_path / "out", optimize=True, trials=4, trial=3))


def test_trial_checks_read_the_existing_study(tmp_path: Path) -> None:
    from optuna.trial import TrialState

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(storage, "s", {"model": "tiny"})
    for _ in range(3):
        trial = study.ask()
        study.tell(trial, [0.5, 0.1])
    study.tell(study.ask(), state=TrialState.FAIL)  # trial 3

    def config(trial: int, trials: int) -> RunConfig:
        return RunConfig(out=tmp_path / "o", optimize=True, storage=storage, study_name="s",
                         trial=trial, trials=trials)  # fmt: skip

    check_study(config(1, trials=2))  # completed, though --trials is lower now
    with pytest.raises(ConfigError, match=r"--trial 3: that trial of study 's' failed"):
        check_study(config(3, trials=10))
    check_study(config(4 + 6, trials=10))  # 3 completed: 7 more, numbered 4 … 10
    with pytest.raises(ConfigError, match="up to number 10"):
        check_study(config(11, trials=10))


def test_sqlite_path() -> None:
    assert sqlite_path("sqlite:////abs/s.db") == Path("/abs/s.db")
    assert sqlite_path("sqlite:///rel/s.db?timeout=5") == Path("rel/s.db")
    assert sqlite_path("sqlite:///") is None and sqlite_path("postgresql://h/db") is None


def test_ctrl_c_in_a_trial_shows_no_optuna_traceback(tmp_path: Path) -> None:
    class Space:
        def seed_params(self) -> list[dict[str, Any]]:
            return []

        def suggest(self, trial: Any) -> EditParams:
            trial.suggest_float("x", 0.0, 1.0)
            return None  # type: ignore[return-value]

    calls = []

    def evaluate(_params: EditParams) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {"refusal_prob": 0.5, "kl": 0.1}

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    optuna_root = logging.getLogger("optuna")
    optuna_root.addHandler(handler)
    try:
        study = open_study(f"sqlite:///{tmp_path / 'study.db'}", "s", {"model": "tiny"})
        with pytest.raises(KeyboardInterrupt):
            run_trials(study, Space(), evaluate, 10)  # type: ignore[arg-type]
        failed = [r for r in records if "failed" in r.getMessage() or r.exc_info]
        assert failed == [], [r.getMessage() for r in failed]
        assert len(completed(study)) == 2  # the finished trials are kept
        # Other failures are still reported by Optuna.
        calls.clear()
        with pytest.raises(ZeroDivisionError):
            run_trials(study, Space(), lambda p: {"kl": 1 / 0}, 10)  # type: ignore[arg-type]
        assert any("failed" in r.getMessage() for r in records)
    finally:
        optuna_root.removeHandler(handler)
