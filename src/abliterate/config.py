"""Typed configuration: one dataclass per command drives the Python API, the CLI and config files.

Each field carries its help text in ``metadata["help"]``. :func:`add_arguments` turns a config
class into argparse options (``n_train`` becomes ``--n-train``), :func:`from_sources` merges the
dataclass defaults, an optional TOML/JSON config file and the command line, in that order of
precedence, and the dataclass's ``__post_init__`` validates the result, so the API and the CLI
reject the same bad values with the same message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from abliterate.errors import ConfigError
from abliterate.types import SITES, DType, SearchDType, Site


def _help(text: str, *, positional: bool = False, **kwargs: Any) -> Any:
    """A dataclass field with help text (and an optional default or factory).

    ``positional=True`` makes the field a required positional argument on the command line
    (``abliterate evaluate MODEL``) instead of an ``--option``; the Python API and config files
    still name it like any other field.
    """
    return field(metadata={"help": text, "positional": positional}, **kwargs)


@dataclass
class ModelConfig:
    """Which model to load and how."""

    model: str = _help(
        "Model to edit: a hub id (ORG/NAME), a local directory with safetensors weights, a .gguf "
        "file, or 'demo' for the embedded Qwen2.5-Coder-0.5B-Instruct.",
        default="demo",
    )
    revision: str | None = _help("Hub revision (branch, tag or commit) to load.", default=None)
    device: str = _help(
        "Torch device: 'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1', 'mps'.",
        default="auto",
    )
    dtype: DType = _help(
        "Weight dtype. 'auto' uses float32 on CPU and bfloat16 on accelerators.", default="auto"
    )
    trust_remote_code: bool = _help(
        "Allow the model repository to run its own Python code. Off unless you trust it.",
        default=False,
    )


@dataclass
class PromptConfig:
    """Where instructions come from and how they are formatted."""

    harmful: str | None = _help(
        "Harmful instructions for computing the direction (file, or hf:ORG/NAME[:split[:column]]). "
        "Default: the built-in set's train split.",
        default=None,
    )
    harmless: str | None = _help(
        "Harmless instructions for computing the direction. Default: built-in train split.",
        default=None,
    )
    eval_harmful: str | None = _help(
        "Held-out harmful prompts for the final refusal rate. Default: built-in eval split.",
        default=None,
    )
    eval_harmless: str | None = _help(
        "Held-out harmless prompts for the final KL divergence. Default: built-in eval split.",
        default=None,
    )
    prompt_column: str | None = _help(
        "Column or field holding the prompt in .csv/.jsonl/.parquet files (default: detect "
        "prompt/instruction/goal/text/question).",
        default=None,
    )
    system_prompt: str | None = _help(
        "System prompt for the chat template (default: the template's own).", default=None
    )
    n_train: int = _help("Harmful and harmless prompts (each) to compute directions.", default=128)
    n_val: int = _help("Harmful and harmless validation prompts (each) to select.", default=32)
    n_eval: int | None = _help(
        "Cap on evaluation prompts of each kind (default: all of them).", default=None
    )
    batch_size: int = _help("Prompts per forward pass or generation batch.", default=64)


@dataclass
class SearchConfig:
    """How ``--optimize`` searches the edit space (see :mod:`abliterate.optimize`)."""

    optimize: bool = _help(
        "Search directions, per-layer strength profiles, projection and norm preservation with "
        "multi-objective Optuna (refusals vs. KL on validation prompts) instead of one "
        "full-strength direction.",
        default=False,
    )
    trials: int = _help(
        "Completed search trials to reach (a resumed study counts the trials it already has).",
        default=64,
    )
    storage: str | None = _help(
        "Optuna storage URL of the study (e.g. sqlite:///study.db, postgresql://...). Default: "
        "sqlite file OUT.study.db beside the run directory, which survives a killed run.",
        default=None,
    )
    study_name: str = _help(
        "Study name in the storage; workers sharing --storage and --study-name search together.",
        default="abliterate",
    )
    refusal_target: float = _help(
        "Judged refusal rate on harmful validation prompts that the chosen trial must reach; "
        "the lowest-KL Pareto trial at or below it is chosen.",
        default=0.05,
    )
    max_confirm: int = _help(
        "Most Pareto-front trials confirmed by generating and judging answers.", default=6
    )
    search_dtype: SearchDType = _help(
        "Precision the search scores trials in (its forward passes; confirmation generates with "
        "the model itself). 'auto': bfloat16 when the model is float32 and the device computes "
        "bfloat16 natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX: about 4x faster on "
        "the demo model), on a bfloat16 copy of the model; else the model's own dtype. 'model': "
        "never copy. The final evaluation and the exported model always use the model's dtype.",
        default="auto",
    )
    confirm_tokens: int = _help(
        "Tokens generated per harmful validation prompt when confirming a trial's refusal "
        "rate (refusals show in the opening: on the demo model 41 of 42 refusals are caught "
        "within 32 tokens); the final evaluation uses --max-new-tokens.",
        default=32,
    )
    max_directions: int = _help(
        "Let the search remove up to this many directions at once: the mean difference plus "
        "the top singular vectors of the per-prompt differences (each harmful prompt's "
        "activation minus the harmless mean) orthogonal to it. 1: the mean difference only.",
        default=1,
    )
    trial: int | None = _help(
        "Skip the automatic choice and use this trial number of the study.", default=None
    )


@dataclass
class RunConfig(SearchConfig, PromptConfig, ModelConfig):
    """Configuration of ``abliterate run``: compute, select, apply, evaluate and export."""

    out: Path = _help("Run directory to create.", default=Path("runs/latest"))
    overwrite: bool = _help("Replace the run directory if it exists.", default=False)
    sites: tuple[Site, ...] = _help(
        "Residual-stream sites at which candidate directions are taken.", default=SITES
    )
    kl_threshold: float = _help(
        "Selection prefers candidates whose validation first-token KL is at most this.",
        default=0.1,
    )
    prune_last_layers: float = _help(
        "Fraction of the last layers whose candidates are discarded (they tend to encode "
        "output tokens rather than the concept).",
        default=0.2,
    )
    n_screen: int = _help(
        "Prompts of each kind used to screen every candidate before the finalists are scored "
        "on the whole validation split.",
        default=8,
    )
    n_finalists: int = _help("Candidates re-scored on the whole validation split.", default=8)
    layer: int | None = _help(
        "Skip selection: use the direction of this layer (with --site).", default=None
    )
    direction: Path | None = _help(
        "Skip activations and selection: apply this saved direction (the direction.safetensors "
        "of an earlier run; its direction.json must sit beside it).",
        default=None,
    )
    site: Site = _help("Site used with --layer.", default="pre")
    strength: float = _help(
        "Ablation strength: 1 removes the direction, 0 leaves the model untouched.", default=1.0
    )
    max_new_tokens: int = _help("Tokens generated per evaluation prompt.", default=64)
    kl_tokens: int = _help(
        "Positions of the original model's own greedy continuation of each harmless prompt "
        "over which multi-token KL is averaged (first-token KL understates damage).",
        default=16,
    )
    n_examples: int = _help("Side-by-side example completions shown in the report.", default=4)
    save_model: bool = _help("Write the edited model to OUT/model.", default=True)
    seed: int = _help(
        "Random seed (used by torch; selection and generation are greedy).", default=0
    )

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.sites = tuple(self.sites)
        for name in (
            "n_train",
            "n_val",
            "batch_size",
            "max_new_tokens",
            "kl_tokens",
            "n_screen",
            "n_finalists",
            "trials",
            "max_confirm",
            "max_directions",
            "confirm_tokens",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.n_eval is not None and self.n_eval < 1:
            raise ConfigError(f"n_eval must be at least 1 or unset, got {self.n_eval}.")
        if not self.sites or any(s not in SITES for s in self.sites):
            raise ConfigError(f"sites must be a non-empty subset of {SITES}, got {self.sites}.")
        if not 0.0 <= self.prune_last_layers < 1.0:
            raise ConfigError(f"prune_last_layers must be in [0, 1), got {self.prune_last_layers}.")
        if self.kl_threshold <= 0:
            raise ConfigError(f"kl_threshold must be positive, got {self.kl_threshold}.")
        if self.site not in SITES:
            raise ConfigError(f"site must be one of {SITES}, got {self.site!r}.")
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"layer must be non-negative, got {self.layer}.")
        if self.direction is not None:
            self.direction = Path(self.direction)
            if self.layer is not None:
                raise ConfigError("pass either direction or layer, not both.")
        if not 0.0 <= self.refusal_target <= 1.0:
            raise ConfigError(f"refusal_target must be in [0, 1], got {self.refusal_target}.")
        if self.optimize and self.layer is not None:
            raise ConfigError("--layer fixes the direction; it cannot be combined with --optimize.")
        if self.trial is not None and not self.optimize:
            raise ConfigError("--trial picks a trial of an optimization study; add --optimize.")
        if self.n_examples < 0:
            raise ConfigError(f"n_examples must be non-negative, got {self.n_examples}.")


@dataclass
class ChatConfig(ModelConfig):
    """Configuration of ``abliterate chat``: an edited model and its original, side by side."""

    model: str = _help(
        "Model to chat with, usually an edited one: a run directory or its model/ folder, a "
        "local model directory, a hub id, a .gguf file or 'demo'.",
        positional=True,
    )
    baseline: str | None = _help(
        "Original model answering beside it (any MODEL form). Default: the base model recorded "
        "in MODEL's abliteration.json; without one, MODEL answers alone.",
        default=None,
    )
    system_prompt: str | None = _help(
        "System prompt for both models (default: the chat template's own).", default=None
    )
    max_new_tokens: int = _help("Longest answer, in tokens.", default=256)
    temperature: float | None = _help(
        "Sample at this temperature (default: greedy decoding, which is reproducible).",
        default=None,
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(
                f"temperature must be positive, got {self.temperature}; leave it unset for "
                "greedy decoding."
            )


@dataclass
class ReportConfig:
    """Configuration of ``abliterate report``: re-render a run's HTML report and plots."""

    run: Path = _help(
        "Run directory holding report.json (and scores.json, for per-layer plots).",
        positional=True,
    )

    def __post_init__(self) -> None:
        self.run = Path(self.run)


@dataclass
class EvaluateConfig(ModelConfig):
    """Configuration of ``abliterate evaluate``: measure a model, optionally against a baseline."""

    model: str = _help(
        "Model to evaluate: 'demo', a hub id (ORG/NAME), a local model directory (for example "
        "the model/ folder of a run) or a .gguf file.",
        default="demo",
        positional=True,
    )
    baseline: str | None = _help(
        "Baseline model to compare with (same forms as MODEL, same tokenizer). Needed for the "
        "KL divergences, which compare the two models' next-token distributions.",
        default=None,
    )
    out: Path = _help("Run directory to create.", default=Path("runs/evaluate"))
    overwrite: bool = _help("Replace the run directory if it exists.", default=False)
    eval_harmful: str | None = _help(
        "Harmful prompts for the refusal rate (file, or hf:ORG/NAME[:split[:column]]). "
        "Default: the built-in set's eval split.",
        default=None,
    )
    eval_harmless: str | None = _help(
        "Harmless prompts for the KL divergences. Default: the built-in set's eval split.",
        default=None,
    )
    over_refusal: str | None = _help(
        "Harmless but sensitive-sounding prompts for the over-refusal rate. Default: the "
        "built-in over-refusal set.",
        default=None,
    )
    prompt_column: str | None = _help(
        "Column or field holding the prompt in .csv/.jsonl/.parquet files (default: detect).",
        default=None,
    )
    system_prompt: str | None = _help(
        "System prompt for the chat template (default: the template's own).", default=None
    )
    n_eval: int | None = _help(
        "Cap on the prompts of each set (harmful, harmless, over-refusal, reference answers; "
        "over-refusal prompts are taken evenly across categories); default: all of them. Use "
        "it to keep CPU runs short.",
        default=None,
    )
    judge: str = _help(
        "Comma-separated refusal judges; the first one decides each completion's 'refused', all "
        "are reported with their pairwise agreement. 'markers': refusal phrases; "
        "'classifier:MODEL[#LABEL]': a local or hub sequence-classification model, LABEL being "
        "its label that means refusal (detected when it contains 'refus' or 'reject'); "
        "'llm:MODEL': a local chat model (load_model forms) asked a fixed yes/no question; "
        "'llm:http(s)://HOST/v1#NAME': an OpenAI-compatible endpoint serving model NAME, API "
        "key from $ABLITERATE_JUDGE_API_KEY. Example: markers,classifier:ORG/NAME,llm:demo.",
        default="markers",
    )
    benchmarks: tuple[str, ...] = _help(
        "lm-evaluation-harness tasks (needs abliterate[eval]): the built-in offline tasks "
        "abliterate_general_knowledge and abliterate_arithmetic, or any lm-eval task name "
        "(hub datasets need network). Comma- or space-separated.",
        default=(),
    )
    benchmark_limit: int | None = _help(
        "Cap on the items of each benchmark task (default: all of them).", default=None
    )
    batch_size: int = _help("Prompts per forward pass.", default=32)
    max_new_tokens: int = _help("Tokens generated per evaluation prompt.", default=64)
    kl_tokens: int = _help(
        "Positions of the baseline's own greedy continuation of each harmless prompt over "
        "which multi-token KL is averaged.",
        default=16,
    )
    n_examples: int = _help("Side-by-side example completions shown in the report.", default=4)
    seed: int = _help("Random seed (generation is greedy).", default=0)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if isinstance(self.benchmarks, str):
            self.benchmarks = (self.benchmarks,)
        self.benchmarks = tuple(
            name.strip() for item in self.benchmarks for name in item.split(",") if name.strip()
        )
        for name in ("batch_size", "max_new_tokens", "kl_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("n_eval", "benchmark_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1 or unset, got {value}.")
        if not self.judge.strip():
            raise ConfigError("judge must name at least one judge, for example 'markers'.")
        if self.n_examples < 0:
            raise ConfigError(f"n_examples must be non-negative, got {self.n_examples}.")


@dataclass
class OptimizeConfig(RunConfig):
    """Configuration of ``abliterate optimize``: ``abliterate run --optimize``."""

    optimize: bool = _help("Search the edit space (always on for this command).", default=True)


C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (paths and tuples become strings and lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one ``--option`` per dataclass field of ``cls`` (defaults are left to the dataclass)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            if tp not in (str, Path):  # pragma: no cover - taught explicitly when needed
                raise TypeError(f"positional config field {f.name} must be a str or Path")
            parser.add_argument(f.name, type=tp, metavar=f.name.upper(), help=help_text)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, ()) and not isinstance(default, bool):
            shown = ",".join(default) if isinstance(default, tuple) else default
            help_text = f"{help_text} (default: {shown})"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = typing.get_args(tp)
        elif origin is tuple:
            (item,) = typing.get_args(tp)[:1]
            kwargs["nargs"] = "+"
            if typing.get_origin(item) is Literal:
                kwargs["choices"] = typing.get_args(item)
        elif tp in (int, float, str):
            kwargs["type"] = tp
            kwargs["metavar"] = f.name.upper() if tp is str else tp.__name__.upper()
        elif tp is Path:
            kwargs["type"] = Path
            kwargs["metavar"] = "PATH"
        else:  # pragma: no cover - a new field type must be taught here explicitly
            raise TypeError(f"unsupported config field type for {f.name}: {tp!r}")
        parser.add_argument(flag, dest=f.name, **kwargs)


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a ``.toml`` or ``.json`` config file into a dict of field values."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path} must end in .toml or .json.")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of option names and values.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def from_sources(cls: type[C], file_values: dict[str, Any], cli_values: dict[str, Any]) -> C:
    """Build ``cls`` from its defaults, then ``file_values``, then ``cli_values``."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(file_values) - names)
    if unknown:
        raise ConfigError(
            f"unknown option(s) in config file: {', '.join(unknown)}. "
            f"Known options: {', '.join(sorted(names))}."
        )
    values = {**file_values, **{k: v for k, v in cli_values.items() if k in names}}
    if "sites" in values:
        values["sites"] = tuple(values["sites"])
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
