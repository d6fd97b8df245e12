"""The held-out evaluation of a run's edit: the unedited model, the edit baked into its weights
(hooks and weights compared), and the edited model, by the one evaluator
(:func:`evaluate_edit`); the same for a layer-streamed run, whose edited model is written by
streaming apply (:func:`evaluate_streamed`); and the full-precision copy that an edit measured
on a quantized or offloaded model is baked into (:func:`full_precision_model`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate.commands.evaluate import reasoning_settings
from abliterate.commands.runsets import SCORED
from abliterate.commands.streamed import (
    export_streamed,
    load_offloaded,
    resident_minimum,
)
from abliterate.config import RunConfig
from abliterate.core.ablation import Ablation
from abliterate.data.chat import ChatSet
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.weights import bake
from abliterate.eval.cache import baseline_assessment
from abliterate.eval.evaluator import EvalSets, Evaluator
from abliterate.model.forward import next_token_logprobs
from abliterate.model.layerwise import LayerwiseModel
from abliterate.model.loading import load_model
from abliterate.progress import Stages
from abliterate.search.streamed import streamed_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from abliterate.eval.evaluator import Assessment
    from abliterate.eval.judges import Judge
    from abliterate.model.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class EditOutcome:
    """The held-out evaluation of an edit: both models, the hooks-vs-weights check, and where
    the baseline came from (the ``baseline_cache`` record; None: not cacheable)."""

    baseline: Assessment
    edited: Assessment
    hooks_vs_weights: float
    edited_writers: dict[str, object]
    baseline_cache: dict[str, Any] | None = None


def run_evaluator(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase, chats: dict[str, ChatSet], judge: Judge
) -> Evaluator:
    """The evaluator of a run's held-out sets (the harmless set's next-token distributions
    read with thinking off, see :data:`~abliterate.commands.runsets.SCORED`)."""
    return Evaluator(
        tokenizer,
        EvalSets(chats["eval_harmful"], chats[SCORED["eval_harmless"]]),
        [judge],
        max_new_tokens=config.max_new_tokens,
        kl_tokens=config.kl_tokens,
        batch_size=config.batch_size,
        system_prompt=config.system_prompt,
        **reasoning_settings(config),
    )


def evaluate_edit(
    config: RunConfig,
    loaded: LoadedModel,
    edit: Ablation,
    chats: dict[str, ChatSet],
    judge: Judge,
    stages: Stages,
) -> EditOutcome:
    """Evaluate the unedited model (or read its evaluation from the baseline cache), bake
    ``edit`` into it, and evaluate it again.

    The KL divergences are measured through hooks before the weights are baked, over the
    baseline's continuations; the hooks and the baked weights are then compared on a few
    prompts, so the evaluated model is the one the hooks describe.
    """

    model, tok = loaded.model, loaded.tokenizer
    evaluator = run_evaluator(config, tok, chats, judge)
    with stages.stage("baseline eval"):
        baseline, cached = baseline_assessment(
            evaluator, loaded, config.model, use_cache=config.baseline_cache
        )
    with stages.stage("KL divergence"):
        kl = evaluator.kl(baseline, model, q_context=lambda: edit_hooks(model, edit))
    with stages.stage("bake edit"):
        probe = chats[SCORED["eval_harmless"]].texts[:4]
        with edit_hooks(model, edit):
            hooked = next_token_logprobs(model, tok, probe, batch_size=config.batch_size)
        summary = bake(model, edit)
        baked = next_token_logprobs(model, tok, probe, batch_size=config.batch_size)
        hooks_vs_weights = float((hooked - baked).abs().max())
    with stages.stage("edited eval"):
        edited = evaluator.assess(model, "abliterated")
        evaluator.compare(edited, kl)
    return EditOutcome(baseline, edited, hooks_vs_weights, summary.to_dict(), cached)


def evaluate_streamed(
    config: RunConfig,
    loaded: LoadedModel,
    measured: LayerwiseModel,
    edit: Ablation,
    chats: dict[str, ChatSet],
    judge: Judge,
    stages: Stages,
    tmp: Path,
) -> EditOutcome:
    """:func:`evaluate_edit` for a ``--stream`` run (see :mod:`abliterate.commands.streamed`).

    The edited model is the checkpoint that streaming apply writes into ``tmp/model``; both it
    and the original (``loaded``) are evaluated with what does not fit offloaded to disk. The
    hooks-vs-weights check compares the layer-streamed original under the edit's hooks with
    that checkpoint. The baseline comes from the baseline cache when it can (its key holds the
    checkpoint's files, dtype and device, as for :func:`evaluate_edit`).
    """
    tok = loaded.tokenizer
    evaluator = run_evaluator(config, tok, chats, judge)
    with stages.stage("baseline eval"):
        baseline, cached = baseline_assessment(
            evaluator, loaded, config.model, use_cache=config.baseline_cache
        )
    with stages.stage("export"):
        summary, _files = export_streamed(edit, measured.checkpoint.directory, tmp / "model")
    folder, minimum = tmp / ".offload" / "edited", resident_minimum(measured)
    edited_model = load_offloaded(str(tmp / "model"), config, folder, minimum).model
    with stages.stage("edited eval"):
        edited = evaluator.assess(edited_model, "abliterated")
    with stages.stage("KL divergence"):
        evaluator.compare(edited, evaluator.kl(baseline, loaded.model, model_q=edited_model))
    with stages.stage("hooks vs weights"):
        probe = chats[SCORED["eval_harmless"]].texts[:4]
        ((hooked,),) = streamed_logprobs(
            measured, tok, [probe], [edit], batch_size=config.batch_size
        )
        baked = next_token_logprobs(edited_model, tok, probe, batch_size=config.batch_size)
    hooks_vs_weights = float((hooked - baked).abs().max())
    return EditOutcome(baseline, edited, hooks_vs_weights, summary.to_dict(), cached)


def full_precision_model(
    config: RunConfig, measured: LoadedModel, why: str, stages: Stages
) -> LoadedModel:
    """The checkpoint of ``measured`` loaded again in full precision on the CPU, to bake the
    edit into, evaluate and export (see the module docstring); ``measured`` is released first,
    so the two are never held at once.

    ``why`` says why ``measured`` cannot be edited in place; the copy uses the measurement
    model's compute dtype (bfloat16 for a model quantized on a GPU).
    """
    import gc

    import torch

    dtype = str(measured.model.dtype).removeprefix("torch.")
    log.info("the edit is baked into a full-precision copy on the CPU: %s", why)
    measured.model = None  # type: ignore[assignment]  # the caller's reference goes too
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with stages.stage("load full precision"):
        return load_model(
            config.model,
            revision=config.revision,
            device="cpu",
            dtype=dtype,
            trust_remote_code=config.trust_remote_code,
        )
