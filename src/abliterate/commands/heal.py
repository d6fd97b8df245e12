"""``abliterate heal --model RUN_OR_MODEL``: self-distillation or DPO that heals an abliterated
model.

The stages: resolve the abliterated model and its original (a run directory's ``model/`` and the
base model its ``abliteration.json`` records, unless ``--original`` says otherwise); build the
preference pairs from both models (:func:`abliterate.train.preferences.build_pairs`; or read
``--preferences``); evaluate the abliterated model and its KL to the original; train LoRA (or
QLoRA, or every weight) with ``--loss distill`` (:mod:`abliterate.train.distill`: the chosen
answers, matching the original's next-token distributions on harmless pairs and the model's own
with its adapters disabled on harmful ones; the original stays in memory while training, e.g.
2 GB more for the demo's 0.5B float32) or with DPO (:mod:`abliterate.train.dpo`, the reference
being the model with its adapters disabled); merge; evaluate the healed model and its KL to the
original; export.

The run directory holds ``model/`` (the healed, merged model), ``adapter/``, ``preferences.jsonl``
(the self-built pairs, reusable with ``--preferences``), ``config.json``, ``environment.json``
and ``report.json`` in the ``run`` shape: ``baseline`` is the model before healing, ``edited`` the
healed one, both with first-token and multi-token ``KL(original ‖ model)``; ``original_model``
names the original, ``training`` holds the pair counts and the loss curve. Checkpoints (and the
self-built pairs, so a resumed run does not generate them again) live in ``OUT.checkpoints``.
"""

from __future__ import annotations

import gc
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abliterate import __version__
from abliterate.commands.chat import resolve_baseline
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
from abliterate.config import HealConfig, to_dict
from abliterate.data.chat import prepare_tokenizer
from abliterate.data.conversations import RowSource
from abliterate.data.prompts import PromptSet, resolve_prompts
from abliterate.errors import ConfigError
from abliterate.eval.benchmarks import check_task_names
from abliterate.model.loading import LoadedModel, load_model
from abliterate.progress import Stages
from abliterate.report.markdown import summary_table, write_reports
from abliterate.report.schema import Report
from abliterate.train.preferences import build_pairs, build_preferences, write_pairs
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

PAIRS_FILE = "preferences.jsonl"


@dataclass(frozen=True)
class Target:
    """The model to heal and the original it is measured against."""

    model: str
    original: str
    original_revision: str | None


def resolve_target(config: HealConfig) -> Target:
    """The abliterated model (a run directory's ``model/``) and its original.

    Raises:
        ConfigError: no ``--original`` and no recorded base model.
    """
    path = Path(config.model).expanduser()
    model = str(path / "model") if (path / "model" / "config.json").is_file() else config.model
    if config.original is not None:
        return Target(model, config.original, config.revision)
    recorded = resolve_baseline(model)
    if recorded is None:
        raise ConfigError(
            f"{config.model} records no original model (no abliteration.json); pass --original "
            "with the model it was abliterated from."
        )
    return Target(model, *recorded)


def pair_prompts(config: HealConfig) -> dict[str, PromptSet] | None:
    """The prompts the pairs are built from (never the evaluation split), or None when the
    pairs come from ``--preferences``."""
    if config.preferences is not None:
        return None
    col, n = config.prompt_column, config.n_pairs
    return {
        "pairs_harmful": resolve_prompts(config.harmful, "harmful", "train", col).head(n),
        "pairs_harmless": resolve_prompts(config.harmless, "harmless", "train", col).head(n),
    }


def heal(config: HealConfig) -> dict[str, Any]:
    """Heal ``config.model`` and write the run directory.

    Under ``accelerate launch`` (several processes, see ``configs/``) the main process does what
    is described above; the others only train with it and return an empty dict.

    Returns:
        The report (also in ``config.out/report.json``).

    Raises:
        ConfigError: the original model is unknown.
        DatasetError: the preference dataset cannot be read.
        TrainingError: checkpoints of another run, or QLoRA without CUDA.
    """
    import torch

    require_training()
    state = process_state()
    if state.is_main_process:
        check_output_dir(config.out, config.overwrite)
    torch.manual_seed(config.seed)
    target = resolve_target(config)
    prompts = eval_prompts(config)
    check_task_names(config.benchmarks)
    sources = pair_prompts(config)
    if config.preferences is not None:
        RowSource.parse(config.preferences)
    fingerprint = training_fingerprint(
        config, command="heal", model=target.model, original=target.original,
        preferences=config.preferences,
        preferences_sha256=file_sha256(config.preferences) if config.preferences else None,
        pair_prompts={k: s.sha256 for k, s in (sources or {}).items()},
        pair_tokens=config.pair_tokens, loss=config.loss, beta=config.beta, seed=config.seed,
        system_prompt=config.system_prompt,
    )  # fmt: skip
    checkpoints = Checkpoints(config.out, fingerprint, config.restart)
    # The main process prepares (or clears) the directory before the others look into it.
    with state.main_process_first():
        resume = checkpoints.prepare() if state.is_main_process else checkpoints.last()
    if state.is_main_process:
        return _heal(config, target, prompts, sources, checkpoints, resume)
    loaded = load_trainable(target.model, config, config.adapter)
    # distill's teacher, on this process's device (the one its copy of the model trains on)
    device = str(loaded.device)
    teacher = _load_original(config, target, device).model if config.loss == "distill" else None
    with state.main_process_first():  # the main process builds the pairs first
        spec = config.preferences or str(checkpoints.path / PAIRS_FILE)
    _train(config, loaded, spec, None, checkpoints, resume, Stages(), teacher)
    return {}


def _heal(
    config: HealConfig,
    target: Target,
    prompts: dict[str, PromptSet],
    sources: dict[str, PromptSet] | None,
    checkpoints: Checkpoints,
    resume: Path | None,
) -> dict[str, Any]:
    """Everything the main process does (see the module docstring)."""
    stages = Stages()
    with run_directory(config.out, config.overwrite) as tmp:
        write_json(tmp / "config.json", to_dict(config))
        with stages.stage("load models"):
            loaded = load_trainable(target.model, config, config.adapter)
            original = _load_original(config, target)
        _check_same_vocabulary(original, loaded)
        evaluator, judges = build_evaluator(config, loaded, prompts, config.seed)
        data = {
            k: {"name": s.name, "n": len(s), "sha256": s.sha256}
            for k, s in {**prompts, **(sources or {})}.items()
        }
        write_json(
            tmp / "environment.json", environment_record(str(loaded.device), config.seed, data)
        )
        with process_state().main_process_first():
            spec, counts = _preferences(
                config, sources, loaded, original, judges[0], checkpoints, stages
            )
        if config.preferences is None:
            shutil.copyfile(spec, tmp / PAIRS_FILE)
        with stages.stage("eval before"):
            before = evaluator.assess(loaded.model, "before healing")
            # The original's continuations are the reference of both comparisons (generated
            # once: the original is loaded again after training, or kept as distill's teacher).
            reference = record_kl(evaluator, original.model, loaded.model, before)
        original_record = model_record(original)
        # distill's teacher of harmless pairs: kept in memory through training (and reused for
        # the KL after it); the DPO losses do not need it, so its memory is freed meanwhile.
        kept = original if config.loss == "distill" else None
        del original
        gc.collect()
        teacher = None if kept is None else kept.model
        trainer, training = _train(
            config, loaded, spec, counts, checkpoints, resume, stages, teacher
        )
        with stages.stage("merge"):
            model = merged_model(
                trainer, config.adapter, tmp / "adapter", lambda: load_model(
                    str(loaded.source), device=config.device, dtype=config.dtype,
                    trust_remote_code=config.trust_remote_code,
                ),
            )  # fmt: skip
            del trainer, teacher
            gc.collect()
        prepare_tokenizer(loaded.tokenizer)
        with stages.stage("eval after"):
            after = evaluator.assess(model, "healed")
            original = kept if kept is not None else _load_original(config, target)
            record_kl(evaluator, original.model, model, after, reference)
            del original, kept
        record = _record(config, target, original_record, training, before, after)
        with stages.stage("export"):
            probe = list(evaluator.sets.harmless.texts[:4])
            export_diff = save_trained(model, loaded, tmp / "model", record, probe)
        extra = {"original_model": original_record, "n_examples": config.n_examples,
                 "timings": stages.to_dict()}  # fmt: skip
        report = Report.model_validate(
            report_dict("heal", loaded, prompts, judges, Outcome(before, after, training),
                        export_diff, extra)
        )  # fmt: skip
        write_reports(tmp, report)
    checkpoints.remove()
    print(summary_table(report))
    print(f"\nRun directory: {config.out}")
    return report.model_dump(mode="json")


def _load_original(config: HealConfig, target: Target, device: str | None = None) -> LoadedModel:
    return load_model(
        target.original, revision=target.original_revision, device=device or config.device,
        dtype=config.dtype, trust_remote_code=config.trust_remote_code,
    )  # fmt: skip


def _check_same_vocabulary(original: LoadedModel, model: LoadedModel) -> None:
    if original.tokenizer.get_vocab() != model.tokenizer.get_vocab():
        raise ConfigError(
            f"the original {original.name} and {model.name} use different tokenizers, so the one "
            "cannot be the other abliterated; pass the right --original."
        )


def _preferences(
    config: HealConfig,
    sources: dict[str, PromptSet] | None,
    loaded: LoadedModel,
    original: LoadedModel,
    judge: Any,
    checkpoints: Checkpoints,
    stages: Stages,
) -> tuple[str, dict[str, int] | None]:
    """The preference dataset to train on (``--preferences``, or the self-built pairs, built
    once and kept in the checkpoint directory for a resumed run) and the pair counts."""
    if sources is None:
        assert config.preferences is not None
        return config.preferences, None
    path = checkpoints.path / PAIRS_FILE
    counts_path = checkpoints.path / "pair_counts.json"
    if not path.is_file() or not counts_path.is_file():
        with stages.stage("build pairs"):
            pairs, counts = build_pairs(
                original.model, loaded.model, loaded.tokenizer, sources["pairs_harmful"],
                sources["pairs_harmless"], judge, max_new_tokens=config.pair_tokens,
                batch_size=config.batch_size, system_prompt=config.system_prompt,
            )  # fmt: skip
        write_pairs(path, pairs)
        write_json(counts_path, counts)
    import json

    counts = json.loads(counts_path.read_text(encoding="utf-8"))
    log.info("preference pairs: %s", counts)
    if counts["harmless"] + counts["harmful"] == 0:
        raise ConfigError(
            "no preference pair could be built: the two models answer every prompt alike; is "
            "MODEL abliterated from --original?"
        )
    return str(path), counts


def _train(
    config: HealConfig,
    loaded: LoadedModel,
    spec: str,
    counts: dict[str, int] | None,
    checkpoints: Checkpoints,
    resume: Path | None,
    stages: Stages,
    teacher: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """DPO or self-distillation (``teacher``: the original, for ``distill``) on the pairs (every
    process); the trainer and the training record."""
    from abliterate.train.distill import distill_trainer
    from abliterate.train.dpo import LOSS_TYPES, dpo_trainer  # needs trl (checked at the start)

    with stages.stage("train"):
        with process_state().main_process_first():
            dataset = build_preferences(spec, config.system_prompt, checkpoints.path / "dataset")
        train, heldout = split_heldout(dataset, config.n_heldout)
        arguments = trainer_arguments(
            config, output_dir=checkpoints.path, model=loaded.model, seed=config.seed
        )
        distill = config.loss == "distill"
        if distill:
            assert teacher is not None
            trainer = distill_trainer(
                loaded.model, teacher, loaded.tokenizer, train, heldout, arguments,
                max_length=config.max_length, peft_config=lora_config(config),
            )  # fmt: skip
        else:
            trainer = dpo_trainer(
                loaded.model, loaded.tokenizer, train, heldout, arguments,
                max_length=config.max_length, beta=config.beta, loss=config.loss,
                peft_config=lora_config(config),
            )  # fmt: skip
        result = run_training(trainer, checkpoints, resume, "Distill" if distill else "DPO")
    lora = config.adapter != "full"
    training = {
        "method": "distill" if distill else "dpo",
        "adapter": config.adapter,
        "data": config.preferences or f"pairs built from {config.model}",
        "n_examples": len(train),
        "n_heldout": 0 if heldout is None else len(heldout),
        "epochs": config.epochs,
        "learning_rate": config.learning_rate,
        "batch_size": (
            config.train_batch_size * config.gradient_accumulation * process_state().num_processes
        ),
        "lora_r": config.lora_r if lora else None,
        "lora_alpha": config.lora_alpha if lora else None,
        "beta": None if distill else config.beta,
        "loss_type": ["forward_kl"] if distill else LOSS_TYPES[config.loss],
        "pairs": counts,
        **result,
    }
    return trainer, training


def _record(
    config: HealConfig,
    target: Target,
    original: dict[str, Any],
    training: dict[str, Any],
    before: Any,
    after: Any,
) -> dict[str, Any]:
    """``model/abliteration.json``: the original as ``base_model`` (so that ``abliterate chat``
    puts the healed model beside it), the healing and its measured metrics."""
    return {
        "abliterate_version": __version__,
        "base_model": {k: original[k] for k in ("name", "source", "revision")},
        "healed_from": target.model,
        "training": {k: v for k, v in training.items() if k != "losses"},
        "metrics": {
            side: {
                "refusal_rate": m.harmful.refusal_rate,
                "kl_divergence": m.kl_divergence,
                "kl_divergence_multi_token": m.extra["kl_divergence_multi_token"],
            }
            for side, m in (("before", before), ("after", after))
        },
    }
