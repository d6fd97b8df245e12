"""Supervised fine-tuning with TRL's ``SFTTrainer`` on conversation datasets.

Every row (alpaca, ShareGPT or chat messages; see :mod:`abliterate.data.conversations`) becomes
one training example per assistant turn, in TRL's conversational prompt–completion form: the
prompt is the conversation before that turn (system, user and earlier assistant turns), the
completion is the turn. TRL renders both with the tokenizer's chat template and, with
``completion_only_loss``, computes the loss on the completion's tokens only. (TRL's
``assistant_only_loss`` would train every turn of a conversation at once, but needs a chat
template with ``{% generation %}`` markers, which most models' templates lack; one example per
turn works with any template, at the price of repeating the earlier turns.)

The examples are streamed into an Arrow file on disk (``datasets.Dataset.from_generator``) in
the run's checkpoint directory, so a large dataset is never held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate.data.conversations import RowSource, conversation, formatted_batches
from abliterate.errors import DatasetError

if TYPE_CHECKING:
    from datasets import Dataset

Message = dict[str, str]
CHAT_ROLES = ("system", "user", "assistant")


def sft_examples(
    spec: str, fmt: str | None, max_rows: int | None, system_prompt: str | None
) -> Iterator[dict[str, list[Message]]]:
    """``{"prompt": [messages], "completion": [assistant message]}`` for every assistant turn
    that answers a user turn, in dataset order.

    Args:
        spec: The dataset (file or ``hf:``), as :meth:`RowSource.parse` takes it.
        fmt: Row format, or None to detect it.
        max_rows: Read at most this many rows.
        system_prompt: Put before conversations that have no system message.

    Raises:
        DatasetError: a malformed row, or a speaker other than system, user and assistant.
    """
    source = RowSource.parse(spec)
    found, batches = formatted_batches(source, 256, fmt)  # type: ignore[arg-type]
    for batch in batches:
        for i, row in enumerate(batch.rows):
            index = batch.start + i
            if max_rows is not None and index >= max_rows:
                return
            where = f"{source.name} row {index}"
            messages = [
                {"role": t.role, "content": t.content} for t in conversation(row, found, where)
            ]
            odd = [m["role"] for m in messages if m["role"] not in CHAT_ROLES]
            if odd:
                raise DatasetError(
                    f"{where} has a '{odd[0]}' turn; fine-tuning takes system, user and assistant "
                    "turns only."
                )
            if system_prompt is not None and messages and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": system_prompt})
            for j, message in enumerate(messages):
                if message["role"] == "assistant" and any(
                    m["role"] == "user" for m in messages[:j]
                ):
                    yield {"prompt": messages[:j], "completion": [message]}


def build_dataset(
    spec: str, fmt: str | None, max_rows: int | None, system_prompt: str | None, cache_dir: Path
) -> Dataset:
    """The examples of :func:`sft_examples` as an Arrow-backed dataset written to ``cache_dir``.

    Raises:
        DatasetError: as :func:`sft_examples`, or no example at all.
    """
    from datasets import Dataset

    # Fail on the first rows before datasets starts its own machinery (its errors are wrapped).
    next(sft_examples(spec, fmt, 1, system_prompt), None)
    dataset = Dataset.from_generator(
        sft_examples,
        gen_kwargs={"spec": spec, "fmt": fmt, "max_rows": max_rows, "system_prompt": system_prompt},
        cache_dir=str(cache_dir),
    )
    if len(dataset) == 0:
        raise DatasetError(f"{spec} has no assistant turn that answers a user turn to train on.")
    return dataset


def sft_trainer(
    model: Any,
    tokenizer: Any,
    train: Dataset,
    heldout: Dataset | None,
    arguments: dict[str, Any],
    max_length: int,
    peft_config: Any,
) -> Any:
    """TRL's ``SFTTrainer`` with completion-only loss on the conversational examples."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **arguments,
        max_length=max_length,
        completion_only_loss=True,
        packing=False,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
