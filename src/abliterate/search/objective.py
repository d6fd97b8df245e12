"""The search's cheap objective: what one trial costs, and the precision it is scored in.

A trial never generates text. It costs one forward pass (last position only, the chat
template's shared prefix computed once per batch) over the harmful and harmless *validation*
prompts: the objectives are the mean next-token refusal probability on harmful prompts and the
first-token KL divergence on harmless prompts (:class:`CheapObjective`). :func:`search_model`
gives the model those passes run on: the model itself, or a bfloat16 copy where the device
computes bfloat16 natively (:func:`native_bf16`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from abliterate.core.edits import Edit
from abliterate.core.stats import kl_divergence, refusal_scores
from abliterate.edit.hooks import edit_hooks
from abliterate.model.forward import SharedPrefixScorer
from abliterate.model.layerwise import LayerwiseModel
from abliterate.search.streamed import streamed_logprobs

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
    # A model placed by a device map (or quantized) is scored as it is: a copy would need the
    # memory that the placement saves, and accelerate's hooks do not survive a deep copy.
    if search_dtype == "model" or getattr(model, "hf_device_map", None) is not None:
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
        model: A loaded model (scored under the edit's hooks, the chat template's shared
            opening computed once per batch) or a layer-streamed one (one pass over the weights
            per edit, harmful and harmless prompts together).
        harmful, harmless: Chat-formatted validation texts.
        refusal_ids: Token ids whose probability makes up the refusal probability.
    """

    def __init__(
        self,
        model: PreTrainedModel | LayerwiseModel,
        tokenizer: PreTrainedTokenizerBase,
        harmful: Sequence[str],
        harmless: Sequence[str],
        refusal_ids: Sequence[int],
        batch_size: int = 32,
    ) -> None:
        self.model = model
        self.refusal_ids = list(refusal_ids)
        if isinstance(model, LayerwiseModel):
            streamed = model

            def logprobs(edit: Edit | None) -> tuple[torch.Tensor, torch.Tensor]:
                sets = (harmful, harmless)
                (lp,) = streamed_logprobs(streamed, tokenizer, sets, [edit], batch_size=batch_size)
                return lp[0], lp[1]

        else:
            loaded = model
            harmful_scorer = SharedPrefixScorer(loaded, tokenizer, harmful, batch_size)
            harmless_scorer = SharedPrefixScorer(loaded, tokenizer, harmless, batch_size)

            def logprobs(edit: Edit | None) -> tuple[torch.Tensor, torch.Tensor]:
                with nullcontext() if edit is None else edit_hooks(loaded, edit):
                    return harmful_scorer.logprobs(), harmless_scorer.logprobs()

        self._logprobs = logprobs
        base_harmful, self.base_harmless = logprobs(None)
        self.baseline = self._refusal(base_harmful)

    def _refusal(self, logprobs: torch.Tensor) -> dict[str, float]:
        # Mean probability that the answer opens like a refusal: bounded and close in meaning
        # to a refusal *rate*, unlike the mean log-odds, which a few prompts can dominate.
        prob = torch.logsumexp(logprobs[:, self.refusal_ids], dim=-1).exp()
        return {
            "refusal_prob": float(prob.mean()),
            "refusal_score": float(refusal_scores(logprobs, self.refusal_ids).mean()),
        }

    def __call__(self, edit: Edit) -> dict[str, float]:
        """``{"refusal_prob", "refusal_score", "kl"}`` of ``edit`` on the validation prompts."""
        harmful, harmless = self._logprobs(edit)
        kl = float(kl_divergence(self.base_harmless, harmless).mean())
        return {**self._refusal(harmful), "kl": kl}
