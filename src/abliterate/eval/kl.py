"""Cheap, generation-free measurements on the next-token distribution.

* The *refusal score* (Arditi et al.) is the log-odds that the first answer token starts a
  refusal: ``log p / (1 - p)`` with ``p`` the probability mass of the first tokens of common
  refusal openings ("I'm sorry", "I cannot", "As an AI", …). Lower means less refusal.
* *First-token KL* is ``KL(original ‖ edited)`` of the next-token distributions after the chat
  prompt, averaged over prompts: how much an edit moves the model where it should not move.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from abliterate.core.edits import EditSpec
from abliterate.core.stats import position_kl
from abliterate.data.chat import batches
from abliterate.edit.hooks import maybe_hooks

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.inference_mode()
def multi_token_kl(
    model_p: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    model_q: PreTrainedModel | None = None,
    spec_p: EditSpec | None = None,
    spec_q: EditSpec | None = None,
    n_tokens: int = 16,
    batch_size: int = 32,
) -> tuple[float, float]:
    """``KL(p ‖ q)`` averaged over the first ``n_tokens`` positions of p's greedy continuations.

    First-token KL is known to understate damage: an edit can leave the first token alone and
    still derail what follows. Here p (``model_p`` under ``spec_p``) greedily continues each
    prompt, then both p and q (``model_q``, default ``model_p``, under ``spec_q``) are run on
    prompt + continuation and the per-position KL is averaged over every generated position
    (positions after an end-of-sequence token are ignored). Batches are processed one at a
    time, so memory does not grow with the number of prompts.

    Returns:
        ``(multi_token_kl, first_token_kl)``, both averaged over prompts, in nats.
    """
    from abliterate.model.forward import greedy_tokens

    q_model = model_p if model_q is None else model_q
    device = next(model_p.parameters()).device
    q_device = next(q_model.parameters()).device
    total, count, first_total = 0.0, 0, 0.0
    for _, enc in batches(tokenizer, texts, batch_size):
        enc = enc.to(device)
        n_prompt = enc["input_ids"].shape[1]
        with maybe_hooks(model_p, spec_p):
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
        with maybe_hooks(model_p, spec_p):
            out_p = model_p(input_ids=seq, attention_mask=mask, logits_to_keep=keep)
        lp_p = out_p.logits[:, :-1]
        with maybe_hooks(q_model, spec_q):
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
