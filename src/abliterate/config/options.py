"""The option groups and the command configs built from them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import CliPositionalArg

from abliterate.config.messages import describe_errors
from abliterate.config.values import (
    Count,
    DeviceMap,
    FiniteFloat,
    Index,
    Indices,
    MaxMemory,
    Names,
    PathOption,
    Sites,
    Text,
    check_judges,
    check_temperature,
    parse_device_map,
    parse_max_memory,
    problem,
)
from abliterate.errors import ConfigError
from abliterate.types import SITES, DType, LoadIn, RefusalObjective, SearchDType, Site, Thinking

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


class SelectionOptions(Options):
    """Which candidate direction is removed, and how strongly (without ``--optimize``)."""

    sites: Sites = Field(
        SITES,
        description="Residual-stream sites at which candidate directions are taken "
        "(space- or comma-separated).",
    )
    kl_threshold: FiniteFloat = Field(
        0.1,
        gt=0,
        description="Selection prefers candidates whose validation first-token KL is at most this.",
    )
    prune_last_layers: FiniteFloat = Field(
        0.2,
        ge=0,
        lt=1,
        description="Fraction of the last layers whose candidates are discarded (they tend to "
        "encode output tokens rather than the concept).",
    )
    n_screen: Count = Field(
        8,
        description="Prompts of each kind used to screen every candidate before the finalists are "
        "scored on the whole validation split.",
    )
    n_finalists: Count = Field(8, description="Candidates re-scored on the whole validation split.")
    layer: Index | None = Field(
        None, description="Skip selection: use the direction of this layer (with --site)."
    )
    direction: PathOption | None = Field(
        None,
        description="Skip activations and selection: apply this saved direction (the "
        "direction.safetensors of an earlier run; its direction.json must sit beside it).",
    )
    site: Site = Field("pre", description="Site used with --layer.")
    strength: FiniteFloat = Field(
        1.0, description="Ablation strength: 1 removes the direction, 0 leaves the model untouched."
    )
    refusal_objective: RefusalObjective = Field(
        "next_token",
        description="What selection and search measure refusal by. 'next_token': the next-token "
        "probability of the first tokens of common refusal openings. 'openings': the probability "
        "that the answer opens with one of the model's own refusal openings (the most frequent "
        "openings of its judged refusals on the harmful validation prompts, teacher-forced over "
        "--opening-tokens tokens; finding them costs one short generation).",
    )
    refusal_openings: Count = Field(
        2,
        description="With --refusal-objective openings: how many of the model's own refusal "
        "openings the objective asks about.",
    )
    opening_tokens: Count = Field(
        4,
        description="Tokens of each refusal opening (teacher-forced after each harmful prompt).",
    )
    edits_per_pass: Count = Field(
        4,
        description="Candidate edits scored together in one forward pass (each on its own rows "
        "of the batch) by selection and search; 1 scores them one at a time.",
    )
    screen_halving: bool = Field(
        False,
        description="Screen candidates by successive halving: after each round on n prompts of "
        "each kind (from --n-screen) only the better half goes on to 2n prompts, until "
        "--n-finalists remain. Off: one round on --n-screen prompts.",
    )
    refine_steps: Annotated[int, Field(ge=0)] = Field(
        0,
        description="Steps of descent on the per-layer attention and MLP strengths of the chosen "
        "edit (lower KL at the same refusal likelihood on validation prompts): of the selected "
        "direction's edit in run, of the chosen trial in --optimize. 0: no refinement (run: the "
        "direction removed at --strength from every writer).",
    )

    @model_validator(mode="after")
    def _one_source_of_direction(self) -> SelectionOptions:
        if self.direction is not None and self.layer is not None:
            raise problem("pass either --direction or --layer, not both.")
        return self


class SearchOptions(Options):
    """How ``--optimize`` searches the edit space (see :mod:`abliterate.search.optimize`)."""

    optimize: bool = Field(
        False,
        description="Search directions, per-layer strength profiles, projection and norm "
        "preservation with multi-objective Optuna (refusals vs. KL on validation prompts) instead "
        "of one full-strength direction.",
    )
    trials: Count = Field(
        64,
        description="Completed search trials to reach (a resumed study counts the trials it "
        "already has).",
    )
    storage: Text | None = Field(
        None,
        description="Optuna storage URL of the study (e.g. sqlite:///study.db, "
        "postgresql://...). Default: sqlite file OUT.study.db beside the run directory, which "
        "survives a killed run.",
    )
    study_name: Text = Field(
        "abliterate",
        description="Study name in the storage; workers sharing --storage and --study-name search "
        "together.",
    )
    refusal_target: FiniteFloat = Field(
        0.05,
        ge=0,
        le=1,
        description="Judged refusal rate on harmful validation prompts that the chosen trial must "
        "reach; the lowest-KL Pareto trial at or below it is chosen.",
    )
    max_confirm: Count = Field(
        6, description="Most Pareto-front trials confirmed by generating and judging answers."
    )
    search_dtype: SearchDType = Field(
        "auto",
        description="Precision the search scores trials in (their forward passes; "
        "confirmation generates with the model itself, and the Pareto-front trials are scored "
        "again in the model's precision before the choice). Selection screens candidates in it "
        "only when it is named (not 'auto'), and scores the finalists in the model's precision. "
        "'auto': bfloat16 when the model is float32 and the device computes bfloat16 natively "
        "(CUDA with bf16, a CPU with AVX512-BF16 or AMX: about 4x faster on the demo model), on "
        "a bfloat16 copy of the model; else the model's own dtype. 'model': never copy. The "
        "final evaluation and the exported model always use the model's dtype.",
    )
    confirm_tokens: Count = Field(
        32,
        description="Tokens generated per harmful validation prompt when confirming a trial's "
        "refusal rate (refusals show in the opening: on the demo model 41 of 42 refusals are "
        "caught within 32 tokens); the final evaluation uses --max-new-tokens.",
    )
    max_directions: Count = Field(
        1,
        description="Let the search remove up to this many directions at once: the mean "
        "difference plus the top singular vectors of the per-prompt differences (each harmful "
        "prompt's activation minus the harmless mean) orthogonal to it. 1: the mean difference "
        "only.",
    )
    trials_per_pass: Count = Field(
        1,
        description="Trials the search asks TPE for together and scores in one forward pass "
        "(pending trials are kept apart by TPE's constant liar): faster, but each trial is "
        "sampled without the results of the others in its group. Capped by --edits-per-pass.",
    )
    mlp_peak_min: FiniteFloat = Field(
        0.2,
        ge=0,
        le=1.5,
        description="Lowest MLP peak strength the search samples (0 lets it leave the MLPs "
        "untouched; some models are damaged most there).",
    )
    trial: Index | None = Field(
        None, description="Skip the automatic choice and use this trial number of the study."
    )

    @model_validator(mode="after")
    def _trial_needs_a_study(self) -> SearchOptions:
        if self.trial is not None and not self.optimize:
            raise problem("--trial picks a trial of an optimization study; add --optimize.")
        return self


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


# --- command configs -----------------------------------------------------------------------------


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


def to_dict(config: Options) -> dict[str, Any]:
    """The JSON-ready resolved configuration (paths as strings, tuples as lists), as stored in a
    run directory's ``config.json``; ``type(config)(**to_dict(config)) == config``."""
    return config.model_dump(mode="json")
