"""Checks that an exported artefact (a GGUF file, a merged adapter) is the model that was scored:
logits of two models compared on the same token ids at every position."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from abliterate.core.stats import kl_divergence
from abliterate.model.forward import model_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class LogitDiff:
    """How far one model's next-token predictions are from a reference's.

    Attributes:
        max_abs_logit: Largest ``|Δ logit|`` over every position and vocabulary entry.
        mean_kl: Mean KL(reference ‖ other) of the next-token distributions, over positions.
        n_positions: Positions compared.
    """

    max_abs_logit: float
    mean_kl: float
    n_positions: int

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready form."""
        return {"max_abs_logit": self.max_abs_logit, "mean_kl": self.mean_kl,
                "n_positions": self.n_positions}  # fmt: skip


@torch.inference_mode()
def logit_difference(
    reference: PreTrainedModel,
    other: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
) -> LogitDiff:
    """Compare ``other`` with ``reference`` on ``texts`` (each run alone, so no padding enters),
    every position of every text, through the same tokenizer."""
    worst, kl_sum, n = 0.0, 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        p = reference(input_ids=ids.to(model_device(reference))).logits[0].float().cpu()
        q = other(input_ids=ids.to(model_device(other))).logits[0].float().cpu()  # (pos, vocab)
        worst = max(worst, float((p - q).abs().max()))
        kl = kl_divergence(torch.log_softmax(p, -1), torch.log_softmax(q, -1))  # (pos,)
        kl_sum += float(kl.sum())
        n += int(kl.numel())
    return LogitDiff(worst, kl_sum / max(n, 1), n)


def load_gguf_model(path: Path) -> PreTrainedModel:
    """A GGUF file loaded (dequantized to float32) by transformers, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()
