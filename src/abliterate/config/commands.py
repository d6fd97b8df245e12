"""The configs of ``run``, ``optimize``, ``evaluate``, ``chat``, ``push``, ``report`` and
``apply``, built from the option groups (the configs of the other commands are in
:mod:`abliterate.config.alignment` and :mod:`abliterate.config.training`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator
from pydantic_settings import CliPositionalArg

from abliterate.config.groups import (
    BaselineCacheOptions,
    EvalOptions,
    EvalPromptOptions,
    ExportOptions,
    ModelOptions,
    Options,
    OutputOptions,
    PromptOptions,
    RepoId,
    SteerHookOptions,
    ThinkingOptions,
)
from abliterate.config.search import SearchOptions, SelectionOptions
from abliterate.config.values import (
    Count,
    FiniteFloat,
    Names,
    PathOption,
    Text,
    check_judges,
    check_temperature,
    problem,
)


# pydantic orders inherited fields from the last base to the first: this order lists the model
# options first, as in --help and config.json.
class RunConfig(
    ExportOptions,
    OutputOptions,
    BaselineCacheOptions,
    EvalOptions,
    ThinkingOptions,
    SelectionOptions,
    SearchOptions,
    PromptOptions,
    ModelOptions,
):
    """Configuration of ``abliterate run``: compute, select, apply, evaluate and export."""

    save_model: bool = Field(True, description="Write the edited model to OUT/model.")
    stream: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Layer-stream a model that does not fit in memory: activations, selection and "
        "search trials run one decoder layer at a time from the checkpoint (each layer read once "
        "per pass), the edit is written to OUT/model by streaming apply, and the evaluation runs "
        "with what does not fit offloaded to disk (accelerate; each generated token then reads "
        "the offloaded weights again, so it is slow). 'auto': on when the weights need more than "
        "0.8 times the memory available. Needs a local safetensors checkpoint or demo.",
    )

    @model_validator(mode="after")
    def _fixed_or_searched(self) -> RunConfig:
        if self.optimize and self.layer is not None:
            raise problem("--layer fixes the direction; it cannot be combined with --optimize.")
        if self.optimize and self.direction is not None:
            raise problem("pass either --direction or --optimize, not both.")
        # The site's direction is taken from the candidates, which exist only at --sites.
        if (self.optimize or self.layer is not None) and self.site not in self.sites:
            raise problem(
                f"--site {self.site} is not among --sites {' '.join(self.sites)}; add it to "
                "--sites or choose one of them."
            )
        if self.load_in is not None and self.search_dtype not in ("auto", "model"):
            raise problem(
                f"--search-dtype {self.search_dtype} would copy the {self.load_in} model into "
                "another precision; with --load-in leave it at auto."
            )
        return self


class OptimizeConfig(RunConfig):
    """Configuration of ``abliterate optimize``: ``abliterate run --optimize``."""

    optimize: bool = Field(True, description="Search the edit space (always on for this command).")


class EvaluateConfig(
    OutputOptions,
    BaselineCacheOptions,
    EvalOptions,
    ThinkingOptions,
    EvalPromptOptions,
    SteerHookOptions,
    ModelOptions,
):
    """Configuration of ``abliterate evaluate``: measure a model, optionally against a baseline."""

    model: CliPositionalArg[Text] = Field(
        "demo",
        description="Model to evaluate: 'demo', a hub id (ORG/NAME), a local model directory (for "
        "example the model/ folder of a run) or a .gguf file.",
    )
    baseline: Text | None = Field(
        None,
        description="Baseline model to compare with (same forms as MODEL, same tokenizer). Needed "
        "for the KL divergences, which compare the two models' next-token distributions.",
    )
    out: PathOption = Field(Path("runs/evaluate"), description="Run directory to create.")
    over_refusal: Text | None = Field(
        None,
        description="Harmless but sensitive-sounding prompts for the over-refusal rate. Default: "
        "the built-in over-refusal set.",
    )
    judge: Annotated[Text, AfterValidator(check_judges)] = Field(
        "markers",
        description="Comma-separated refusal judges; the first one decides each completion's "
        "'refused', all are reported with their pairwise agreement. 'markers': refusal phrases; "
        "'classifier:MODEL[#LABEL]': a local or hub sequence-classification model, LABEL being "
        "its label that means refusal (detected when it contains 'refus' or 'reject'); "
        "'llm:MODEL': a local chat model (load_model forms) asked a fixed yes/no question; "
        "'llm:http(s)://HOST/v1#NAME': an OpenAI-compatible endpoint serving model NAME, API key "
        "from $ABLITERATE_JUDGE_API_KEY. Example: markers,classifier:ORG/NAME,llm:demo.",
    )
    benchmarks: Names = Field(
        (),
        description="lm-evaluation-harness tasks (needs abliterate[eval]): the built-in offline "
        "tasks abliterate_general_knowledge and abliterate_arithmetic, or any lm-eval task name "
        "(hub datasets need network). Comma- or space-separated.",
    )
    benchmark_limit: Count | None = Field(
        None, description="Cap on the items of each benchmark task (default: all of them)."
    )
    batch_size: Count = Field(32, description="Prompts per forward pass.")


class ChatConfig(ThinkingOptions, SteerHookOptions, ModelOptions):
    """Configuration of ``abliterate chat``: an edited model and its original, side by side."""

    model: CliPositionalArg[Text] = Field(
        description="Model to chat with, usually an edited one: a run directory or its model/ "
        "folder, a local model directory, a hub id, a .gguf file or 'demo'.",
    )
    baseline: Text | None = Field(
        None,
        description="Original model answering beside it (any MODEL form). Default: the base model "
        "recorded in MODEL's abliteration.json; without one, MODEL answers alone.",
    )
    system_prompt: Text | None = Field(
        None, description="System prompt for both models (default: the chat template's own)."
    )
    max_new_tokens: Count = Field(256, description="Longest answer, in tokens.")
    temperature: Annotated[FiniteFloat | None, AfterValidator(check_temperature)] = Field(
        None,
        description="Sample at this temperature (default: greedy decoding, which is reproducible).",
    )


class PushConfig(Options):
    """Configuration of ``abliterate push``: upload a run's model or adapter with a model card."""

    run: CliPositionalArg[PathOption] = Field(
        description="Run directory (with report.json, abliteration.json and model/ or adapter/)."
    )
    repo: CliPositionalArg[RepoId] = Field(description="Hub repository ORG/NAME to upload to.")
    private: bool = Field(False, description="Create the repository as private.")
    dry_run: bool = Field(
        False, description="Print the model card and the planned uploads; upload nothing."
    )


class ReportConfig(Options):
    """Configuration of ``abliterate report``: re-render a run's HTML report and plots."""

    run: CliPositionalArg[PathOption] = Field(
        description="Run directory holding report.json (and scores.json, for per-layer plots).",
    )


WRITER_KINDS = ("embedding", "attention", "mlp")
"""Residual writers a plain direction can be removed from (``abliterate apply --writers``)."""


def _check_writers(names: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in WRITER_KINDS]
    if unknown:
        raise problem(f"must name writers among {', '.join(WRITER_KINDS)}, got {unknown[0]!r}")
    if not names:
        raise problem(f"must name at least one of {', '.join(WRITER_KINDS)}")
    return names


class ApplyConfig(Options):
    """Configuration of ``abliterate apply``: edit a model on disk, tensor by tensor."""

    direction: PathOption = Field(
        description="The edit to apply: a direction saved by the tool (direction.safetensors, "
        "its .json beside it), an edit saved by a run (its edit_spec.json, or the run directory "
        "itself), or a .npy vector of the model's hidden size (normalised to unit length).",
    )
    model: Text = Field(
        description="Model to edit: a local directory with safetensors weights (one "
        "model.safetensors, or shards listed in model.safetensors.index.json), 'demo', or a "
        ".gguf file (edited in its own tensor types; tensors of types the gguf package cannot "
        "requantize get their edit as a GGUF LoRA adapter beside --out). It is read, never "
        "changed.",
    )
    out: PathOption = Field(
        description="Directory the edited model is written to (built under a temporary name and "
        "renamed when complete); for a .gguf model, the edited .gguf file.",
    )
    overwrite: bool = Field(
        False, description="Replace --out (and a GGUF model's adapter) if it exists."
    )
    strength: FiniteFloat = Field(
        1.0,
        description="Ablation strength of a direction or .npy vector: 1 removes it, 0 changes "
        "nothing. An edit saved by a run carries its own strengths.",
    )
    writers: Annotated[Names, AfterValidator(_check_writers)] = Field(
        WRITER_KINDS,
        description="Residual writers a direction or .npy vector is removed from: 'embedding', "
        "'attention' (attention outputs and other token mixers) and 'mlp' (MLP outputs, every "
        "routed and shared expert). An edit saved by a run names its own.",
    )
