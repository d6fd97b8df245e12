"""The option groups and the command configs built from them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import CliPositionalArg

from abliterate.config.messages import describe_errors
from abliterate.config.values import (
    Count,
    FiniteFloat,
    Index,
    Names,
    PathOption,
    Sites,
    Text,
    check_judges,
    check_temperature,
    problem,
)
from abliterate.errors import ConfigError
from abliterate.types import (
    SITES,
    AdapterKind,
    DType,
    PreferenceLoss,
    RowFormatOption,
    SearchDType,
    Site,
)

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
        description="Precision the search scores trials in (its forward passes; confirmation "
        "generates with the model itself). 'auto': bfloat16 when the model is float32 and the "
        "device computes bfloat16 natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX: about "
        "4x faster on the demo model), on a bfloat16 copy of the model; else the model's own "
        "dtype. 'model': never copy. The final evaluation and the exported model always use the "
        "model's dtype.",
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

    max_new_tokens: Count = Field(64, description="Tokens generated per evaluation prompt.")
    kl_tokens: Count = Field(
        16,
        description="Positions of the original model's own greedy continuation of each harmless "
        "prompt over which multi-token KL is averaged (first-token KL understates damage).",
    )
    n_examples: Annotated[int, Field(ge=0)] = Field(
        4, description="Side-by-side example completions shown in the report."
    )


class OutputOptions(Options):
    """Where the run directory goes, and the seed that makes it reproducible."""

    out: PathOption = Field(Path("runs/latest"), description="Run directory to create.")
    overwrite: bool = Field(False, description="Replace the run directory if it exists.")
    # torch.manual_seed takes at most 64 bits; a larger seed would fail only after the model load.
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = Field(
        0, description="Random seed (used by torch; selection and generation are greedy)."
    )


# --- command configs -----------------------------------------------------------------------------


# pydantic orders inherited fields from the last base to the first: this order lists the model
# options first, as in --help and config.json.
class RunConfig(
    OutputOptions, EvalOptions, SelectionOptions, SearchOptions, PromptOptions, ModelOptions
):
    """Configuration of ``abliterate run``: compute, select, apply, evaluate and export."""

    save_model: bool = Field(True, description="Write the edited model to OUT/model.")

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
        return self


class OptimizeConfig(RunConfig):
    """Configuration of ``abliterate optimize``: ``abliterate run --optimize``."""

    optimize: bool = Field(True, description="Search the edit space (always on for this command).")


class EvaluateConfig(OutputOptions, EvalOptions, EvalPromptOptions, ModelOptions):
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


class ChatConfig(ModelOptions):
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


class FilterDatasetConfig(Options):
    """Configuration of ``abliterate filter-dataset``: drop the rows whose answers refuse or
    moralize."""

    dataset: CliPositionalArg[Text] = Field(
        description="Instruction dataset to filter: a .jsonl, .json (one array) or .parquet file "
        "of alpaca (instruction/input/output), ShareGPT (conversations) or chat (messages) rows, "
        "or a hub dataset hf:ORG/NAME[:split].",
    )
    out: CliPositionalArg[PathOption] = Field(
        description="File for the kept rows, in the input's format (a hub dataset's rows: .jsonl "
        "or .json); OUT.report.json is written beside it.",
    )
    markers: Text = Field(
        "broad",
        description="Marker list that flags an answer: 'refusal' (phrases of declining), 'broad' "
        "(those plus an assistant calling itself an AI and lecturing the user), a file of "
        "phrases (one a line, '^phrase' for the start of an answer only), or 'none' (judges "
        "only). Topic words such as 'illegal' are never markers.",
    )
    judge: Annotated[Text, AfterValidator(check_judges)] | None = Field(
        None,
        description="Further comma-separated judges that flag an answer: "
        "'classifier:MODEL[#LABEL]', 'llm:MODEL', 'llm:http(s)://HOST/v1#NAME' or 'markers' "
        "(the evaluation's refusal phrases).",
    )
    invert: bool = Field(
        False, description="Keep only the flagged rows (to build a set of refusals) instead."
    )
    format: RowFormatOption = Field(
        "auto", description="Row format: 'auto' (from the first row), alpaca, sharegpt, messages."
    )
    batch_size: Count = Field(
        256, description="Rows read, judged and written at a time (judges see a batch at once)."
    )
    device: Text = Field(
        "auto", description="Torch device of classifier and LLM judges: auto, cpu, cuda, ..."
    )
    n_examples: Annotated[int, Field(ge=0)] = Field(
        20, description="Dropped rows shown as examples in OUT.report.json."
    )
    overwrite: bool = Field(False, description="Replace OUT if it exists.")

    @model_validator(mode="after")
    def _something_judges(self) -> FilterDatasetConfig:
        if self.markers == "none" and self.judge is None:
            raise problem("--markers none needs a --judge; nothing would flag any row.")
        return self


class TrainOptions(Options):
    """How a model is fine-tuned (``sft``, ``heal``): adapter, optimisation, checkpoints."""

    adapter: AdapterKind = Field(
        "lora",
        description="'lora': low-rank adapters on every linear layer (peft), merged into the "
        "saved model; 'qlora': the same on a 4-bit copy of the model (needs CUDA and "
        "bitsandbytes); 'full': every weight is trained.",
    )
    lora_r: Count = Field(16, description="Rank of the LoRA adapters.")
    lora_alpha: Count = Field(32, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: FiniteFloat = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    learning_rate: FiniteFloat = Field(
        2e-4,
        gt=0,
        description="Peak learning rate (AdamW); LoRA wants about ten times that of --adapter "
        "full.",
    )
    epochs: FiniteFloat = Field(1.0, gt=0, description="Passes over the training examples.")
    max_steps: Count | None = Field(
        None, description="Stop after this many optimizer steps (overrides --epochs)."
    )
    train_batch_size: Count = Field(4, description="Training examples per device and step.")
    gradient_accumulation: Count = Field(1, description="Batches accumulated per optimizer step.")
    max_length: Count = Field(
        1024, description="Tokens per training sequence; longer ones are cut at the end."
    )
    warmup_ratio: FiniteFloat = Field(
        0.0, ge=0, lt=1, description="Fraction of the steps over which the learning rate rises."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass: much less memory for large "
        "models on GPUs, about a third more time.",
    )
    save_steps: Count = Field(
        50, description="Steps between checkpoints in OUT.checkpoints (resumed after a kill)."
    )
    logging_steps: Count = Field(5, description="Steps between loss records.")
    n_heldout: Annotated[int, Field(ge=0)] = Field(
        16,
        description="Training examples held out (the first ones) to measure the loss before and "
        "after training.",
    )
    restart: bool = Field(
        False,
        description="Delete checkpoints left in OUT.checkpoints by an interrupted run and start "
        "over (by default training resumes from the last one).",
    )
    deepspeed: PathOption | None = Field(
        None,
        description="DeepSpeed JSON config for multi-GPU training (launch with accelerate; see "
        "configs/).",
    )


class JudgeBenchmarkOptions(Options):
    """The judges and benchmarks of a before/after evaluation (``sft``, ``heal``)."""

    judge: Annotated[Text, AfterValidator(check_judges)] = Field(
        "markers",
        description="Comma-separated refusal judges ('markers', 'classifier:MODEL[#LABEL]', "
        "'llm:MODEL', 'llm:http(s)://HOST/v1#NAME'); the first decides.",
    )
    benchmarks: Names = Field(
        (),
        description="lm-evaluation-harness tasks scored before and after (needs abliterate[eval]): "
        "abliterate_general_knowledge, abliterate_arithmetic or any lm-eval task name.",
    )
    benchmark_limit: Count | None = Field(
        None, description="Cap on the items of each benchmark task (default: all of them)."
    )


class SftConfig(
    OutputOptions, EvalOptions, EvalPromptOptions, JudgeBenchmarkOptions, TrainOptions, ModelOptions
):
    """Configuration of ``abliterate sft``: supervised fine-tuning on a conversation dataset."""

    model: Text = Field(
        "demo",
        description="Model to fine-tune: a hub id (ORG/NAME), a local directory with safetensors "
        "weights (e.g. a run's model/ folder), a .gguf file, or 'demo'.",
    )
    data: CliPositionalArg[Text] = Field(
        description="Training conversations: a .jsonl, .json or .parquet file of alpaca, ShareGPT "
        "or chat-messages rows (for example the output of filter-dataset), or hf:ORG/NAME[:split]."
        " Every assistant turn is trained on, the conversation before it being the prompt.",
    )
    format: RowFormatOption = Field(
        "auto", description="Row format: 'auto' (from the first row), alpaca, sharegpt, messages."
    )
    max_rows: Count | None = Field(None, description="Use only the first N rows of the dataset.")
    out: PathOption = Field(Path("runs/sft"), description="Run directory to create.")
    batch_size: Count = Field(32, description="Prompts per evaluation forward pass.")


class HealConfig(
    OutputOptions, EvalOptions, EvalPromptOptions, JudgeBenchmarkOptions, TrainOptions, ModelOptions
):
    """Configuration of ``abliterate heal``: DPO that brings an abliterated model back towards
    its original on harmless prompts while keeping it compliant."""

    model: Text = Field(
        description="The abliterated model: a run directory of abliterate run/optimize, its "
        "model/ folder, or any model directory, hub id or .gguf file (then pass --original).",
    )
    original: Text | None = Field(
        None,
        description="The original model the KL divergences (and the self-built preference pairs) "
        "refer to. Default: the base model recorded in MODEL's abliteration.json.",
    )
    preferences: Text | None = Field(
        None,
        description="Preference pairs to train on: a .jsonl/.json/.parquet file or "
        "hf:ORG/NAME[:split] with chosen/rejected (and prompt) columns, as text or chat messages "
        "(e.g. hf:mlabonne/orpo-dpo-mix-40k). Default: pairs built from the run itself.",
    )
    harmful: Text | None = Field(
        None,
        description="Harmful prompts of the self-built pairs (file or hf:...). Default: the "
        "built-in train split, never the held-out eval split.",
    )
    harmless: Text | None = Field(
        None, description="Harmless prompts of the self-built pairs. Default: built-in train split."
    )
    n_pairs: Count = Field(
        128, description="Harmful and harmless prompts (each) answered to build the pairs."
    )
    pair_tokens: Count = Field(
        64, description="Tokens generated per answer of a self-built pair (greedy)."
    )
    loss: PreferenceLoss = Field(
        "dpo+sft",
        description="'dpo': the sigmoid DPO loss; 'dpo+sft': plus the chosen answers' negative "
        "log-likelihood (RPO), which keeps the chosen answers likely instead of only preferred.",
    )
    beta: FiniteFloat = Field(
        0.1, gt=0, description="DPO temperature: how far the model may move from the reference."
    )
    learning_rate: FiniteFloat = Field(5e-5, gt=0, description="Peak learning rate (AdamW).")
    out: PathOption = Field(Path("runs/heal"), description="Run directory to create.")
    batch_size: Count = Field(32, description="Prompts per evaluation forward pass or generation.")

    @model_validator(mode="after")
    def _pairs_or_prompts(self) -> HealConfig:
        if self.preferences is not None and (self.harmful or self.harmless):
            raise problem(
                "--harmful/--harmless build the pairs from the run; they cannot be combined with "
                "--preferences."
            )
        return self


class ReportConfig(Options):
    """Configuration of ``abliterate report``: re-render a run's HTML report and plots."""

    run: CliPositionalArg[PathOption] = Field(
        description="Run directory holding report.json (and scores.json, for per-layer plots).",
    )


def to_dict(config: Options) -> dict[str, Any]:
    """The JSON-ready resolved configuration (paths as strings, tuples as lists), as stored in a
    run directory's ``config.json``; ``type(config)(**to_dict(config)) == config``."""
    return config.model_dump(mode="json")
