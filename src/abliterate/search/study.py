"""The search's Optuna study: storage, resumption, dead workers and trial seeding.

A study lives in Optuna RDB storage (SQLite by default, PostgreSQL/MySQL for workers on several
machines). :func:`open_study` creates or resumes it and refuses one made for another
configuration; :func:`run_trials` marks the trials of dead workers failed (they are not
counted), then runs trials until the study holds the budget of *completed* trials, whichever
worker completed them. :func:`trial_seeded_sampler` makes every trial's randomness a function
of the seed and the trial number, so parallel workers never evaluate the same point and a
single worker's study is reproducible.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate.errors import ConfigError
from abliterate.files import process_alive

if TYPE_CHECKING:
    import optuna

    from abliterate.config import RunConfig
    from abliterate.search.space import EditParams, SearchSpace

log = logging.getLogger(__name__)


def default_storage(out: Path) -> str:
    """``sqlite:///OUT.study.db``: beside the run directory, so it outlives a failed run."""
    path = out.resolve()
    return f"sqlite:///{path.with_name(path.name + '.study.db')}"


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Mark RUNNING trials whose worker is gone as FAIL; returns their numbers.

    A worker on this host is gone when its process id no longer exists (a killed run, resumed
    at once). Workers elsewhere are judged by Optuna's heartbeat, when the storage has one.
    """
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(t.user_attrs.get("worker", ""))
        worker_host, _, pid = worker.rpartition(":")
        if worker_host == host and pid.isdigit() and not process_alive(int(pid)):
            # tell() by trial number finishes any worker's trial; skip_if_finished covers a
            # race with another worker failing it first.
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            failed.append(t.number)
    if failed:
        log.info("marked %d trial(s) of dead workers as failed: %s", len(failed), failed)
    return failed


def sqlite_path(storage: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` storage URL (None for other URLs and for
    SQLite in memory)."""
    prefix = "sqlite:///"
    if not storage.startswith(prefix) or len(storage) == len(prefix):
        return None
    return Path(storage[len(prefix) :].split("?", 1)[0])


def _rdb(storage: str) -> optuna.storages.RDBStorage:
    """The Optuna storage at ``storage``, or one line saying why it cannot be opened."""
    import optuna
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats (how workers on other machines are found dead) are marked experimental.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        return optuna.storages.RDBStorage(storage, heartbeat_interval=30, grace_period=120)
    except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as exc:
        # SQLAlchemy appends the failing statement and a link on further lines.
        why = str(exc).splitlines()[0].split(" (Background on this error")[0]
        raise ConfigError(f"cannot open the study storage {storage}: {why}") from exc


def check_study(config: RunConfig) -> None:
    """Before any model is loaded: open the study's storage (``--storage``, else the default
    beside ``--out``) and check that ``--trial`` names a trial the study has or will have.

    A SQLite file that does not exist yet is not created here; only its folder is checked (the
    default one, beside the run directory, is created with it). ``--trial N`` is accepted when
    the study has trial N completed or running, or when the search will create it: trials are
    numbered in order, so a fresh study ends at ``--trials - 1`` when no trial fails.

    Raises:
        ConfigError: the storage cannot be opened, or ``--trial`` can never be a completed
            trial of this run's study.
    """
    from optuna.trial import TrialState

    storage = config.storage or default_storage(config.out)
    path = sqlite_path(storage)
    trials: list[optuna.trial.FrozenTrial] = []
    if path is not None and not path.exists():
        if config.storage is not None and not path.parent.is_dir():
            raise ConfigError(
                f"cannot open the study storage {storage}: folder {path.parent} does not exist."
            )
    else:
        rdb = _rdb(storage)
        names = {s.study_name for s in rdb.get_all_studies()}
        if config.study_name in names:
            study_id = rdb.get_study_id_from_name(config.study_name)
            trials = rdb.get_all_trials(study_id, deepcopy=False)
    if config.trial is None:
        return
    states = {t.number: t.state for t in trials}
    n_completed = sum(state == TrialState.COMPLETE for state in states.values())
    state = states.get(config.trial)
    if state is not None and state not in (TrialState.COMPLETE, TrialState.RUNNING):
        how = {"FAIL": "failed", "PRUNED": "pruned"}.get(state.name, state.name.lower())
        raise ConfigError(
            f"--trial {config.trial}: that trial of study '{config.study_name}' {how}; choose a "
            "completed one."
        )
    last = len(trials) + max(config.trials - n_completed, 0) - 1
    if state is None and config.trial > last:
        raise ConfigError(
            f"--trial {config.trial}: study '{config.study_name}' has {len(trials)} trial(s) "
            f"and this search adds trials up to number {last} (to reach --trials "
            f"{config.trials} completed); pass a lower --trial or raise --trials."
        )


def open_study(storage: str, study_name: str, fingerprint: dict[str, Any]) -> optuna.Study:
    """Create or resume the study, refusing one made for a different model or prompts.

    Raises:
        ConfigError: the storage cannot be opened, or the stored study's fingerprint differs
            from ``fingerprint``.
    """
    import optuna

    rdb = _rdb(storage)
    study = optuna.create_study(
        storage=rdb,
        study_name=study_name,
        directions=["minimize", "minimize"],
        load_if_exists=True,
    )
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif stored != fingerprint:
        changed = sorted(
            k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k)
        )
        raise ConfigError(
            f"study '{study_name}' in {storage} was made for a different configuration "
            f"(differs in: {', '.join(changed)}); pass another --study-name or --storage, or "
            "delete the stored study to start again."
        )
    return study


def trial_seeded_sampler(seeds: Sequence[dict[str, Any]], seed: int) -> optuna.samplers.BaseSampler:
    """Multivariate TPE whose randomness depends only on ``seed`` and the trial number.

    Trial number ``i < len(seeds)`` takes the parameters ``seeds[i]``; every later trial is
    sampled by a TPE sampler seeded with ``(seed, trial number)``. The storage hands out each
    trial number once, so parallel workers never duplicate a trial (two workers with one seed
    and one history would otherwise sample the same point, and two can pop the same
    ``enqueue_trial`` entry from a SQLite study), while a single worker's study is reproducible
    and a resumed one, being past the seed numbers, is not seeded again.
    """
    from optuna.samplers import BaseSampler, TPESampler

    cache: dict[int, BaseSampler] = {}

    def base(number: int) -> BaseSampler:
        if number not in cache:
            cache.clear()
            # TPE keeps no state but its random generator; it reads the history from the study.
            cache[number] = TPESampler(
                seed=(seed * 100_003 + number) % 2**32,
                multivariate=True,
                n_startup_trials=8,
                constant_liar=True,
            )
        return cache[number]

    class TrialSeeded(BaseSampler):
        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            if trial.number < len(seeds):
                return {}
            return base(trial.number).infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
            if trial.number < len(seeds):
                return {}
            return base(trial.number).sample_relative(study, trial, search_space)

        def sample_independent(
            self, study: Any, trial: Any, param_name: str, param_distribution: Any
        ) -> Any:
            if trial.number < len(seeds):
                return seeds[trial.number][param_name]
            return base(trial.number).sample_independent(
                study, trial, param_name, param_distribution
            )

        def before_trial(self, study: Any, trial: Any) -> None:
            base(trial.number).before_trial(study, trial)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            base(trial.number).after_trial(study, trial, state, values)

    return TrialSeeded()


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's completed trials, in trial order."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def run_trials(
    study: optuna.Study,
    space: SearchSpace,
    evaluate: Callable[[EditParams], dict[str, float]],
    n_trials: int,
    seed: int = 0,
) -> None:
    """Run trials until ``n_trials`` are complete in the study (from any worker)."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    fail_dead_trials(study)
    study.sampler = trial_seeded_sampler(space.seed_params(), seed)
    remaining = n_trials - len(completed(study))
    if remaining <= 0:
        log.info("the study already has %d completed trials", len(completed(study)))
        return
    log.info("running %d trial(s) (%d already completed)", remaining, len(completed(study)))
    worker = _worker_id()
    interrupted = False

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        nonlocal interrupted
        trial.set_user_attr("worker", worker)
        try:
            values = evaluate(space.suggest(trial))
        except KeyboardInterrupt:
            interrupted = True
            raise
        for key, value in values.items():
            trial.set_user_attr(key, value)
        log.info(
            "trial %d: refusal prob %.3f, KL %.4f",
            trial.number,
            values["refusal_prob"],
            values["kl"],
        )
        return values["refusal_prob"], values["kl"]

    # Optuna logs a trial stopped by Ctrl-C as failed, with a traceback, before re-raising the
    # interrupt; the CLI reports the interrupt in one line, and the study keeps its finished
    # trials (the interrupted one is marked failed), so those records are dropped.
    optuna_log = logging.getLogger("optuna.study._optimize")

    def hide_interrupt(_record: logging.LogRecord) -> bool:
        return not interrupted

    optuna_log.addFilter(hide_interrupt)
    try:
        study.optimize(
            objective,
            n_trials=remaining,
            callbacks=[MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,))],
            gc_after_trial=False,
            show_progress_bar=False,
        )
    finally:
        optuna_log.removeFilter(hide_interrupt)
