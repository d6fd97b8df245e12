"""The ``abliterate`` command line: a thin layer over the library.

The parser is generated from the typed configs by pydantic-settings (``CliSettingsSource``):
one subcommand per config class, one kebab-case option per field with its help text and
default, ``--flag/--no-flag`` for booleans, positionals where a field is marked so, and lists
given as ``--sites pre mid`` or ``--sites pre,mid``. The parsed values, a ``--config FILE`` and
``ABLITERATE_<OPTION>`` environment variables are layered and validated by
:func:`abliterate.config.load_config`, then the command's library function runs with the
resolved config. Heavy libraries are imported inside the commands, so ``abliterate --help``
returns at once. Expected errors (:class:`AbliterateError`), bad options included, print one
line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, create_model
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    CliSubCommand,
    CliToggleFlag,
    SettingsError,
)

from abliterate import __version__
from abliterate.config import (
    ApplyConfig,
    ChatConfig,
    DetoxConfig,
    DirectionCombineConfig,
    DirectionConfig,
    EvaluateConfig,
    FilterDatasetConfig,
    HealConfig,
    OptimizeConfig,
    Options,
    PushConfig,
    ReportConfig,
    RunConfig,
    SftConfig,
    SteerConfig,
    load_config,
    option_name,
)
from abliterate.config.messages import oneline
from abliterate.errors import AbliterateError, ConfigError

EXIT_USER_ERROR = 2


def _cmd_run(config: RunConfig, inputs: Sequence[Path]) -> int:
    from abliterate.commands.run import run

    run(config, extra_inputs=inputs)
    return 0


def _cmd_evaluate(config: EvaluateConfig, inputs: Sequence[Path]) -> int:
    from abliterate.commands.evaluate import evaluate

    evaluate(config, extra_inputs=inputs)
    return 0


def _cmd_chat(config: ChatConfig, _inputs: Sequence[Path]) -> int:
    from abliterate.commands.chat import chat

    # Live columns need a terminal on both ends; pipes get plain sequential text. A closed
    # stream (`<&-`) is None here.
    interactive = (
        sys.stdin is not None
        and sys.stdout is not None
        and sys.stdin.isatty()
        and sys.stdout.isatty()
    )
    return chat(config, interactive=interactive)


def _cmd_direction(config: DirectionConfig, inputs: Sequence[Path]) -> int:
    from abliterate.commands.direction import direction

    direction(config, extra_inputs=inputs)
    return 0


def _cmd_direction_combine(config: DirectionCombineConfig, inputs: Sequence[Path]) -> int:
    from abliterate.commands.direction import combine

    combine(config, extra_inputs=inputs)
    return 0


def _cmd_steer(config: SteerConfig, inputs: Sequence[Path]) -> int:
    from abliterate.commands.steer import steer

    steer(config, extra_inputs=inputs)
    return 0


def _cmd_detox(config: DetoxConfig, inputs: Sequence[Path]) -> int:
    from abliterate.commands.detox import detox

    detox(config, extra_inputs=inputs)
    return 0


def _cmd_apply(config: ApplyConfig, _inputs: Sequence[Path]) -> int:
    from abliterate.commands.apply import apply

    apply(config)
    return 0


def _cmd_push(config: PushConfig, _inputs: Sequence[Path]) -> int:
    from abliterate.commands.push import push

    push(config)
    return 0


def _cmd_filter_dataset(config: FilterDatasetConfig, _inputs: Sequence[Path]) -> int:
    from abliterate.commands.filter_dataset import filter_dataset

    filter_dataset(config)
    return 0


def _cmd_sft(config: SftConfig, _inputs: Sequence[Path]) -> int:
    from abliterate.commands.sft import sft

    sft(config)
    return 0


def _cmd_heal(config: HealConfig, _inputs: Sequence[Path]) -> int:
    from abliterate.commands.heal import heal

    heal(config)
    return 0


def _cmd_report(config: ReportConfig, _inputs: Sequence[Path]) -> int:
    from abliterate.report.html import write_run_report

    print(f"Wrote {write_run_report(config.run)}")
    return 0


@dataclass(frozen=True)
class Command:
    """A subcommand: its config class, the function that runs it, its one-paragraph help, and
    the commands nested under it (``direction combine``), which take their own options."""

    config: type[Options]
    # Runs the command with its config and the files the command line read besides the
    # config's own inputs (the --config file), which outputs must not overwrite.
    func: Callable[[Any, Sequence[Path]], int]
    help: str
    subcommands: Mapping[str, Command] = field(default_factory=dict)


COMMANDS: dict[str, Command] = {
    "run": Command(
        RunConfig,
        _cmd_run,
        "Compute candidate refusal directions, select one automatically, remove it from the "
        "weights, evaluate before/after and export the edited model.",
    ),
    "optimize": Command(
        OptimizeConfig,
        _cmd_run,
        "Like 'run --optimize': search directions and per-layer strengths for the fewest "
        "refusals at the lowest KL (resumable Optuna study), confirm the Pareto front, then "
        "evaluate once on held-out prompts and export.",
    ),
    "evaluate": Command(
        EvaluateConfig,
        _cmd_evaluate,
        "Evaluate MODEL (optionally against --baseline BASE): refusal and over-refusal rates by "
        "one or more judges, KL divergences, reference cross-entropy, fluency and "
        "lm-evaluation-harness benchmarks.",
    ),
    "chat": Command(
        ChatConfig,
        _cmd_chat,
        "Chat in the terminal with an edited model and its original; their answers stream "
        "side by side.",
    ),
    "direction": Command(
        DirectionConfig,
        _cmd_direction,
        "Compute a behaviour direction per layer from two prompt sets (--positive minus "
        "--negative; read at the responses' tokens when the sets have responses) and save it as "
        "a direction set; 'direction combine' adds, subtracts, scales and normalizes saved sets.",
        {
            "combine": Command(
                DirectionCombineConfig,
                _cmd_direction_combine,
                "Combine saved direction sets: a sum of NUMBER*FILE terms, optionally normalized "
                "or restricted to some layers, saved as a new direction set.",
            )
        },
    ),
    "steer": Command(
        SteerConfig,
        _cmd_steer,
        "Steer MODEL with a direction (add it, or --remove it): measure a metric against "
        "strength (--sweep), evaluate the steered model against the unsteered one, and export "
        "the edit, a llama.cpp control vector and optionally the baked model.",
    ),
    "detox": Command(
        DetoxConfig,
        _cmd_detox,
        "Detoxify MODEL by knowledge editing (DINM): per instance, locate the toxic layer and "
        "tune its MLP output projection on a safe answer with a KL constraint; evaluate "
        "SafeEdit-style before and after, and save the learned weight delta and the model.",
    ),
    "apply": Command(
        ApplyConfig,
        _cmd_apply,
        "Apply a saved edit (a run, a direction, a .npy vector) to a model on disk, tensor by "
        "tensor: a safetensors checkpoint is streamed (memory of about one tensor, whatever the "
        "model's size) into an edited copy with its tokenizer, config and abliteration.json; a "
        ".gguf is edited in its own tensor types, and tensors it cannot requantize (K-quants, "
        "I-quants) get their edit as a GGUF LoRA adapter beside --out.",
    ),
    "push": Command(
        PushConfig,
        _cmd_push,
        "Upload a run's edited model (or LoRA adapter) and further exports to a hub repository, "
        "with a generated model card and the SHA-256 of every weight file.",
    ),
    "filter-dataset": Command(
        FilterDatasetConfig,
        _cmd_filter_dataset,
        "Keep the rows of an instruction dataset (alpaca, ShareGPT or chat messages; JSONL, JSON, "
        "parquet or hub) whose answers neither refuse nor moralize, streaming; writes OUT in the "
        "input's format and OUT.report.json.",
    ),
    "sft": Command(
        SftConfig,
        _cmd_sft,
        "Supervised fine-tuning (TRL, LoRA/QLoRA or full) on a conversation dataset with loss on "
        "the answers only; saves the merged model and the adapter, evaluated before and after.",
    ),
    "heal": Command(
        HealConfig,
        _cmd_heal,
        "Heal an abliterated model (LoRA/QLoRA): by default by self-distillation on pairs built "
        "from the run (the original's next-token distributions on harmless prompts, the "
        "abliterated model's own on harmful ones), or with DPO (TRL); evaluated before and after "
        "against the original.",
    ),
    "report": Command(
        ReportConfig,
        _cmd_report,
        "Re-render a run's report.html and plots/ from its report.json and scores.json (for "
        "runs made by older versions, or after editing the JSON).",
    ),
}

_SOURCES = (
    "Each option can also be set in a --config file (TOML or JSON, keys spelled like the "
    "options: n_train = 64) or an environment variable ABLITERATE_<OPTION> (ABLITERATE_N_TRAIN=64)"
    "; the environment overrides the file and the command line overrides both."
)


class CommandLineOptions(BaseModel):
    """Options of every subcommand that are not part of its configuration."""

    config: Path | None = Field(
        None,
        description="TOML or JSON file of options (environment variables and command-line "
        "options override it).",
    )
    verbose: bool = Field(False, description="Log progress details.")


class _Root(BaseSettings):
    """Edit the alignment behaviour of open-weight chat models without retraining."""

    version: CliToggleFlag[bool] = Field(False, description="Show the version and exit.")


@cache
def _root_model() -> type[BaseSettings]:
    """The CLI's model: one subcommand field per command, each with the command's options."""
    return create_model("abliterate", __base__=_Root, __doc__=_Root.__doc__,
                        **_command_fields(COMMANDS, "abliterate"))  # fmt: skip


def _command_fields(commands: Mapping[str, Command], prefix: str) -> dict[str, Any]:
    """One subcommand field per command, each with its options and its own subcommands."""
    subcommand: Any = CliSubCommand  # applied to classes built at run time
    fields: dict[str, Any] = {}
    for name, command in commands.items():
        options = create_model(
            f"{prefix} {name}",
            __base__=(command.config, CommandLineOptions),
            __doc__=f"{command.help}\n\n{_SOURCES}",
            **_command_fields(command.subcommands, f"{prefix} {name}"),
        )
        fields[name] = (subcommand[options], Field(description=command.help))
    return fields


def _parser_source() -> CliSettingsSource[argparse.ArgumentParser]:
    return CliSettingsSource(
        _root_model(),
        cli_prog_name="abliterate",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_exit_on_error=False,
        cli_shortcuts={"verbose": "v"},
        formatter_class=argparse.HelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    """The generated argument parser with every subcommand (for help text and introspection;
    :func:`parse_command` is what turns a command line into a config)."""
    return _parser_source().root_parser


@dataclass(frozen=True)
class Invocation:
    """A parsed command line: the command, its resolved config, and the logging level."""

    command: str
    config: Options
    verbose: bool = False
    config_file: Path | None = None


def _flags(model: type[Options]) -> list[str]:
    names = [*model.model_fields, *CommandLineOptions.model_fields]
    flags = [option_name(model, n) for n in names if option_name(model, n).startswith("--")]
    return flags + ["--no-" + f[2:] for f in flags]


def _parse_error(message: str, argv: Sequence[str]) -> str:
    """The parser's complaint, made to name the option (and suggest one for a typo)."""
    # argparse quotes the user's tokens as typed, control characters included.
    message = oneline(message.removeprefix("error parsing CLI: "))
    unparsable = re.match(r"Parsing error encountered for \S*?(\w+): (.*)", message)
    if unparsable:
        name, why = unparsable.groups()
        return f"--{name.replace('_', '-')} (command line) could not be parsed: {why}"
    unknown = re.match(r"unrecognized arguments: (\S+)", message)
    command = next((a for a in argv if a in COMMANDS), None)
    if unknown is None or command is None:
        return message
    flags, typed = _flags(COMMANDS[command].config), unknown.group(1).split("=")[0]
    # A unique prefix is the likeliest intent (--trust), then the closest spelling (--n-trian).
    close = [f for f in flags if f.startswith(typed)] if typed.startswith("--") else []
    close = close if len(close) == 1 else difflib.get_close_matches(typed, flags, n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; see abliterate {command} --help."
    return f"{message}{hint}"


def parse_command(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Invocation:
    """Parse a command line into the command and its config (``environ``: the variables to read
    ``ABLITERATE_<OPTION>`` from; ``None`` reads none).

    Raises:
        ConfigError: a malformed command line or any invalid option value, in one line.
        SystemExit: ``--help`` or ``--version`` printed what was asked (status 0).
    """
    try:
        parsed = _parser_source()(args=list(argv))()
    except SettingsError as exc:
        raise ConfigError(_parse_error(str(exc), argv)) from exc
    if parsed.get("version"):
        print(f"abliterate {__version__}")
        raise SystemExit(0)
    name = next((n for n in COMMANDS if parsed.get(n) is not None), None)
    if name is None:
        raise ConfigError(
            f"choose a command: {', '.join(COMMANDS)} (abliterate --help describes them)."
        )
    command, values = COMMANDS[name], dict(parsed[name])
    for sub, nested in command.subcommands.items():
        chosen = values.pop(sub, None)
        if chosen is not None:
            name, command, values = f"{name} {sub}", nested, dict(chosen)
            break
    extra = CommandLineOptions(
        config=values.pop("config", None), verbose=values.pop("verbose", False)
    )
    config = load_config(
        command.config, command_line=values, config_file=extra.config, environ=environ
    )
    return Invocation(name, config, extra.verbose, extra.config)


def command_of(name: str) -> Command:
    """The command called ``name`` (``"direction combine"`` for a nested one)."""
    head, _, sub = name.partition(" ")
    return COMMANDS[head].subcommands[sub] if sub else COMMANDS[head]


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
    argv = sys.argv[1:] if argv is None else list(argv)
    # `kill` sends SIGTERM, which would end Python without unwinding; turn it into SystemExit so
    # that context managers run (hooks removed, partial run directories deleted).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        invocation = parse_command(argv, os.environ)
        _configure_logging(invocation.verbose)
        inputs = [invocation.config_file] if invocation.config_file is not None else []
        return int(command_of(invocation.command).func(invocation.config, inputs))
    except AbliterateError as exc:
        # One line, whatever the message holds (a path or a value may carry a newline).
        print(f"abliterate: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("abliterate: interrupted; no output was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
