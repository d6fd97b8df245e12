"""Next-token log-probabilities of chat prompts that share a token prefix, prefix computed once.

Chat-formatted prompts all start with the same tokens: the template's opening and, for many
models, a default system message (about 30 of the demo model's 57 tokens on average). An edited
model still treats that prefix identically for every prompt, so :class:`SharedPrefixScorer`
runs it once per batch (one sequence), repeats its key/value cache across the batch, and feeds
only each prompt's own suffix, right-padded. Causal attention means the padding after a
suffix is never attended to, and the last real position of each row is projected onto the
vocabulary. The result equals :func:`~abliterate.scoring.next_token_logprobs` up to float
rounding (a test checks it on every supported family, with and without edits) at roughly half
the cost, which is what makes a generation-free search trial cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from abliterate.architecture import resolve_architecture
from abliterate.interventions import EditSpec, maybe_hooks

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all ``sequences``."""
    if not sequences:
        return 0
    n = min(len(s) for s in sequences)
    first = sequences[0]
    for i in range(n):
        if any(s[i] != first[i] for s in sequences):
            return i
    return n


class SharedPrefixScorer:
    """Scores a fixed list of chat-formatted texts repeatedly (once per edit).

    Args:
        texts: Chat-formatted prompts, tokenized as :func:`~abliterate.prompts.batches` does
            (no added special tokens).
        batch_size: Prompts per forward pass.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        texts: Sequence[str],
        batch_size: int = 32,
    ) -> None:
        if not texts:
            raise ValueError("no texts to score")
        self.model = model
        self.arch = resolve_architecture(model)
        self.batch_size = batch_size
        ids = [list(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
        # Every prompt keeps at least one token of its own, whose logits are the answer.
        n = min(common_prefix_length(ids), min(len(x) for x in ids) - 1)
        self.prefix = torch.tensor(ids[0][:n], dtype=torch.long)  # (n_prefix,)
        self.suffixes = [x[n:] for x in ids]
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)
        # Similar lengths together keep padding low.
        self.order = sorted(range(len(ids)), key=lambda i: len(self.suffixes[i]))

    @property
    def prefix_length(self) -> int:
        """Tokens computed once per batch instead of once per prompt."""
        return int(self.prefix.shape[0])

    def batches(self) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """``(indices, suffix_ids, lengths)`` per batch: right-padded suffixes, similar lengths."""
        for start in range(0, len(self.order), self.batch_size):
            idx = self.order[start : start + self.batch_size]
            lengths = torch.tensor([len(self.suffixes[i]) for i in idx])
            batch = torch.full((len(idx), int(lengths.max())), self.pad_id, dtype=torch.long)
            for row, i in enumerate(idx):
                batch[row, : lengths[row]] = torch.tensor(self.suffixes[i])
            yield idx, batch, lengths

    def forward(
        self,
        batch: torch.Tensor,
        around_suffix: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> torch.Tensor:
        """Run the prefix once, then ``batch``'s suffixes on its repeated cache.

        ``around_suffix`` wraps the suffix pass only (e.g. activation hooks that must not see
        the prefix). Returns the suffixes' final hidden states ``(batch, suffix, d_model)``.
        """
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        cache = None
        if self.prefix_length:
            cache = DynamicCache()
            self.arch.body(
                input_ids=self.prefix[None].to(device), past_key_values=cache, use_cache=True
            )
            cache.batch_repeat_interleave(batch.shape[0])
        # No attention mask: the padding follows each suffix, and causal attention never looks
        # ahead.
        with around_suffix():
            out = self.arch.body(
                input_ids=batch.to(device), past_key_values=cache, use_cache=cache is not None
            )
        return out.last_hidden_state  # after the final norm

    @torch.inference_mode()
    def logprobs(self, spec: EditSpec | None = None) -> torch.Tensor:
        """``(len(texts), vocab)`` float32 log-probabilities on the CPU, in text order."""
        out: list[torch.Tensor | None] = [None] * len(self.suffixes)
        with maybe_hooks(self.model, spec):
            for idx, batch, lengths in self.batches():
                hidden = self.forward(batch)  # (batch, suffix, d_model)
                last = hidden[torch.arange(len(idx)), lengths.to(hidden.device) - 1]
                logits = self.arch.lm_head(last)  # (batch, vocab)
                lp = torch.log_softmax(logits.float(), dim=-1).cpu()
                for row, i in enumerate(idx):
                    out[i] = lp[row]
        return torch.stack(out)  # type: ignore[arg-type]
