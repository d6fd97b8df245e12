"""The ``abliterate`` command line: a thin layer over the library.

Each subcommand builds its typed config (defaults < ``--config FILE`` < command-line options)
and calls the library function of the same name. Heavy libraries are imported inside the
commands, so ``abliterate --help`` returns at once. Expected errors (:class:`AbliterateError`)
print one line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from abliterate import __version__
from abliterate.config import (
    ChatConfig,
    EvaluateConfig,
    OptimizeConfig,
    ReportConfig,
    RunConfig,
    add_arguments,
    from_sources,
    read_config_file,
)
from abliterate.errors import AbliterateError

EXIT_USER_ERROR = 2


def _cmd_run(args: argparse.Namespace) -> int:
    from abliterate.commands.run import run

    config = _build(RunConfig, args)
    run(config)
    return 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    from abliterate.commands.run import run

    run(_build(OptimizeConfig, args))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from abliterate.commands.evaluate import evaluate

    config = _build(EvaluateConfig, args)
    evaluate(config)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from abliterate.commands.chat import chat

    config = _build(ChatConfig, args)
    # Live columns need a terminal on both ends; pipes get plain sequential text.
    return chat(config, interactive=sys.stdin.isatty() and sys.stdout.isatty())


def _cmd_report(args: argparse.Namespace) -> int:
    from abliterate.report.html import write_run_report

    config = _build(ReportConfig, args)
    print(f"Wrote {write_run_report(config.run)}")
    return 0


def _build(cls: type[Any], args: argparse.Namespace) -> Any:
    values = {k: v for k, v in vars(args).items() if k not in ("func", "config", "verbose")}
    file_values = read_config_file(args.config) if args.config else {}
    return from_sources(cls, file_values, values)


COMMANDS: dict[str, tuple[type[Any], Callable[[argparse.Namespace], int], str]] = {
    "run": (
        RunConfig,
        _cmd_run,
        "Compute candidate refusal directions, select one automatically, remove it from the "
        "weights, evaluate before/after and export the edited model.",
    ),
    "optimize": (
        OptimizeConfig,
        _cmd_optimize,
        "Like 'run --optimize': search directions and per-layer strengths for the fewest "
        "refusals at the lowest KL (resumable Optuna study), confirm the Pareto front, then "
        "evaluate once on held-out prompts and export.",
    ),
    "evaluate": (
        EvaluateConfig,
        _cmd_evaluate,
        "Evaluate MODEL (optionally against --baseline BASE): refusal and over-refusal rates by "
        "one or more judges, KL divergences, reference cross-entropy, fluency and "
        "lm-evaluation-harness benchmarks.",
    ),
    "chat": (
        ChatConfig,
        _cmd_chat,
        "Chat in the terminal with an edited model and its original; their answers stream "
        "side by side.",
    ),
    "report": (
        ReportConfig,
        _cmd_report,
        "Re-render a run's report.html and plots/ from its report.json and scores.json (for "
        "runs made by older versions, or after editing the JSON).",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="abliterate",
        description="Edit the alignment behaviour of open-weight chat models without retraining.",
    )
    parser.add_argument("--version", action="version", version=f"abliterate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (cls, func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--config",
            type=Path,
            metavar="FILE",
            help="TOML or JSON file of options (command-line options override it).",
        )
        p.add_argument("-v", "--verbose", action="store_true", help="Log progress details.")
        add_arguments(p, cls)
        p.set_defaults(func=func)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (not at set-up)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    print("abliterate: terminated; no output was written.", file=sys.stderr)
    raise SystemExit(128 + signum)


def _configure_logging(verbose: bool) -> None:
    # Stage progress is logged at INFO by default; -v adds debugging details.
    logger = logging.getLogger("abliterate")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``abliterate`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    # `kill` sends SIGTERM, which would end Python without unwinding; turn it into SystemExit so
    # that context managers run (hooks removed, partial run directories deleted).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return int(args.func(args))
    except AbliterateError as exc:
        print(f"abliterate: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("abliterate: interrupted; no output was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
