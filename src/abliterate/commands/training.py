"""What ``sft`` and ``heal`` share: the held-out evaluation before and after training, KL to a
reference model, the saved merged model and the report.

Both commands measure the model before training (``baseline`` in ``report.json``) and the
merged model after it (``edited``) with one :class:`~abliterate.eval.evaluator.Evaluator` on the
held-out evaluation prompts, and the KL divergences of each against a *reference*: for ``sft``
the model before training, for ``heal`` the original model the abliterated one was made from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate import __version__
from abliterate.config import EvalPromptOptions, HealConfig, SftConfig, TrainOptions
from abliterate.data.chat import ChatSet
from abliterate.data.prompts import resolve_prompts
from abliterate.edit.export import save_model, verify_export
from abliterate.eval.evaluator import EvalSets, Evaluator
from abliterate.eval.judges import JudgeOptions, build_judges

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from abliterate.data.prompts import PromptSet
    from abliterate.eval.evaluator import Assessment
    from abliterate.eval.judges import Judge
    from abliterate.model.loading import LoadedModel


def process_state() -> Any:
    """accelerate's view of this process: the only one, or one of several under ``accelerate
    launch`` (then only the main process evaluates and writes the run directory)."""
    from accelerate import PartialState

    return PartialState()


def eval_prompts(config: EvalPromptOptions) -> dict[str, PromptSet]:
    """The held-out harmful and harmless evaluation prompts, capped at ``n_eval``."""
    col, n = config.prompt_column, config.n_eval
    return {
        "eval_harmful": resolve_prompts(config.eval_harmful, "harmful", "eval", col).head(n),
        "eval_harmless": resolve_prompts(config.eval_harmless, "harmless", "eval", col).head(n),
    }


def build_evaluator(
    config: SftConfig | HealConfig, loaded: LoadedModel, prompts: dict[str, PromptSet], seed: int
) -> tuple[Evaluator, list[Judge]]:
    """The evaluator of both models, with the judges and benchmarks of ``config``."""
    tok, system = loaded.tokenizer, config.system_prompt
    judges = build_judges(
        config.judge, JudgeOptions(device=str(loaded.device), batch_size=config.batch_size)
    )
    sets = EvalSets(
        ChatSet.format(tok, prompts["eval_harmful"], system),
        ChatSet.format(tok, prompts["eval_harmless"], system),
    )
    evaluator = Evaluator(
        tok, sets, judges, max_new_tokens=config.max_new_tokens, kl_tokens=config.kl_tokens,
        batch_size=config.batch_size, benchmarks=config.benchmarks,
        benchmark_limit=config.benchmark_limit, seed=seed, system_prompt=system,
    )  # fmt: skip
    return evaluator, judges


def record_kl(
    evaluator: Evaluator, reference: PreTrainedModel, model: PreTrainedModel, result: Assessment
) -> None:
    """Set ``result``'s first-token and multi-token ``KL(reference ‖ model)`` (both from one
    pass over the harmless prompts: the first generated position is the first-token KL)."""
    multi, first = evaluator.multi_token_kl(reference, model_q=model)
    result.kl_divergence = first
    result.extra["kl_divergence_multi_token"] = multi
    result.extra["kl_tokens"] = evaluator.kl_tokens


def file_sha256(spec: str) -> str | None:
    """SHA-256 of a dataset file, read in chunks (None for a hub dataset)."""
    path = Path(spec)
    if spec.startswith("hf:") or not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def training_fingerprint(options: TrainOptions, **inputs: Any) -> dict[str, Any]:
    """What checkpoints must share to be resumed: the training options (``restart`` aside) and
    the inputs (model, data and its hash, seed, ...)."""
    trained = options.section(TrainOptions).model_dump(mode="json", exclude={"restart"})
    return {**inputs, **trained}


def model_record(loaded: LoadedModel) -> dict[str, Any]:
    """``report.json``'s description of a loaded model."""
    n_params = sum(p.numel() for p in loaded.model.parameters())
    return {
        "name": loaded.name,
        "source": loaded.source,
        "revision": loaded.revision,
        "architecture": f"{loaded.model.config.model_type}: {n_params / 1e6:.1f}M parameters",
    }


@dataclass
class Outcome:
    """A trained model's before/after evaluation and its training record."""

    before: Assessment
    after: Assessment
    training: dict[str, Any]


def save_trained(
    model: PreTrainedModel,
    loaded: LoadedModel,
    directory: Path,
    record: dict[str, Any],
    probe: list[str],
) -> float:
    """Write the merged model (with ``abliteration.json`` = ``record``) and return the largest
    logit difference of the reloaded copy (0: the saved model is the evaluated one)."""
    save_model(model, loaded.tokenizer, directory, record)
    return verify_export(model, loaded.tokenizer, directory, probe)


def report_dict(
    command: str,
    loaded: LoadedModel,
    prompts: dict[str, PromptSet],
    judges: list[Judge],
    outcome: Outcome,
    export_diff: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The ``run``-shaped report of a training command (``baseline``: before, ``edited``:
    after), before validation."""
    data = {k: {"name": s.name, "n": len(s), "sha256": s.sha256} for k, s in prompts.items()}
    return {
        "abliterate_version": __version__,
        "command": command,
        "model": model_record(loaded),
        "data": data,
        "judges": [j.name for j in judges],
        "checks": {"export_reload_max_abs_diff": export_diff},
        "training": outcome.training,
        "baseline": outcome.before.to_dict(),
        "edited": outcome.after.to_dict(),
        **extra,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """An indented JSON file."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
