"""Multi-token KL divergence: damage measured over a continuation, not only the first token.

First-token KL is known to understate damage: an edit can leave the first token alone and still
derail what follows. The reference model p greedily continues each prompt
(:func:`reference_continuations`, up to and including its first end-of-sequence token); then
both p and q run on prompt + continuation and ``KL(p ‖ q)`` is averaged over every position of
the continuation (:func:`kl_per_prompt`). Position 0 is the first-token KL: the next-token
distributions after the prompt.

The continuations are data: the baseline cache (:mod:`abliterate.eval.cache`) keeps them, so a
later run scores against them without generating them again, and a cold run scores against the
very same token lists, so both report the same numbers.

p and q may be two models, or one model in two states: each side runs inside its own context
(``p_context`` / ``q_context``, e.g. :func:`abliterate.edit.hooks.edit_hooks` of an edit), which
the caller supplies; this module never installs an edit itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from abliterate.core.stats import position_kl
from abliterate.data.chat import batches
from abliterate.model.forward import greedy_new_tokens, in_order, model_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Context = Callable[[], AbstractContextManager[Any]]


def end_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end an answer: the tokenizer's end-of-sequence token and every one the
    model's generation config stops at (chat models often have several)."""
    ids = {tokenizer.eos_token_id}
    config = getattr(model, "generation_config", None)
    stop = getattr(config, "eos_token_id", None)
    ids.update(stop if isinstance(stop, list) else [stop])
    return {int(i) for i in ids if i is not None}


def reference_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    n_tokens: int,
    batch_size: int = 32,
) -> list[list[int]]:
    """Each text's greedy continuation by ``model``: at most ``n_tokens`` token ids, cut after
    the first end-of-sequence token (which is kept: predicting the end is part of the answer)."""
    ends = end_token_ids(model, tokenizer)
    out = []
    for row in greedy_new_tokens(
        model, tokenizer, texts, max_new_tokens=n_tokens, batch_size=batch_size
    ):
        cut = next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
        out.append(row[:cut])
    return out


@torch.inference_mode()
def kl_per_prompt(
    model_p: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    continuations: Sequence[Sequence[int]],
    *,
    model_q: PreTrainedModel | None = None,
    p_context: Context = nullcontext,
    q_context: Context = nullcontext,
    batch_size: int = 32,
) -> tuple[list[float], list[float]]:
    """``KL(p ‖ q)`` of each prompt over its continuation, and at its first position.

    Args:
        continuations: One non-empty token list per text (:func:`reference_continuations`).
        model_q: The compared model (default: ``model_p``, then in another context).

    Returns:
        ``(multi_token, first_token)``: per prompt, in text order, in nats.
    """
    if len(continuations) != len(texts) or not all(continuations):
        raise ValueError("one non-empty continuation per text is needed")
    q_model = model_p if model_q is None else model_q
    device, q_device = model_device(model_p), model_device(q_model)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    def pieces() -> Iterator[tuple[list[int], list[tuple[float, float]]]]:
        for idx, enc in batches(tokenizer, texts, batch_size):
            width = max(len(continuations[i]) for i in idx)
            new = torch.full((len(idx), width), pad, dtype=torch.long)  # (batch, width)
            valid = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                new[row, : len(continuations[i])] = torch.tensor(continuations[i])
                valid[row, : len(continuations[i])] = 1
            seq = torch.cat([enc["input_ids"], new], dim=1).to(device)
            mask = torch.cat([enc["attention_mask"], valid], dim=1).to(device)
            # Logits at positions n_prompt-1 … n_prompt+width-2 predict the continuation; only
            # the last width+1 positions are projected onto the vocabulary (the prompt's logits
            # would cost batch × prompt_len × vocab floats for nothing).
            keep = width + 1
            with p_context():
                lp_p = model_p(input_ids=seq, attention_mask=mask, logits_to_keep=keep).logits
            with q_context():
                out_q = q_model(
                    input_ids=seq.to(q_device), attention_mask=mask.to(q_device),
                    logits_to_keep=keep,
                )  # fmt: skip
            lp_q = out_q.logits.to(device)
            kl = position_kl(lp_p[:, :-1], lp_q[:, :-1]).cpu() * valid  # (batch, width)
            del lp_p, out_q, lp_q
            multi = kl.sum(-1) / valid.sum(-1)
            yield idx, list(zip(multi.tolist(), kl[:, 0].tolist(), strict=True))

    pairs = in_order(len(texts), pieces())
    return [m for m, _ in pairs], [f for _, f in pairs]


def multi_token_kl(
    model_p: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    model_q: PreTrainedModel | None = None,
    p_context: Context = nullcontext,
    q_context: Context = nullcontext,
    n_tokens: int = 16,
    batch_size: int = 32,
) -> tuple[float, float]:
    """``KL(p ‖ q)`` averaged over the first ``n_tokens`` positions of p's greedy continuations
    (generated in ``p_context``), and at the first position.

    Returns:
        ``(multi_token_kl, first_token_kl)``, both averaged over prompts, in nats.
    """
    with p_context():
        continuations = reference_continuations(
            model_p, tokenizer, texts, n_tokens=n_tokens, batch_size=batch_size
        )
    multi, first = kl_per_prompt(
        model_p, tokenizer, texts, continuations, model_q=model_q, p_context=p_context,
        q_context=q_context, batch_size=batch_size,
    )  # fmt: skip
    return sum(multi) / len(multi), sum(first) / len(first)
