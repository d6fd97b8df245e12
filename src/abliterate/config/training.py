"""The configs of the commands that change a model by data: ``filter-dataset``, ``sft`` and
``heal``, with the option groups they add (:class:`TrainOptions`, :class:`JudgeBenchmarkOptions`)
to those of :mod:`abliterate.config.groups`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator
from pydantic_settings import CliPositionalArg

from abliterate.config.groups import (
    EvalOptions,
    EvalPromptOptions,
    ModelOptions,
    Options,
    OutputOptions,
)
from abliterate.config.values import (
    Count,
    FiniteFloat,
    Names,
    PathOption,
    Text,
    check_judges,
    problem,
)
from abliterate.types import AdapterKind, PreferenceLoss, RowFormatOption


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
    """Configuration of ``abliterate heal``: self-distillation or DPO that brings an abliterated
    model back towards its original on harmless prompts while keeping it compliant."""

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
        "distill",
        description="'distill': self-distillation on the chosen answers, the forward KL of the "
        "next-token distributions to the original's on harmless pairs and to the model's own "
        "(adapters off) on harmful ones (rows without a 'kind' count as harmless; needs an "
        "adapter; the original stays in memory while training); 'dpo': the sigmoid DPO loss; "
        "'dpo+sft': plus the chosen answers' negative log-likelihood (RPO).",
    )
    beta: FiniteFloat = Field(
        0.1,
        gt=0,
        description="DPO temperature: how far the model may move from the reference (not used "
        "by --loss distill).",
    )
    learning_rate: FiniteFloat = Field(
        1e-4,
        gt=0,
        description="Peak learning rate (AdamW); measured on the demo: 1e-4 for distill, 1e-5 to "
        "5e-5 for the DPO losses.",
    )
    out: PathOption = Field(Path("runs/heal"), description="Run directory to create.")
    batch_size: Count = Field(32, description="Prompts per evaluation forward pass or generation.")

    @model_validator(mode="after")
    def _pairs_or_prompts(self) -> HealConfig:
        if self.preferences is not None and (self.harmful or self.harmless):
            raise problem(
                "--harmful/--harmless build the pairs from the run; they cannot be combined with "
                "--preferences."
            )
        if self.loss == "distill" and self.adapter == "full":
            raise problem(
                "--loss distill needs --adapter lora or qlora: the model with its adapters "
                "disabled is the teacher of the harmful pairs; use --loss dpo with --adapter full."
            )
        return self
