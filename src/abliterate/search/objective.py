"""Optimized abliteration: a multi-objective Optuna search over how the direction is removed.

A single mean-difference direction removed at full strength from every writer takes most
refusals away but also moves the model on harmless prompts. This module searches a richer edit
space (:class:`EditParams`) for edits that refuse less *and* move harmless prompts less:

* direction source: a fractional layer position (interpolating the two neighbouring layers'
  directions), or each layer its own direction; optionally *projected* (orthogonal to the
  harmless mean, see :meth:`~abliterate.directions.Candidates.direction`);
* a strength :class:`Profile` across layers for the attention outputs and one for the MLP
  outputs (peak, position of the peak, width, edge strength; 0 outside the window);
* plain or norm-preserving weight edits (:data:`~abliterate.interventions.EDIT_MODES`);
* with ``max_directions > 1``, how many directions to remove at once: the mean difference plus
  the top singular vectors of the per-prompt differences
  (:meth:`~abliterate.directions.Candidates.extra_directions`).

Every point of the space is an :class:`~abliterate.interventions.EditSpec`, so it is scored
through hooks and baked into the weights by the same code.

The search never generates text. Each trial costs one forward pass (last position only) over
the harmful and harmless *validation* prompts: the objectives are the mean next-token refusal
probability on harmful prompts and the first-token KL divergence on harmless prompts, both
minimised with multi-objective TPE. Only Pareto-front trials are then *confirmed* by
generating answers to the harmful validation prompts and judging them, and the chosen trial is
(:func:`choose`) the lowest-KL confirmed trial whose refusal rate is at most the target. The
evaluation prompts are not touched here: the caller evaluates the chosen edit on them once.

The study lives in Optuna storage (by default a SQLite file beside the run directory), so a
killed run resumes where it stopped and several workers can share one study: trials of a worker
that died (same host and a dead process id, or a stale heartbeat) are marked failed and not
counted, and the search runs until the number of *completed* trials reaches the budget (see
:mod:`abliterate.study`; the front and the choice rule are in :mod:`abliterate.pareto`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from abliterate.core.edits import EditSpec
from abliterate.core.stats import kl_divergence, refusal_scores
from abliterate.model.forward import SharedPrefixScorer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


log = logging.getLogger(__name__)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (so faster than float32).

    CUDA: the device supports bf16. CPU: the x86 flags ``avx512_bf16`` or ``amx_bf16`` (Linux's
    ``/proc/cpuinfo``), or the Arm ``bf16`` feature. Elsewhere False: bf16 emulated on a CPU
    without those instructions can be slower than float32.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags: set[str] = set()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def search_model(model: PreTrainedModel, search_dtype: str) -> PreTrainedModel:
    """The model the search scores with: ``model`` itself, or a copy in another precision.

    ``"auto"`` copies a float32 model to bfloat16 where that is native (:func:`native_bf16`);
    ``"model"`` never copies; a dtype name converts to it (a copy unless already so). The copy
    costs memory (half the float32 model for bfloat16) for as long as the search runs.
    """
    current = next(model.parameters()).dtype
    if search_dtype == "model":
        return model
    if search_dtype == "auto":
        device = next(model.parameters()).device
        if current != torch.float32 or not native_bf16(device):
            return model
        target = torch.bfloat16
    else:
        target = getattr(torch, search_dtype)
    if current == target:
        return model
    log.info("search scores trials in %s on a copy of the model", str(target).split(".")[-1])
    # Each parameter is converted straight into the copy (no transient full-precision copy);
    # a shared parameter (tied embeddings) stays shared, as deepcopy's memo maps it once.
    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(p.detach().to(target), requires_grad=False)
        for p in model.parameters()
    }
    clone = copy.deepcopy(model, memo)
    return clone.to(target)  # type: ignore[arg-type]  # buffers too; parameters are done


class CheapObjective:
    """The generation-free objectives of one edit: refusal probability and first-token KL.

    Args:
        harmful, harmless: Chat-formatted validation texts.
        refusal_ids: Token ids whose probability makes up the refusal probability.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        harmful: Sequence[str],
        harmless: Sequence[str],
        refusal_ids: Sequence[int],
        batch_size: int = 32,
    ) -> None:
        # The chat template's shared opening is computed once per batch (see abliterate.prefix).
        self.harmful = SharedPrefixScorer(model, tokenizer, harmful, batch_size)
        self.harmless = SharedPrefixScorer(model, tokenizer, harmless, batch_size)
        self.refusal_ids = list(refusal_ids)
        self.base_harmless = self.harmless.logprobs()
        self.baseline = self._refusal(self.harmful.logprobs())

    def _refusal(self, logprobs: torch.Tensor) -> dict[str, float]:
        # Mean probability that the answer opens like a refusal: bounded and close in meaning
        # to a refusal *rate*, unlike the mean log-odds, which a few prompts can dominate.
        prob = torch.logsumexp(logprobs[:, self.refusal_ids], dim=-1).exp()
        return {
            "refusal_prob": float(prob.mean()),
            "refusal_score": float(refusal_scores(logprobs, self.refusal_ids).mean()),
        }

    def __call__(self, spec: EditSpec) -> dict[str, float]:
        """``{"refusal_prob", "refusal_score", "kl"}`` of ``spec`` on the validation prompts."""
        harmless = self.harmless.logprobs(spec)
        kl = float(kl_divergence(self.base_harmless, harmless).mean())
        return {**self._refusal(self.harmful.logprobs(spec)), "kl": kl}
