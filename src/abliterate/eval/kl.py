"""Multi-token KL divergence: damage measured over a continuation, not only the first token.

First-token KL is known to understate damage: an edit can leave the first token alone and still
derail what follows. :func:`multi_token_kl` lets the reference model p greedily continue each
prompt, runs both p and q on prompt + continuation and averages ``KL(p ‖ q)`` over every
generated position (positions after an end-of-sequence token are ignored).

p and q may be two models, or one model in two states: each side runs inside its own context
(``p_context`` / ``q_context``, e.g. :func:`abliterate.edit.hooks.edit_hooks` of an edit), which
the caller supplies; this module never installs an edit itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from abliterate.core.stats import position_kl
from abliterate.data.chat import batches
from abliterate.model.forward import greedy_tokens, model_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Context = Callable[[], AbstractContextManager[Any]]


@torch.inference_mode()
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
    """``KL(p ‖ q)`` averaged over the first ``n_tokens`` positions of p's greedy continuations.

    Args:
        model_p: The reference model (it generates the continuations).
        model_q: The compared model (default: ``model_p``, then in another context).
        p_context, q_context: Factories of the context each side runs in.

    Returns:
        ``(multi_token_kl, first_token_kl)``, both averaged over prompts, in nats.
    """
    q_model = model_p if model_q is None else model_q
    device = model_device(model_p)
    q_device = model_device(q_model)
    total, count, first_total = 0.0, 0, 0.0
    for _, enc in batches(tokenizer, texts, batch_size):
        enc = enc.to(device)
        n_prompt = enc["input_ids"].shape[1]
        with p_context():
            seq = greedy_tokens(model_p, tokenizer, enc, n_tokens)  # (batch, n_prompt + new)
        new = seq[:, n_prompt:]
        # A generated position counts until (and including) the first end-of-sequence token.
        eos = torch.zeros_like(new, dtype=torch.bool)
        if tokenizer.eos_token_id is not None:
            eos = new == tokenizer.eos_token_id
        after_eos = (eos.cumsum(-1) - eos.long()) > 0
        valid = ~after_eos  # (batch, new)
        mask = torch.cat([enc["attention_mask"], valid.long()], dim=1)
        # Logits at positions n_prompt-1 … n_prompt+new-2 predict the generated tokens; only the
        # last new+1 positions are projected onto the vocabulary (the prompt's logits would
        # cost batch × prompt_len × vocab floats for nothing).
        keep = new.shape[1] + 1
        with p_context():
            out_p = model_p(input_ids=seq, attention_mask=mask, logits_to_keep=keep)
        lp_p = out_p.logits[:, :-1]
        with q_context():
            out_q = q_model(
                input_ids=seq.to(q_device), attention_mask=mask.to(q_device), logits_to_keep=keep
            )
        lp_q = out_q.logits[:, :-1].to(device)
        del out_p, out_q
        kl = position_kl(lp_p, lp_q).cpu() * valid.cpu()  # (batch, new)
        per_prompt = kl.sum(-1) / valid.cpu().sum(-1).clamp(min=1)
        total += float(per_prompt.sum())
        first_total += float(kl[:, 0].sum())
        count += len(per_prompt)
    return total / count, first_total / count
