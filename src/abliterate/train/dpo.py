"""Direct preference optimisation with TRL's ``DPOTrainer``, as ``heal`` uses it.

With LoRA or QLoRA the reference policy is the model with its adapters disabled (TRL does this
when it is given a ``peft_config`` and no reference model), so no second copy of the model is
held. The reference log-probabilities are computed once before training
(``precompute_ref_log_probs``), which saves a forward pass per step whenever the pairs are
seen more than once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trl.trainer.dpo_trainer import DataCollatorForPreference

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

LOSS_TYPES = {"dpo": ["sigmoid"], "dpo+sft": ["sigmoid", "sft"]}
"""TRL's loss types of each ``--loss``: the sigmoid DPO loss, plus the chosen answers' negative
log-likelihood (RPO: "Iterative Reasoning Preference Optimization", Pang et al. 2024)."""


def end_of_turn_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many tokens the chat template appends after an assistant message's text."""
    probe = "Zq9"
    text = str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}],
            tokenize=False,
        )
    )
    suffix = text[text.rindex(probe) + len(probe) :]
    return len(tokenizer(suffix, add_special_tokens=False).input_ids)


@dataclass
class CutAnswerCollator(DataCollatorForPreference):
    """TRL's preference collator, with the end-of-turn tokens of cut answers left out of the
    loss (``end_tokens``: how many the chat template appends; :func:`end_of_turn_length`)."""

    end_tokens: int = 1

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate; then unmask the last ``end_tokens`` completion tokens of cut answers."""
        batch = super().torch_call(examples)
        mask = batch["completion_mask"]  # (2 * batch, seq): chosen rows first, then rejected
        n = len(examples)
        for i, example in enumerate(examples):
            for row, key in ((i, "chosen_truncated"), (n + i, "rejected_truncated")):
                if example.get(key) and self.end_tokens:
                    positions = mask[row].nonzero().flatten()
                    mask[row, positions[-self.end_tokens :]] = 0
        return batch


def dpo_trainer(
    model: Any,
    tokenizer: Any,
    train: Dataset,
    heldout: Dataset | None,
    arguments: dict[str, Any],
    *,
    max_length: int,
    beta: float,
    loss: str,
    peft_config: Any,
) -> Any:
    """TRL's ``DPOTrainer`` on conversational preference rows, with :class:`CutAnswerCollator`."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        **arguments,
        max_length=max_length,
        beta=beta,
        loss_type=LOSS_TYPES[loss],
        precompute_ref_log_probs=True,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = CutAnswerCollator(
        pad_token_id=int(pad), max_length=max_length, end_tokens=end_of_turn_length(tokenizer)
    )
    return DPOTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
