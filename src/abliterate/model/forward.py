"""Every forward pass and generation of the tool: batched, in the order the texts were given.

* :func:`next_token_logprobs` — log-probabilities of the token after each chat prompt.
* :class:`SharedPrefixScorer` — the same for a fixed list of prompts scored many times (once
  per edit): chat-formatted prompts all start with the same tokens (the template's opening and,
  for many models, a default system message: about 30 of the demo model's 57 tokens on
  average). The prefix runs once per batch, its key/value cache is repeated across the batch,
  and only each prompt's own suffix is fed, right-padded. Causal attention means the padding
  after a suffix is never attended to. The result equals :func:`next_token_logprobs` up to
  float rounding (a test checks it on every supported family, with and without edits) at
  roughly half the cost, which is what makes a generation-free search trial cheap.
* :func:`greedy_tokens` / :func:`generate` — greedy continuations.
* :func:`check_ready` — the checks between loading a model and its first real forward pass:
  no prompt longer than the model reads, and finite logits.

Nothing here installs an edit: callers that want an edited model wrap these calls in
:func:`abliterate.edit.hooks.edit_hooks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from abliterate.data.chat import ChatSet, batches, check_prompt_lengths
from abliterate.errors import ModelLoadError
from abliterate.model.anatomy import anatomy_of
from abliterate.model.devices import input_device
from abliterate.model.loading import context_limit
from abliterate.progress import progress

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

T = TypeVar("T")


def in_order(n: int, pieces: Iterable[tuple[Sequence[int], Iterable[T]]]) -> list[T]:
    """Results computed batch by batch (``(indices, values)``), put back in text order."""
    out: list[T | None] = [None] * n
    for idx, values in pieces:
        for i, value in zip(idx, values, strict=True):
            out[i] = value
    missing = [i for i, v in enumerate(out) if v is None]
    assert not missing, f"no result for items {missing[:5]}"
    return out  # type: ignore[return-value]


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs go: its input embedding's device (a model spread over several
    devices by a device map runs its first module there; :func:`~abliterate.model.devices.
    input_device`)."""
    return input_device(model)


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
    """Scores a fixed list of chat-formatted texts repeatedly (see the module docstring).

    Args:
        texts: Chat-formatted prompts, tokenized as :func:`~abliterate.data.chat.batches` does
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
        self.anatomy = anatomy_of(model)
        self.batch_size = batch_size
        ids = [list(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
        # Every prompt keeps at least one token of its own, whose logits are the answer.
        n = min(common_prefix_length(ids), min(len(x) for x in ids) - 1)
        if self.anatomy.anatomy.recurrent:
            # Recurrent mixers (linear attention, state-space) cache states that cannot be
            # repeated across a batch: every prompt runs whole (right padding stays exact, as
            # the recurrence is causal).
            n = 0
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

        device = model_device(self.model)
        body = self.anatomy.body
        cache = None
        if self.prefix_length:
            # Built from the config, the cache matches each layer's kind and index (sliding
            # windows; layers without attention, whose index a bare cache would misnumber).
            cache = DynamicCache(config=self.model.config)
            body(input_ids=self.prefix[None].to(device), past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(batch.shape[0])
        # No attention mask: the padding follows each suffix, and causal attention never looks
        # ahead.
        with around_suffix():
            out = body(
                input_ids=batch.to(device), past_key_values=cache, use_cache=cache is not None
            )
        return out.last_hidden_state  # after the final norm

    @torch.inference_mode()
    def logprobs(self) -> torch.Tensor:
        """``(len(texts), vocab)`` float32 log-probabilities on the CPU, in text order."""

        def pieces() -> Iterator[tuple[list[int], torch.Tensor]]:
            for idx, batch, lengths in self.batches():
                hidden = self.forward(batch)  # (batch, suffix, d_model)
                last = hidden[torch.arange(len(idx)), lengths.to(hidden.device) - 1]
                logits = self.anatomy.logits(last)  # (batch, vocab)
                yield idx, torch.log_softmax(logits.float(), dim=-1).cpu()

        return torch.stack(in_order(len(self.suffixes), pieces()))


@torch.inference_mode()
def next_token_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
) -> torch.Tensor:
    """Log-probabilities of the token after each chat-formatted prompt.

    Returns:
        ``(len(texts), vocab)`` float32 on the CPU, in the order of ``texts``.
    """
    device = model_device(model)

    def pieces() -> Iterator[tuple[list[int], torch.Tensor]]:
        for idx, enc in batches(tokenizer, texts, batch_size):
            # logits_to_keep=1 computes the vocabulary projection for the last position only.
            logits = model(**enc.to(device), logits_to_keep=1).logits[:, -1, :]  # (batch, vocab)
            yield idx, torch.log_softmax(logits.float(), dim=-1).cpu()

    return torch.stack(in_order(len(texts), pieces()))


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
    device = model_device(model)
    n_batches = -(-len(texts) // batch_size)

    def pieces() -> Iterator[tuple[list[int], list[str]]]:
        for idx, enc in progress(batches(tokenizer, texts, batch_size), total=n_batches, desc=desc):
            enc = enc.to(device)
            tokens = greedy_tokens(model, tokenizer, enc, max_new_tokens)
            new = tokens[:, enc["input_ids"].shape[1] :]  # (batch, new_tokens)
            yield idx, [str(tokenizer.decode(row, skip_special_tokens=True)).strip() for row in new]

    return in_order(len(texts), pieces())


@torch.inference_mode()
def check_ready(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[ChatSet],
    name: str,
) -> None:
    """Refuse, before any long computation, prompts longer than the model's context and a
    model whose next-token logits are not finite.

    Finite weights can still give infinite logits (float16 overflow, a broken norm); every
    later measurement would then be NaN. The logits are probed on a few prompts of the first
    set: one small forward pass.

    Raises:
        PromptSetError: a prompt is too long (see
            :func:`~abliterate.data.chat.check_prompt_lengths`).
        ModelLoadError: the logits hold NaN or infinite values.
    """
    limit, why = context_limit(model, tokenizer)
    check_prompt_lengths(tokenizer, chats, limit, why)
    probe = [t for chat in chats[:1] for t in chat.texts[:4]]
    for _, enc in batches(tokenizer, probe, batch_size=len(probe) or 1):
        logits = model(**enc.to(model_device(model)), logits_to_keep=1).logits  # (batch, 1, vocab)
        if not bool(torch.isfinite(logits).all()):
            raise ModelLoadError(
                f"model '{name}' gives non-finite logits (NaN or inf) on ordinary prompts, so "
                "nothing it computes can be measured; with float16 weights this is usually "
                "overflow: try --dtype bfloat16 or float32."
            )
