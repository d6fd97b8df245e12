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

Evaluation of a model on held-out prompts: greedy generations, judged refusals and KL.

The shape written to ``report.json`` (shared by every command that evaluates a model) is::

    {"refusal_rate": r, "kl_divergence": k,            # k only for an edited model
     "completions": [{"prompt": ..., "response": ..., "refused": true|false}, ...]}

Cheap, generation-free measurements on the next-token distribution.

* The *refusal score* (Arditi et al.) is the log-odds that the first answer token starts a
  refusal: ``log p / (1 - p)`` with ``p`` the probability mass of the first tokens of common
  refusal openings ("I'm sorry", "I cannot", "As an AI", …). Lower means less refusal.
* *First-token KL* is ``KL(original ‖ edited)`` of the next-token distributions after the chat
  prompt, averaged over prompts: how much an edit moves the model where it should not move.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from abliterate.core.edits import EditSpec
from abliterate.edit.hooks import maybe_hooks
from abliterate.model.anatomy import resolve_architecture

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
from typing import TYPE_CHECKING

from abliterate.data.chat import batches
from abliterate.progress import progress

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase


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


def greedy_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    enc: BatchEncoding,
    max_new_tokens: int,
) -> torch.Tensor:
    """Greedy continuation of a left-padded batch: ``(batch, prompt_len + new)`` token ids."""
    return model.generate(  # type: ignore[operator]
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        # Greedy decoding: clear any sampling defaults the model's generation config carries.
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
    )


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    desc: str = "Generating",
) -> list[str]:
    """Greedy continuations of chat-formatted ``texts``, decoded without special tokens."""
    device = next(model.parameters()).device
    out: list[str] = [""] * len(texts)
    n_batches = -(-len(texts) // batch_size)
    for idx, enc in progress(batches(tokenizer, texts, batch_size), total=n_batches, desc=desc):
        enc = enc.to(device)
        tokens = greedy_tokens(model, tokenizer, enc, max_new_tokens)
        new = tokens[:, enc["input_ids"].shape[1] :]  # (batch, new_tokens)
        for row, i in enumerate(idx):
            out[i] = str(tokenizer.decode(new[row], skip_special_tokens=True)).strip()
    return out


@torch.inference_mode()
def next_token_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    spec: EditSpec | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Log-probabilities of the token after each chat-formatted prompt.

    Args:
        spec: When given, measured under :func:`ablation_hooks` with this spec.

    Returns:
        ``(len(texts), vocab)`` float32 on the CPU, in the order of ``texts``.
    """
    device = next(model.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(texts)
    with maybe_hooks(model, spec):
        for idx, enc in batches(tokenizer, texts, batch_size):
            # logits_to_keep=1 computes the vocabulary projection for the last position only.
            logits = model(**enc.to(device), logits_to_keep=1).logits[:, -1, :]  # (batch, vocab)
            lp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(idx):
                out[i] = lp[row]
    return torch.stack(out)  # type: ignore[arg-type]
