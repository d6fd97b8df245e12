"""The configs of the composable-alignment commands: ``direction`` (and ``direction combine``),
``steer`` and ``detox``, built from the option groups of :mod:`abliterate.config.groups`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator
from pydantic_settings import CliPositionalArg

from abliterate.config.groups import (
    BaselineCacheOptions,
    EvalOptions,
    EvalPromptOptions,
    ModelOptions,
    Options,
    OutputOptions,
    ThinkingOptions,
)
from abliterate.config.values import (
    Count,
    FiniteFloat,
    Indices,
    PathOption,
    Strengths,
    Text,
    check_judges,
    problem,
)
from abliterate.errors import ConfigError
from abliterate.types import Site, Thinking


class JudgeOption(Options):
    """The refusal judges of a command that judges answers."""

    judge: Annotated[Text, AfterValidator(check_judges)] = Field(
        "markers",
        description="Comma-separated refusal judges, as for 'abliterate evaluate' (markers, "
        "classifier:MODEL[#LABEL], llm:MODEL, llm:URL#NAME); the first decides.",
    )


class DirectionConfig(ModelOptions):
    """Configuration of ``abliterate direction``: a behaviour direction from two prompt sets."""

    positive: Text | None = Field(
        None,
        description="Prompts showing the behaviour the direction points to: a file (.txt, .jsonl, "
        ".json, .csv, .parquet), hf:ORG/NAME[:split[:column]] or builtin:NAME[:split] (built-in: "
        "harmful, harmless, terse, verbose). With a 'response' column, activations are read over "
        "the responses' tokens instead of at each prompt's last token.",
    )
    negative: Text | None = Field(
        None, description="Prompts showing the opposite behaviour (same forms as --positive)."
    )
    out: PathOption | None = Field(
        None, description="Direction-set file to write (.safetensors; the suffix is added)."
    )
    overwrite: bool = Field(False, description="Replace --out if it exists.")
    site: Site = Field(
        "post",
        description="Residual site the activations are read at: 'post' (each layer's output, "
        "where llama.cpp control vectors add), 'pre' or 'mid'.",
    )
    n_prompts: Count | None = Field(
        None, description="Cap on the prompts taken from each set (default: all of them)."
    )
    prompt_column: Text | None = Field(
        None, description="Column holding the prompt in .csv/.jsonl/.parquet files."
    )
    system_prompt: Text | None = Field(
        None, description="System prompt for the chat template (default: the template's own)."
    )
    batch_size: Count = Field(16, description="Prompts per forward pass.")
    thinking: Thinking = Field(
        "off",
        description="Reasoning models: 'on' formats both sets with the chat template's thinking "
        "switch on, as 'abliterate run --thinking on' formats the sets its directions come "
        "from: a bare prompt is read at its last token, where the model starts to reason, and a "
        "response is read as the model's whole output after such a prompt (so it should hold "
        "its reasoning block). 'off' turns the switch off and closes a reasoning block the "
        "template opens anyway: a prompt is read where the answer starts, a response follows an "
        "empty reasoning block. Templates with neither (most chat models) are not affected.",
    )

    def require_sets(self) -> None:
        """Raise :class:`ConfigError` unless --positive, --negative and --out are all given
        (they are optional fields only so that ``direction combine`` can do without them)."""
        missing = [f"--{n}" for n in ("positive", "negative", "out") if getattr(self, n) is None]
        if missing:
            raise ConfigError(
                f"abliterate direction needs {', '.join(missing)} (or use 'abliterate direction "
                "combine' to combine saved directions)."
            )


class DirectionCombineConfig(Options):
    """Configuration of ``abliterate direction combine``: arithmetic on saved direction sets."""

    expression: CliPositionalArg[Text] = Field(
        description="Sum of terms separated by ' + ' or ' - ' (spaces around the operator), each "
        "a direction-set file optionally scaled as NUMBER*FILE, e.g. "
        "'2*terse.safetensors - refusal.safetensors'. Put an expression that starts with a "
        "minus sign after '--'.",
    )
    out: PathOption = Field(description="Direction-set file to write (.safetensors).")
    normalize: bool = Field(False, description="Scale every layer's vector to unit length.")
    layers: Indices = Field((), description="Keep only these layers (default: all).")
    description: Text | None = Field(
        None, description="What the result means (default: the expression)."
    )
    overwrite: bool = Field(False, description="Replace --out if it exists.")


def _refuse_quantized(config: ModelOptions, change: str) -> None:
    """Commands that change full-precision weights cannot run on a --load-in model."""
    if config.load_in is not None:
        raise problem(
            f"{change} the model's full-precision weights, which a --load-in {config.load_in} "
            "model does not hold; load it unquantized (--device-map auto spreads it over the "
            "devices)."
        )


class _EditAndMeasure(
    OutputOptions,
    BaselineCacheOptions,
    EvalOptions,
    ThinkingOptions,
    EvalPromptOptions,
    JudgeOption,
    ModelOptions,
):
    """The options of a command that edits a model and evaluates it before and after (``steer``,
    ``detox``): the model, judges, evaluation prompts and answers, reasoning, baseline cache and
    output."""


class SteerConfig(_EditAndMeasure):
    """Configuration of ``abliterate steer``: add (or remove) a direction, sweep its strength,
    evaluate, and export it as an edit, a llama.cpp control vector and optionally a model."""

    direction: PathOption = Field(
        description="Direction set from 'abliterate direction' (or 'direction combine'), or a "
        "run's direction.safetensors (its refusal direction, added at its own layer and scale).",
    )
    strength: FiniteFloat = Field(
        1.0,
        description="Multiplier of the direction's vectors for the evaluated and exported edit "
        "(0: no change; negative: the opposite behaviour; with --remove, the ablation strength).",
    )
    layers: Indices = Field(
        (), description="Layers to steer (default: every layer of the direction set)."
    )
    remove: bool = Field(
        False,
        description="Remove each chosen layer's direction from that layer's residual writers "
        "(directional ablation) instead of adding it.",
    )
    sweep: Strengths = Field(
        (),
        description="Strengths at which to measure --metric on the metric prompts (with a plot of "
        "the metric against strength), e.g. -4 -2 0 2 4.",
    )
    metric: Literal["length", "refusal"] = Field(
        "length",
        description="What the sweep measures: 'length' (mean words per answer) or 'refusal' "
        "(share of answers the first judge counts as refusals).",
    )
    metric_prompts: Text | None = Field(
        None,
        description="Prompts the metric is measured on (any prompt-set form). Default: the "
        "built-in harmless eval split.",
    )
    n_metric: Count | None = Field(
        None, description="Cap on the metric prompts (default: all of them)."
    )
    over_refusal: Text | None = Field(
        None,
        description="Harmless but sensitive-sounding prompts for the over-refusal rate. Default: "
        "the built-in over-refusal set.",
    )
    edit: PathOption | None = Field(
        None,
        description="Apply this edit first (a run directory, or any directory with "
        "edit_spec.json): the steering is measured and exported on top of it.",
    )
    control_vector: bool = Field(
        True,
        description="Also write OUT/control_vector.gguf for llama.cpp's --control-vector (when "
        "the steering adds at layer outputs).",
    )
    save_model: bool = Field(
        False,
        description="Bake the steering into the weights and write OUT/model (refused, with the "
        "reason, for families whose config cannot declare the output biases it needs).",
    )
    out: PathOption = Field(Path("runs/steer"), description="Run directory to create.")
    batch_size: Count = Field(32, description="Prompts per forward pass or generation batch.")

    @model_validator(mode="after")
    def _full_precision(self) -> SteerConfig:
        _refuse_quantized(self, "steer bakes the steering into")
        return self


class DetoxConfig(_EditAndMeasure):
    """Configuration of ``abliterate detox``: DINM detoxification by knowledge editing."""

    instances: Text | None = Field(
        None,
        description="Detox instances: a .jsonl file (fields id, category, question, prompt, "
        "safe, unsafe, knowledge_prompt, knowledge_answer) or SafeEdit's .json. Default: the "
        "built-in set (builtin:detox, 24 instances).",
    )
    n_instances: Count | None = Field(None, description="Use only the first N instances.")
    edit: PathOption | None = Field(
        None,
        description="Apply this edit first (an abliteration run directory, or any directory with "
        "edit_spec.json); the detox is learned on top of it and saved composed with it.",
    )
    mode: Literal["sequence", "batch"] = Field(
        "sequence",
        description="'sequence': locate and tune each instance in turn on the model edited so "
        "far; 'batch': locate every instance, then tune all located layers on the whole batch.",
    )
    distance: Literal["relative", "euclidean"] = Field(
        "relative",
        description="Distance that locates the toxic layer between the mean states of the safe "
        "and the unsafe answer: 'relative' divides the Euclidean distance by the layer's state "
        "norm (depths compare fairly); 'euclidean' is the paper's, which the residual stream's "
        "growth with depth pulls to the last layer.",
    )
    locate_layers: Indices = Field(
        (),
        description="Layers the toxic layer is searched in (default: all but the first and the "
        "last).",
    )
    steps: Count = Field(10, description="Adam steps per instance (per batch in batch mode).")
    # 5e-5, not the paper's 1e-4: with the guard, on the demo model's optimize edit (8
    # instances), refusals came back nearly as far (75.0% vs 77.8% of 72 held-out harmful
    # prompts) at a lower first-token KL to the original (0.083 vs 0.108): README, "Composing
    # alignment on the demo model".
    lr: FiniteFloat = Field(5e-5, gt=0, description="Adam learning rate.")
    kl_weight: FiniteFloat = Field(
        1.0,
        ge=0,
        description="Weight of the KL term that keeps the general-knowledge answer's next-token "
        "distributions.",
    )
    guard: Text | None = Field(
        None,
        description="Harmless prompts whose answers every DINM step holds in place (KL to "
        "MODEL as given, before --edit, over its own greedy answers, weighted by --kl-weight), "
        "so the "
        "edit does not teach every prompt to refuse. Default: the built-in harmless validation "
        "split (real instruction styles, like the evaluation's but disjoint from it; never the "
        "eval split).",
    )
    n_guard: int = Field(
        32, ge=0, description="Guard prompts (0: no guard, the paper's loss alone)."
    )
    guard_tokens: Count = Field(4, description="Tokens of each guard prompt's reference answer.")
    guard_batch: Count = Field(
        2, description="Guard prompts per Adam step (the guard set is cycled through)."
    )
    safeedit: bool = Field(
        True,
        description="Run the SafeEdit-style evaluation (defense success and generalization, "
        "fluency, general-knowledge accuracy) on the model before and after.",
    )
    other_questions: Text | None = Field(
        None,
        description="Held-out harmful questions for the generalization tests. Default: the "
        "built-in harmful eval split.",
    )
    n_knowledge: Count | None = Field(
        None, description="Cap on the general-knowledge questions (default: all 60)."
    )
    over_refusal: Text | None = Field(
        None,
        description="Harmless but sensitive-sounding prompts for the over-refusal rate. Default: "
        "the built-in over-refusal set.",
    )
    save_model: bool = Field(True, description="Write the detoxified model to OUT/model.")
    out: PathOption = Field(Path("runs/detox"), description="Run directory to create.")
    batch_size: Count = Field(32, description="Prompts per forward pass or generation batch.")

    @model_validator(mode="after")
    def _full_precision(self) -> DetoxConfig:
        _refuse_quantized(self, "detox tunes")
        return self
