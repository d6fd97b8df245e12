"""Export of an edited model: safetensors weights, config, tokenizer, chat template, generation
config, plus ``abliteration.json`` recording the edit, its provenance and its measured metrics.

:func:`verify_export` reloads the written model and compares its logits with the in-memory model
that was evaluated, so "the exported model is the one that was scored" is checked on every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from abliterate.data.chat import batches
from abliterate.files import write_json
from abliterate.model.devices import input_device
from abliterate.model.loading import auto_model_class

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
    record: dict[str, Any],
) -> None:
    """Write the model as safetensors with its tokenizer and ``abliteration.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    write_json(directory / "abliteration.json", record)


@torch.inference_mode()
def _last_logits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]
) -> torch.Tensor:
    device = input_device(model)
    rows: list[torch.Tensor | None] = [None] * len(texts)
    for idx, enc in batches(tokenizer, texts, batch_size=len(texts)):
        logits = model(**enc.to(device)).logits[:, -1, :].float().cpu()  # (batch, vocab)
        for row, i in enumerate(idx):
            rows[i] = logits[row]
    return torch.stack(rows)  # type: ignore[arg-type]


def verify_export(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
    texts: Sequence[str],
) -> float:
    """Reload ``directory`` and return the largest absolute logit difference on ``texts``.

    Zero means the saved model reproduces the evaluated model exactly.
    """
    reference = _last_logits(model, tokenizer, texts)
    placed = getattr(model, "hf_device_map", None)
    # A model spread over devices is reloaded the same way (one device might not hold it).
    reloaded: PreTrainedModel = auto_model_class(model.config).from_pretrained(
        str(directory), dtype=model.dtype, use_safetensors=True, device_map=placed
    )
    if placed is None:
        reloaded.to(next(model.parameters()).device)  # type: ignore[arg-type]
    reloaded.eval()
    try:
        again = _last_logits(reloaded, tokenizer, texts)
    finally:
        del reloaded
    return float((reference - again).abs().max())
