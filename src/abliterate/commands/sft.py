"""``abliterate sft DATA``: supervised fine-tuning, evaluated before and after.

The model is evaluated on the held-out prompts, fine-tuned with TRL (:mod:`abliterate.train.sft`;
LoRA, QLoRA or full, loss on the answers only), merged, evaluated again, and compared with the
model before training (first-token and multi-token KL). The run directory holds ``model/`` (the
merged model, safetensors), ``adapter/`` (LoRA/QLoRA), ``config.json``, ``environment.json``,
``report.json`` (``baseline``: before, ``edited``: after, ``training``: the loss curve),
``report.md`` and ``report.html``. Checkpoints go to ``OUT.checkpoints`` and a killed run
resumes from the last one (:mod:`abliterate.train.trainer`).
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from abliterate import __version__
from abliterate.commands.rundir import check_output_dir, environment_record, run_directory
from abliterate.commands.training import (
    Outcome,
    build_evaluator,
    eval_prompts,
    file_sha256,
    model_record,
    process_state,
    record_kl,
    report_dict,
    save_trained,
    training_fingerprint,
    write_json,
)
from abliterate.config import SftConfig, to_dict
from abliterate.data.chat import prepare_tokenizer
from abliterate.data.conversations import RowSource
from abliterate.eval.benchmarks import check_task_names
from abliterate.model.loading import LoadedModel, load_model
from abliterate.progress import Stages
from abliterate.report.markdown import summary_table, write_reports
from abliterate.report.schema import Report
from abliterate.train.sft import build_dataset, sft_trainer
from abliterate.train.trainer import (
    Checkpoints,
    load_trainable,
    lora_config,
    merged_model,
    require_training,
    run_training,
    split_heldout,
    trainer_arguments,
)

log = logging.getLogger(__name__)


def sft(config: SftConfig) -> dict[str, Any]:
    """Fine-tune ``config.model`` on ``config.data`` and write the run directory.

    Under ``accelerate launch`` (several processes, see ``configs/``) the main process does what
    is described above; the others only train with it and return an empty dict.

    Returns:
        The report (also in ``config.out/report.json``).

    Raises:
        DatasetError: the dataset cannot be read or holds nothing to train on.
        TrainingError: checkpoints of another run, or QLoRA without CUDA.
    """
    import torch

    require_training()
    state = process_state()
    if state.is_main_process:
        check_output_dir(config.out, config.overwrite)
    torch.manual_seed(config.seed)
    prompts = eval_prompts(config)
    check_task_names(config.benchmarks)
    RowSource.parse(config.data)
    fingerprint = training_fingerprint(
        config, command="sft", model=config.model, data=config.data,
        data_sha256=file_sha256(config.data), format=config.format, max_rows=config.max_rows,
        system_prompt=config.system_prompt, seed=config.seed,
    )  # fmt: skip
    checkpoints = Checkpoints(config.out, fingerprint, config.restart)
    # The main process prepares (or clears) the directory before the others look into it.
    with state.main_process_first():
        resume = checkpoints.prepare() if state.is_main_process else checkpoints.last()
    if not state.is_main_process:
        loaded = load_trainable(config.model, config, config.adapter)
        _fit(config, loaded, checkpoints, resume, Stages())
        return {}
    stages = Stages()
    with run_directory(config.out, config.overwrite) as tmp:
        write_json(tmp / "config.json", to_dict(config))
        with stages.stage("load model"):
            loaded = load_trainable(config.model, config, config.adapter)
        evaluator, judges = build_evaluator(config, loaded, prompts, config.seed)
        data = {k: {"name": s.name, "n": len(s), "sha256": s.sha256} for k, s in prompts.items()}
        env = environment_record(str(loaded.device), config.seed, data)
        write_json(tmp / "environment.json", env)
        with stages.stage("eval before"):
            before = evaluator.assess(loaded.model, "before")
        trainer, training = _fit(config, loaded, checkpoints, resume, stages)
        with stages.stage("merge"):
            model = merged_model(trainer, config.adapter, tmp / "adapter", lambda: _load(config))
            del trainer
            gc.collect()
        prepare_tokenizer(loaded.tokenizer)
        with stages.stage("eval after"):
            after = evaluator.assess(model, "after")
        with stages.stage("KL to the model before"):
            reference = _load(config)
            record_kl(evaluator, reference.model, model, after)
            del reference
        record = {
            "abliterate_version": __version__,
            "base_model": {k: v for k, v in model_record(loaded).items() if k != "architecture"},
            "training": {k: v for k, v in training.items() if k != "losses"},
        }
        with stages.stage("export"):
            probe = list(evaluator.sets.harmless.texts[:4])
            export_diff = save_trained(model, loaded, tmp / "model", record, probe)
        outcome = Outcome(before, after, training)
        report = Report.model_validate(
            report_dict("sft", loaded, prompts, judges, outcome, export_diff,
                        {"n_examples": config.n_examples, "timings": stages.to_dict()})
        )  # fmt: skip
        write_reports(tmp, report)
    checkpoints.remove()
    print(summary_table(report))
    print(f"\nRun directory: {config.out}")
    return report.model_dump(mode="json")


def _fit(
    config: SftConfig,
    loaded: LoadedModel,
    checkpoints: Checkpoints,
    resume: Path | None,
    stages: Stages,
) -> tuple[Any, dict[str, Any]]:
    """Build the examples and train (every process); the trainer and the training record."""
    fmt = None if config.format == "auto" else config.format
    with stages.stage("dataset"), process_state().main_process_first():
        cache = checkpoints.path / "dataset"
        dataset = build_dataset(config.data, fmt, config.max_rows, config.system_prompt, cache)
    train, heldout = split_heldout(dataset, config.n_heldout)
    with stages.stage("train"):
        arguments = trainer_arguments(
            config, output_dir=checkpoints.path, model=loaded.model, seed=config.seed
        )
        trainer = sft_trainer(
            loaded.model, loaded.tokenizer, train, heldout, arguments, config.max_length,
            lora_config(config),
        )  # fmt: skip
        result = run_training(trainer, checkpoints, resume, "SFT")
    n_heldout = 0 if heldout is None else len(heldout)
    return trainer, _training_record(config, result, len(train), n_heldout)


def _load(config: SftConfig) -> Any:
    """The model as it was before training, in its full dtype."""
    return load_model(
        config.model, revision=config.revision, device=config.device, dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
    )  # fmt: skip


def _training_record(
    config: SftConfig, result: dict[str, Any], n_train: int, n_heldout: int
) -> dict[str, Any]:
    lora = config.adapter != "full"
    return {
        "method": "sft",
        "adapter": config.adapter,
        "data": config.data,
        "n_examples": n_train,
        "n_heldout": n_heldout,
        "epochs": config.epochs,
        "learning_rate": config.learning_rate,
        "batch_size": (
            config.train_batch_size * config.gradient_accumulation * process_state().num_processes
        ),
        "lora_r": config.lora_r if lora else None,
        "lora_alpha": config.lora_alpha if lora else None,
        **result,
    }
