"""Statistics of next-token distributions: refusal log-odds and KL divergences.

* The *refusal score* (Arditi et al.) is the log-odds that the first answer token starts a
  refusal: ``log p / (1 - p)`` with ``p`` the probability mass of the first tokens of common
  refusal openings ("I'm sorry", "I cannot", "As an AI", …; see
  :mod:`abliterate.measure.refusal`). Lower means less refusal.
* *First-token KL* is ``KL(original ‖ edited)`` of the next-token distributions after the chat
  prompt, averaged over prompts: how much an edit moves the model where it should not move.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def refusal_scores(logprobs: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Per-prompt refusal log-odds from next-token log-probabilities ``(n, vocab)``."""
    log_p = torch.logsumexp(logprobs[:, list(token_ids)], dim=-1)  # (n,)
    # log(p / (1 - p)); clamp keeps 1 - p away from 0 when the model always refuses.
    log_not_p = torch.log1p(-log_p.exp().clamp(max=1 - 1e-7))
    return log_p - log_not_p


def kl_divergence(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p ‖ q)`` of two ``(n, vocab)`` log-probability tensors, in nats."""
    p = p_logprobs.exp()
    # Tokens with p = 0 contribute 0 (not 0 * -inf = NaN when q is 0 there too).
    terms = torch.where(p > 0, p * (p_logprobs - q_logprobs), torch.zeros_like(p))
    return terms.sum(-1).clamp(min=0.0)


def position_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, rows: int = 4) -> torch.Tensor:
    """KL(p ‖ q) at every (batch, position) of two logit tensors, a few prompts at a time.

    The float32 log-softmax temporaries are ``rows × positions × vocab`` instead of the whole
    batch's (with a 152k vocabulary, 64 prompts × 17 positions are 660 MB per temporary).
    """
    out = []
    for start in range(0, logits_p.shape[0], rows):
        lp = torch.log_softmax(logits_p[start : start + rows].float(), -1)
        lq = torch.log_softmax(logits_q[start : start + rows].float(), -1)
        out.append(kl_divergence(lp.flatten(0, 1), lq.flatten(0, 1)).view(lp.shape[:2]))
    return torch.cat(out)
