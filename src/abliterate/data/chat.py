"""Prompt sets: built-in instruction sets, loaders for user data, chat formatting and batching.

The package ships project-written harmful, harmless and over-refusal instruction sets with fixed
train / val / eval splits (``prompt_data/*.jsonl``), so the tool works offline. User sets come
from ``.txt`` (one prompt a line), ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` files or hub
datasets written ``hf:ORG/NAME[:split[:column]]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from abliterate.errors import ChatTemplateError

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedTokenizerBase


def format_chat(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], system_prompt: str | None = None
) -> list[str]:
    """Render each instruction as one user turn, ready for the assistant's answer.

    Raises:
        ChatTemplateError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no chat "
            "template; abliterate needs an instruction-tuned (chat) model."
        )
    texts = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        texts.append(
            str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        )
    return texts


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding (so the last position is every prompt's last token) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def batches(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int
) -> Iterator[tuple[list[int], BatchEncoding]]:
    """Left-padded batches of chat-formatted texts, grouped by length to waste little padding.

    Yields ``(indices, encoding)`` where ``indices`` are the positions of the batch's texts in
    ``texts``, so results can be put back in the original order.
    """
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
        )
        yield idx, enc
