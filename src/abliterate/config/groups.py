"""The option groups that several commands share, and :class:`Options`, the base of every
group and command config (the groups of selection and search are in
:mod:`abliterate.config.search`, the command configs in :mod:`abliterate.config.commands`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from abliterate.config.messages import describe_errors
from abliterate.config.values import (
    Count,
    DeviceMap,
    FiniteFloat,
    Indices,
    MaxMemory,
    Names,
    PathOption,
    Text,
    parse_device_map,
    parse_max_memory,
    problem,
)
from abliterate.errors import ConfigError
from abliterate.types import DType, LoadIn, Thinking

S = TypeVar("S", bound="Options")


class Options(BaseModel):
    """Base of every option group and command config: immutable, unknown names rejected, and
    pydantic's errors raised as :class:`ConfigError` with one line of text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **values: Any) -> None:
        """Validate ``values``; raise :class:`ConfigError` naming the first bad option."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(describe_errors(exc, type(self))) from exc

    def section(self, group: type[S]) -> S:
        """The options of ``group`` (one this config inherits) as an instance of it.

        ``run_config.section(SearchOptions)`` is the whole search section, for the code that
        searches; the values are this config's (its defaults included, where it overrides one).
        """
        if not isinstance(self, group):
            raise TypeError(f"{type(self).__name__} has no {group.__name__} section")
        return group(**{name: getattr(self, name) for name in group.model_fields})


class ModelOptions(Options):
    """Which model to load and how."""

    model: Text = Field(
        "demo",
        description="Model to edit: a hub id (ORG/NAME), a local directory with safetensors "
        "weights, a .gguf file, or 'demo' for the embedded Qwen2.5-Coder-0.5B-Instruct.",
    )
    revision: Text | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    device: Text = Field(
        "auto",
        description="Torch device: 'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1', "
        "'mps'.",
    )
    dtype: DType = Field(
        "auto",
        description="Weight dtype. 'auto' uses float32 on CPU and bfloat16 on accelerators.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow the model repository to run its own Python code. Off unless you trust "
        "it.",
    )
    device_map: DeviceMap | None = Field(
        None,
        description="Spread the model over several devices instead of --device: 'auto' (or "
        "'balanced', 'balanced_low_0', 'sequential': accelerate's strategies) or a JSON object "
        'from module names to devices, e.g. \'{"model.embed_tokens": 0, "model.layers": 1, '
        '"model.norm": 1, "lm_head": 1}\' (devices: GPU indices, cpu, disk).',
    )
    max_memory: MaxMemory | None = Field(
        None,
        description="Memory caps per device for --device-map, e.g. '0=20GiB,1=20GiB,cpu=60GiB' "
        "(GPU indices, cpu; sizes in GiB, MiB, GB, MB).",
    )
    load_in: LoadIn | None = Field(
        None,
        description="Measure and search on the model quantized to 4 or 8 bits with bitsandbytes "
        "(needs a CUDA GPU and abliterate[quant]); run then loads the full-precision weights on "
        "the CPU (or with --device-map), bakes the chosen edit there, and evaluates and exports "
        "that model, so no quantization error is exported.",
    )

    def placement(self) -> dict[str, Any]:
        """The :func:`~abliterate.model.loading.load_model` arguments that place the model:
        ``device_map``, ``max_memory`` (parsed) and ``load_in``."""
        return {
            "device_map": None if self.device_map is None else parse_device_map(self.device_map),
            "max_memory": None if self.max_memory is None else parse_max_memory(self.max_memory),
            "load_in": self.load_in,
        }

    @model_validator(mode="after")
    def _placement(self) -> ModelOptions:
        if self.max_memory is not None and self.device_map is None:
            raise problem("--max-memory caps what --device-map places; add --device-map auto.")
        if self.device_map is not None and self.device != "auto":
            raise problem(
                f"pass either --device {self.device} or --device-map {self.device_map}, not both "
                "(a device map places every module itself)."
            )
        return self


class ThinkingOptions(Options):
    """How reasoning ("thinking") models are prompted and given room to answer."""

    thinking: Thinking = Field(
        "off",
        description="Reasoning models: 'off' turns the chat template's thinking switch off (the "
        "enable_thinking or thinking variable, read from the template) and closes a reasoning "
        "block the template opens anyway, so the model answers at once; 'on' lets it reason, "
        "with --thinking-budget more tokens, judges read only the answer after the reasoning, "
        "and answers that never arrive are reported as unfinished. Directions are measured with "
        "the same switch; next-token scores always read the answer's first token. Templates "
        "with neither (most chat models) are not affected.",
    )
    thinking_budget: Count = Field(
        512,
        description="With --thinking on: tokens for the reasoning, generated on top of "
        "--max-new-tokens (and of the search's --confirm-tokens).",
    )

    @property
    def reasoning_budget(self) -> int:
        """Tokens generated for reasoning on top of an answer's: ``thinking_budget`` with
        thinking on, 0 with it off."""
        return self.thinking_budget if self.thinking == "on" else 0


class EvalPromptOptions(Options):
    """The held-out prompts a model is measured on, and how prompts are read and batched."""

    eval_harmful: Text | None = Field(
        None,
        description="Held-out harmful prompts for the refusal rate (file, or "
        "hf:ORG/NAME[:split[:column]]). Default: the built-in set's eval split.",
    )
    eval_harmless: Text | None = Field(
        None,
        description="Held-out harmless prompts for the KL divergences. Default: the built-in "
        "set's eval split.",
    )
    prompt_column: Text | None = Field(
        None,
        description="Column or field holding the prompt in .csv/.jsonl/.parquet files (default: "
        "detect prompt/instruction/goal/text/question).",
    )
    system_prompt: Text | None = Field(
        None, description="System prompt for the chat template (default: the template's own)."
    )
    n_eval: Count | None = Field(
        None,
        description="Cap on the evaluation prompts of each set (evaluate: harmful, harmless, "
        "over-refusal taken evenly across categories, reference answers); default: all of them. "
        "Use it to keep CPU runs short.",
    )
    batch_size: Count = Field(64, description="Prompts per forward pass or generation batch.")


class PromptOptions(EvalPromptOptions):
    """Where instructions come from (for computing directions too) and how many are used."""

    harmful: Text | None = Field(
        None,
        description="Harmful instructions for computing the direction (file, or "
        "hf:ORG/NAME[:split[:column]]). Default: the built-in set's train split.",
    )
    harmless: Text | None = Field(
        None,
        description="Harmless instructions for computing the direction. Default: built-in train "
        "split.",
    )
    n_train: Count = Field(
        128, description="Harmful and harmless prompts (each) to compute directions."
    )
    n_val: Count = Field(
        32, description="Harmful and harmless validation prompts (each) to select."
    )


class EvalOptions(Options):
    """How answers are generated and compared in the final evaluation."""

    # 128: refusals that follow a compliant opening ("Sure, here is ... However, I cannot") show
    # only in longer answers; with the baseline cache the original model pays it once.
    max_new_tokens: Count = Field(128, description="Tokens generated per evaluation prompt.")
    kl_tokens: Count = Field(
        16,
        description="Positions of the original model's own greedy continuation of each harmless "
        "prompt over which multi-token KL is averaged (first-token KL understates damage).",
    )
    n_examples: Annotated[int, Field(ge=0)] = Field(
        4, description="Side-by-side example completions shown in the report."
    )


class BaselineCacheOptions(Options):
    """Whether the unedited model's evaluation is reused between runs (``run``, ``evaluate``,
    ``steer`` and ``detox``)."""

    baseline_cache: bool = Field(
        True,
        description="Reuse the unedited model's evaluation (its judged answers and its "
        "continuations of the harmless prompts) when the model's files, the prompts, the chat "
        "formatting, the judges and every generation setting match; otherwise measure it and "
        "store it. Entries live in the 'baselines' folder of the abliterate cache "
        "($ABLITERATE_CACHE, default ~/.cache/abliterate on Linux); deleting that folder clears "
        "them. --no-baseline-cache measures it again and stores nothing.",
    )


class OutputOptions(Options):
    """Where the run directory goes, and the seed that makes it reproducible."""

    out: PathOption = Field(Path("runs/latest"), description="Run directory to create.")
    overwrite: bool = Field(False, description="Replace the run directory if it exists.")
    # torch.manual_seed takes at most 64 bits; a larger seed would fail only after the model load.
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = Field(
        0, description="Random seed (used by torch; selection and generation are greedy)."
    )


class SteerHookOptions(Options):
    """Steering applied with hooks while a model answers (``chat``, ``evaluate``)."""

    steer: PathOption | None = Field(
        None,
        description="Steer the model while it runs (hooks; its weights are not changed): a "
        "direction set written by 'abliterate direction', or a run's direction.safetensors (the "
        "refusal direction, added back at its layer).",
    )
    strength: FiniteFloat = Field(
        1.0,
        description="Strength of --steer: the direction's vectors are multiplied by it (0: no "
        "change; negative: the opposite behaviour).",
    )
    steer_layers: Indices = Field(
        (), description="Layers --steer adds at (default: every layer of the direction set)."
    )


EXPORT_FORMATS = ("gguf:f16", "gguf:bf16", "gguf:q8_0", "gguf:f32", "lora", "lora-gguf")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_exports(values: tuple[str, ...]) -> tuple[str, ...]:
    bad = [v for v in values if v.lower() not in EXPORT_FORMATS]
    if bad:
        raise problem(f"unknown format {bad[0]!r}; choose from {', '.join(EXPORT_FORMATS)}")
    return tuple(v.lower() for v in values)


def _check_repo_id(value: str | None) -> str | None:
    if value is not None and not _REPO_ID.fullmatch(value):
        raise problem(f"must be a hub repository id ORG/NAME, got {value!r}")
    return value


RepoId = Annotated[Text, AfterValidator(_check_repo_id)]
"""A hub repository id ``ORG/NAME``."""


class ExportOptions(Options):
    """Further formats of the edited model, and its upload to the hub."""

    export: Annotated[Names, AfterValidator(_check_exports)] = Field(
        (),
        description="Further formats of the edited model, besides OUT/model: gguf:f16, "
        "gguf:bf16, gguf:q8_0, gguf:f32 (OUT/gguf/model-TYPE.gguf, for llama.cpp; its logits are "
        "checked against the evaluated model), lora (a PEFT LoRA adapter in OUT/adapter; plain "
        "edits only: a projection is exactly rank 1 per matrix), lora-gguf (that adapter also "
        "as a llama.cpp LoRA, OUT/adapter/adapter.gguf). Comma- or space-separated.",
    )
    push_to_hub: RepoId | None = Field(
        None,
        description="Upload the run's model (or adapter) with a generated model card to this hub "
        "repository (ORG/NAME) when the run succeeds; the token comes from huggingface_hub "
        "(HF_TOKEN or a stored login).",
    )


def to_dict(config: Options) -> dict[str, Any]:
    """The JSON-ready resolved configuration (paths as strings, tuples as lists), as stored in a
    run directory's ``config.json``; ``type(config)(**to_dict(config)) == config``."""
    return config.model_dump(mode="json")
