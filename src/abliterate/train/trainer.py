"""What ``sft`` and ``heal`` share around TRL's trainers: checkpoints that survive a kill, the
adapter (LoRA, QLoRA or none), the arguments every trainer gets, progress with the loss, and
the merged model.

Checkpoints live in ``OUT.checkpoints`` beside the run directory (the run directory itself is
built under a temporary name and appears only on success, see
:func:`~abliterate.commands.rundir.run_directory`), with ``fingerprint.json``: the options and
data the checkpoints were trained with. A rerun with the same fingerprint resumes from the last
checkpoint (optimizer, scheduler, random state and data order included, as
``transformers.Trainer`` restores them); another fingerprint is refused rather than mixed in.
The directory is deleted once the run directory is in place.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from abliterate.config import ModelOptions, TrainOptions
from abliterate.errors import TrainingError
from abliterate.model.loading import LoadedModel, load_model, resolve_device
from abliterate.progress import progress_bar

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PreTrainedModel, TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"


def require_training() -> None:
    """Check that TRL and PEFT are installed (the ``train`` extra).

    Raises:
        TrainingError: either is missing.
    """
    try:
        import peft  # noqa: F401
        import trl  # noqa: F401
    except ImportError as exc:
        raise TrainingError(
            f"fine-tuning needs TRL and PEFT ({exc.name} is missing): "
            "pip install 'abliterate[train]'."
        ) from exc


def checkpoint_dir(out: Path) -> Path:
    """``OUT.checkpoints``: beside the run directory, so it outlives a killed run."""
    path = out.resolve()
    return path.with_name(path.name + ".checkpoints")


class Checkpoints:
    """The checkpoint directory of one training run.

    Args:
        out: The run directory.
        fingerprint: What the checkpoints must have been trained with to be resumed (JSON-ready).
        restart: Delete existing checkpoints instead of resuming.
    """

    def __init__(self, out: Path, fingerprint: dict[str, Any], restart: bool) -> None:
        self.path = checkpoint_dir(out)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from disk
        self.restart = restart

    def prepare(self) -> Path | None:
        """Create the directory (or check that it belongs to this run); return the checkpoint to
        resume from, if any.

        Raises:
            TrainingError: the directory holds checkpoints of another configuration or dataset.
        """
        if self.restart and self.path.exists():
            shutil.rmtree(self.path)
        stamp = self.path / FINGERPRINT
        if stamp.is_file():
            recorded = json.loads(stamp.read_text(encoding="utf-8"))
            if recorded != self.fingerprint:
                changed = sorted(
                    k
                    for k in {*recorded, *self.fingerprint}
                    if recorded.get(k) != self.fingerprint.get(k)
                )
                raise TrainingError(
                    f"{self.path} holds checkpoints of a run with other settings ("
                    f"{', '.join(changed)}); pass --restart to delete them, or rerun with the same "
                    "options to resume."
                )
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            stamp.write_text(json.dumps(self.fingerprint, indent=2) + "\n", encoding="utf-8")
        return self.last()

    def last(self) -> Path | None:
        """The newest ``checkpoint-STEP`` directory, if any."""
        from transformers.trainer_utils import get_last_checkpoint

        found = get_last_checkpoint(str(self.path)) if self.path.is_dir() else None
        return Path(found) if found else None

    def remove(self) -> None:
        """Delete the directory (after the run directory is in place)."""
        shutil.rmtree(self.path, ignore_errors=True)


def lora_config(options: TrainOptions) -> LoraConfig | None:
    """PEFT's LoRA config for ``lora``/``qlora`` (None for full fine-tuning): adapters on every
    linear layer but the output head, as QLoRA does; dropout 0 by default keeps runs exact."""
    if options.adapter == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def load_trainable(name: str, options: ModelOptions, adapter: str) -> LoadedModel:
    """Load the model to train: as given, or for ``qlora`` quantized to 4-bit NF4 with bfloat16
    compute (bitsandbytes, CUDA only) and prepared for k-bit training. Under ``accelerate
    launch`` each process loads onto its own GPU.

    Raises:
        TrainingError: ``qlora`` without CUDA or without bitsandbytes.
    """
    import torch
    from accelerate import PartialState

    state = PartialState()
    device = str(state.device) if state.num_processes > 1 else options.device
    kwargs: dict[str, Any] = {}
    if adapter == "qlora":
        if not torch.cuda.is_available() or resolve_device(device) == "cpu":
            raise TrainingError("--adapter qlora needs a CUDA GPU; use --adapter lora on a CPU.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise TrainingError(
                "--adapter qlora needs bitsandbytes: pip install 'abliterate[quant]'."
            ) from exc
        from transformers import BitsAndBytesConfig

        kwargs["quantization"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": state.local_process_index}
    loaded = load_model(
        name, revision=options.revision, device=device, dtype=options.dtype,
        trust_remote_code=options.trust_remote_code, **kwargs,
    )  # fmt: skip
    if adapter == "qlora":
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(loaded.model, use_gradient_checkpointing=False)
    return loaded


def trainer_arguments(
    options: TrainOptions, *, output_dir: Path, model: PreTrainedModel, seed: int
) -> dict[str, Any]:
    """The ``TrainingArguments`` fields every trainer here gets (an ``SFTConfig`` or
    ``DPOConfig`` adds its own)."""
    import torch

    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": options.train_batch_size,
        "per_device_eval_batch_size": options.train_batch_size,
        "gradient_accumulation_steps": options.gradient_accumulation,
        "learning_rate": options.learning_rate,
        "num_train_epochs": options.epochs,
        "max_steps": options.max_steps or -1,
        "warmup_steps": options.warmup_ratio,  # a float below 1 is a fraction of the steps
        "lr_scheduler_type": "linear",
        "logging_steps": options.logging_steps,
        "save_strategy": "steps",
        "save_steps": options.save_steps,
        "save_total_limit": 2,  # the last checkpoint and the one before, should the last be torn
        "eval_strategy": "no",
        "seed": seed,
        "data_seed": seed,
        # Mixed precision follows the loaded weights: float32 on CPU trains in float32.
        "bf16": model.dtype == torch.bfloat16,
        "fp16": False,
        "use_cpu": next(model.parameters()).device.type == "cpu",
        "activation_checkpointing": options.gradient_checkpointing,
        "deepspeed": None if options.deepspeed is None else str(options.deepspeed),
        "report_to": "none",
        "disable_tqdm": True,  # TrainingProgress draws the bar
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }


@dataclass
class TrainingProgress(TrainerCallback):
    """A progress bar over the optimizer steps with the latest loss, and a log line per record.

    Replaces transformers' own bar and printer, so training reads like every other stage (live
    on a terminal, a line every 30 s in logs).
    """

    desc: str
    resumed_from: int | None = None
    _bar: Any = field(default=None, init=False, repr=False)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.resumed_from = state.global_step or None
        self._bar = progress_bar(
            total=state.max_steps, desc=self.desc, unit="step", initial=state.global_step
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self._bar is not None:
            self._bar.update(state.global_step - self._bar.n)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        if logs and "loss" in logs and self._bar is not None:
            self._bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
            log.debug("step %d: %s", state.global_step, logs)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self._bar is not None:
            self._bar.close()


def install_progress(trainer: Any, desc: str) -> TrainingProgress:
    """Swap a trainer's own progress bar and log printer for :class:`TrainingProgress`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    callback = TrainingProgress(desc)
    trainer.add_callback(callback)
    return callback


def split_heldout(dataset: Dataset, n_heldout: int) -> tuple[Dataset, Dataset | None]:
    """The training examples and the first ``n_heldout`` held out (at most half of them)."""
    n = min(n_heldout, len(dataset) // 2)
    if n == 0:
        return dataset, None
    return dataset.select(range(n, len(dataset))), dataset.select(range(n))


def run_training(
    trainer: Any, checkpoints: Checkpoints, resume: Path | None, desc: str
) -> dict[str, Any]:
    """Train (from ``resume`` when given), with the held-out loss before and after.

    Returns:
        ``{"steps", "seconds", "resumed_from_step", "heldout_loss_before", "heldout_loss_after",
        "losses": [{"step", "loss"}, ...]}``; losses include those logged before a resume.
    """
    progress = install_progress(trainer, desc)
    before = _heldout_loss(trainer)
    start = time.perf_counter()
    if resume is not None:
        log.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    after = _heldout_loss(trainer)
    history = trainer.state.log_history
    losses = [{"step": int(h["step"]), "loss": float(h["loss"])} for h in history if "loss" in h]
    return {
        "steps": int(trainer.state.global_step),
        "seconds": round(seconds, 2),
        "resumed_from_step": progress.resumed_from,
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "losses": losses,
    }


def _heldout_loss(trainer: Any) -> float | None:
    if trainer.eval_dataset is None:
        return None
    metrics = trainer.evaluate()
    return float(metrics["eval_loss"])


def merged_model(
    trainer: Any, adapter: str, adapter_dir: Path | None, load_base: Callable[[], LoadedModel]
) -> PreTrainedModel:
    """The trained model with its adapter merged into the weights (what is evaluated and saved).

    ``lora``: merged in place. ``qlora``: the base model is loaded again in its full dtype and the
    saved adapter merged into it, since 4-bit weights cannot hold the merged values. ``full``: the
    trained model as it is. Writes the adapter to ``adapter_dir`` (LoRA and QLoRA).
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    if adapter == "full":
        return model.eval()
    assert adapter_dir is not None
    model.save_pretrained(str(adapter_dir))
    if adapter == "lora":
        return model.merge_and_unload().eval()
    from peft import PeftModel

    trainer.model = None
    del model
    gc.collect()
    base = load_base().model
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged.eval()
