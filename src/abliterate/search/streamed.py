"""Scoring edits on a model that does not fit in memory: many edits in one layer-streamed pass.

Selection and search need only next-token log-probabilities under an edit. On a
:class:`~abliterate.model.layerwise.LayerwiseModel` each edit is one *stream* of a pass: the
edit's hooks (:func:`~abliterate.edit.hooks.edit_hooks`) are installed on the writers of each
stage as it runs, and :func:`streamed_logprobs` puts as many edits in one pass as
:data:`STREAM_MEMORY` of residual streams allows, so screening every candidate direction costs
a few reads of the weights rather than one per candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from abliterate.core.edits import Edit
from abliterate.data.chat import batches
from abliterate.edit.hooks import edit_hooks
from abliterate.model.forward import in_order

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from abliterate.model.layerwise import LayerwiseModel, StageContext

STREAM_MEMORY = 2 * 2**30
"""Bytes of residual streams one pass may hold: edits beyond it go to further passes."""


def edit_stages(model: LayerwiseModel, edit: Edit | None) -> StageContext:
    """The stream context of ``edit``: at each stage, its hooks on that stage's writers."""
    if edit is None:
        return lambda _stage: nullcontext()

    def stage(layer: int | None) -> AbstractContextManager[Any]:
        writers = tuple(w for w in model.anatomy.writers if w.writer.layer == layer)
        return edit_hooks(model.model, edit, replace(model.anatomy, writers=writers))

    return stage


def streamed_logprobs(
    model: LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    text_sets: Sequence[Sequence[str]],
    edits: Sequence[Edit | None],
    *,
    batch_size: int = 32,
    desc: str = "Scoring",
) -> list[list[torch.Tensor]]:
    """Next-token log-probabilities of every text set under every edit (None: unedited).

    Returns:
        Per edit, per text set, ``(len(texts), vocab)`` float32 on the CPU, in text order.
    """
    pieces = [list(batches(tokenizer, texts, batch_size)) for texts in text_sets]
    encodings = [enc for set_pieces in pieces for _, enc in set_pieces]
    tokens = sum(int(enc["input_ids"].numel()) for enc in encodings)
    per_stream = tokens * model.anatomy.d_model * model.dtype.itemsize
    group = max(1, STREAM_MEMORY // max(per_stream, 1))
    out: list[list[torch.Tensor]] = []
    for start in range(0, len(edits), group):
        chunk = edits[start : start + group]
        passes = -(-len(edits) // group)
        label = desc if passes == 1 else f"{desc} ({start // group + 1}/{passes})"
        logits = model.run(encodings, [edit_stages(model, e) for e in chunk], desc=label)
        assert logits is not None
        for per_batch in logits:
            rows = iter(per_batch)
            result = []
            for texts, set_pieces in zip(text_sets, pieces, strict=True):
                scored = [(idx, torch.log_softmax(next(rows), dim=-1)) for idx, _ in set_pieces]
                result.append(torch.stack(in_order(len(texts), scored)))
            out.append(result)
    return out


def streamed_generate(
    model: LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    edit: Edit | None = None,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    desc: str = "Generating (layer-streamed)",
) -> list[str]:
    """Greedy continuations of chat-formatted ``texts`` under ``edit``, decoded without special
    tokens, as :func:`abliterate.model.forward.generate` gives them for a loaded model. Each
    new token reads every weight once (all batches advance together)."""
    pieces = list(batches(tokenizer, texts, batch_size))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = model.generate(
        [enc for _, enc in pieces],
        max_new_tokens,
        edit_stages(model, edit),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=int(pad),
        desc=desc,
    )
    decoded = [
        (idx, [str(tokenizer.decode(row, skip_special_tokens=True)).strip() for row in new])
        for (idx, _), new in zip(pieces, tokens, strict=True)
    ]
    return in_order(len(texts), decoded)
