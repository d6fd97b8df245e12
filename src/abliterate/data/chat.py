"""Chat formatting and batching: instructions rendered with a model's chat template.

:class:`ChatSet` is a prompt set together with its chat-formatted texts (what models read) and
the raw instructions (what judges read). :func:`batches` groups texts of similar length into
left-padded batches and remembers where each text came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from abliterate.data.prompts import PromptSet
from abliterate.data.reasoning import close_reasoning, template_options
from abliterate.errors import ChatTemplateError, PromptSetError
from abliterate.types import Thinking

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedTokenizerBase


def format_chat(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    system_prompt: str | None = None,
    thinking: Thinking = "off",
) -> list[str]:
    """Render each instruction as one user turn, ready for the assistant's answer.

    ``thinking`` sets the template's thinking switch where it has one; with ``"off"`` a
    reasoning block that the template opens anyway is closed empty, so the answer comes next
    (:mod:`abliterate.data.reasoning`). A template with neither renders as it always did.

    Raises:
        ChatTemplateError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no chat "
            "template; abliterate needs an instruction-tuned (chat) model."
        )
    return [
        format_messages(tokenizer, [{"role": "user", "content": prompt}], system_prompt, thinking)
        for prompt in prompts
    ]


def format_messages(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    system_prompt: str | None = None,
    thinking: Thinking = "off",
) -> str:
    """A conversation rendered with the chat template, ready for the assistant's next answer,
    with the thinking switch applied as :func:`format_chat` describes."""
    turns = list(messages)
    if system_prompt is not None:
        turns.insert(0, {"role": "system", "content": system_prompt})
    text = str(
        tokenizer.apply_chat_template(
            turns,
            tokenize=False,
            add_generation_prompt=True,
            **template_options(tokenizer, thinking == "on"),
        )
    )
    return close_reasoning(text) if thinking == "off" else text


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


def check_prompt_lengths(
    tokenizer: PreTrainedTokenizerBase, chats: Iterable[ChatSet], limit: int, why: str
) -> None:
    """Refuse any chat-formatted prompt longer than ``limit`` tokens (``why``: where the limit
    comes from), before it reaches a model.

    Prompts are never truncated: a cut instruction is a different instruction, and the
    measured refusal rate would silently describe prompts nobody wrote.

    Raises:
        PromptSetError: naming the set, the prompt (counting from 1) and its token length.
    """
    for chat in chats:
        encoded = tokenizer(list(chat.texts), add_special_tokens=False)["input_ids"]
        for i, ids in enumerate(encoded):
            if len(ids) > limit:
                raise PromptSetError(
                    f"prompt {i + 1} of {chat.prompts.name} (counting from 1) is {len(ids):,} "
                    f"tokens long with the chat template, more than the {limit:,} allowed "
                    f"({why}); shorten or remove it (prompts are never truncated)."
                )


@dataclass(frozen=True)
class ChatSet:
    """A prompt set with its chat-formatted texts.

    Attributes:
        prompts: The instructions (with name, categories and content hash).
        texts: Each instruction rendered as one user turn, ready for the answer.
    """

    prompts: PromptSet
    texts: tuple[str, ...]

    @classmethod
    def format(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        prompts: PromptSet,
        system_prompt: str | None = None,
        thinking: Thinking = "off",
    ) -> ChatSet:
        """Render ``prompts`` with the tokenizer's chat template (and its thinking switch)."""
        return cls(prompts, tuple(format_chat(tokenizer, prompts.prompts, system_prompt, thinking)))

    def __len__(self) -> int:
        return len(self.texts)
