"""Self-distillation that heals an abliterated model (``heal --loss distill``).

Abliteration should change the model's answers to harmful prompts and nothing else, so what
healing must undo is the shift of the *whole next-token distribution* elsewhere, which DPO and
the negative log-likelihood of a greedy answer do not target (both move a few tokens' logits;
measured on the demo they left the KL to the original higher than before healing). Here the
student is trained on the chosen answer of each pair (prompt + answer; loss on the answer's
tokens only) to minimise the forward KL of its next-token distributions to a teacher's,

    loss = mean over answer tokens t of  KL(teacher(· | x_<t) ‖ student(· | x_<t)),

where the teacher depends on the pair's ``kind`` (:func:`~abliterate.train.preferences._pair`):

* ``harmless`` (and rows without a kind, e.g. a ``--preferences`` file of another source): the
  **original** model, so the model is pulled back to its original wherever it should not have
  moved;
* ``harmful``: the **abliterated model itself**, i.e. the student with its LoRA adapters
  disabled (peft's ``disable_adapter``), so the compliance is held in place rather than healed
  away. This needs an adapter: ``--adapter full`` with ``--loss distill`` is refused by the
  config (a frozen third copy of the model would cost its full memory).

The original stays in memory during training (for the demo's 0.5B float32, 2 GB); both teachers
run without gradients. At initialisation (LoRA ``B = 0``) the student *is* the abliterated model,
so the harmful rows' loss starts at exactly zero. Temperature 1 (the distributions as sampled).
A cut answer's end-of-turn tokens are left out of the loss, as
:class:`~abliterate.train.dpo.CutAnswerCollator` does for DPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer

from abliterate.core.stats import kl_divergence
from abliterate.errors import DatasetError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

KINDS = ("harmless", "harmful")
"""The pair kinds: ``harmless`` is distilled from the original, ``harmful`` from the model
itself (adapters off); a row without a kind counts as harmless."""


@dataclass
class DistillCollator:
    """Tokenises conversational preference rows' prompt + chosen answer into a padded batch.

    Returns ``input_ids`` and ``attention_mask`` ``(batch, seq)``, ``answer_mask`` ``(batch,
    seq)`` (1 on the answer tokens the loss covers: the chosen answer, less the end-of-turn
    tokens of a cut one) and ``from_original`` ``(batch,)`` (True where the teacher is the
    original). Sequences longer than ``max_length`` are cut at the end; padding is on the right.
    """

    tokenizer: PreTrainedTokenizerBase
    max_length: int
    end_tokens: int = 1

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def encode(self, row: dict[str, Any]) -> tuple[list[int], list[int], bool]:
        """One row's token ids, answer mask and whether the original is its teacher.

        Raises:
            DatasetError: an unknown ``kind``.
        """
        kind = row.get("kind")
        if kind is not None and kind not in KINDS:
            raise DatasetError(f"a preference row has kind {kind!r}; known: {', '.join(KINDS)}.")
        prompt = str(
            self.tokenizer.apply_chat_template(
                row["prompt"], tokenize=False, add_generation_prompt=True
            )
        )
        full = str(
            self.tokenizer.apply_chat_template([*row["prompt"], *row["chosen"]], tokenize=False)
        )
        assert full.startswith(prompt), "the chat template must extend the prompt"
        prompt_ids, answer_ids = self._ids(prompt), self._ids(full[len(prompt) :])
        trained = len(answer_ids)
        if row.get("chosen_truncated") and self.end_tokens:
            trained = max(0, trained - self.end_tokens)
        ids = (prompt_ids + answer_ids)[: self.max_length]
        mask = ([0] * len(prompt_ids) + [1] * trained + [0] * (len(answer_ids) - trained))[
            : self.max_length
        ]
        return ids, mask, kind != "harmful"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``rows`` (see the class docstring)."""
        encoded = [self.encode(row) for row in rows]
        width = max(len(ids) for ids, _, _ in encoded)
        pad = self.tokenizer.pad_token_id
        pad = int(pad if pad is not None else self.tokenizer.eos_token_id)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        answer = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row_ids, row_mask, _) in enumerate(encoded):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            attention[i, : len(row_ids)] = 1
            answer[i, : len(row_mask)] = torch.tensor(row_mask)
        return {
            "input_ids": ids,
            "attention_mask": attention,
            "answer_mask": answer,
            "from_original": torch.tensor([original for _, _, original in encoded]),
        }


def forward_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``KL(teacher ‖ student)`` per position of two logit tensors ``(..., vocab)`` → ``(...)``."""
    return kl_divergence(
        torch.log_softmax(teacher.float(), dim=-1), torch.log_softmax(student.float(), dim=-1)
    )


class DistillTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is the per-kind forward KL (module docstring).

    Args:
        original: The original model (the teacher of harmless rows), frozen, on the student's
            device.
        *args, **kwargs: As ``Trainer``; ``model`` must be a peft model (its adapters off is the
            teacher of harmful rows).
    """

    def __init__(self, *args: Any, original: PreTrainedModel, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.original = original.eval().requires_grad_(False)

    @torch.no_grad()
    def teacher_logits(self, model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teachers' logits ``(batch, seq, vocab)``: each row from its own teacher."""
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        chooser = inputs["from_original"]  # (batch,) bool
        out: torch.Tensor | None = None
        for from_original in (True, False):
            rows = (chooser == from_original).nonzero().flatten()
            if len(rows) == 0:
                continue
            if from_original:
                logits = self.original(input_ids=ids[rows], attention_mask=attention[rows]).logits
            else:
                with self.accelerator.unwrap_model(model).disable_adapter():
                    logits = model(input_ids=ids[rows], attention_mask=attention[rows]).logits
            if out is None:
                out = logits.new_empty((*ids.shape, logits.shape[-1]))
            out[rows] = logits
        assert out is not None
        return out

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Mean forward KL over the batch's answer tokens (the logits at position ``t`` predict
        token ``t + 1``, so the positions before each answer token are scored)."""
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        scored = inputs["answer_mask"][:, 1:].bool()  # (batch, seq - 1)
        student = model(input_ids=ids, attention_mask=attention).logits[:, :-1][scored]
        teacher = self.teacher_logits(model, inputs)[:, :-1][scored]  # (n_tokens, vocab)
        loss = forward_kl(teacher, student).sum() / scored.sum().clamp(min=1)
        return (loss, {}) if return_outputs else loss


def distill_trainer(
    model: Any,
    original: PreTrainedModel,
    tokenizer: Any,
    train: Dataset,
    heldout: Dataset | None,
    arguments: dict[str, Any],
    *,
    max_length: int,
    peft_config: Any,
) -> DistillTrainer:
    """A :class:`DistillTrainer` on conversational preference rows, with LoRA adapters added."""
    from peft import get_peft_model
    from transformers import TrainingArguments

    from abliterate.train.dpo import end_of_turn_length

    assert peft_config is not None, "distill needs adapters (the config refuses --adapter full)"
    args = TrainingArguments(
        **arguments, label_names=["answer_mask"], prediction_loss_only=True
    )  # label_names: so that evaluate() computes the held-out loss through compute_loss
    collator = DistillCollator(tokenizer, max_length, end_of_turn_length(tokenizer))
    return DistillTrainer(
        model=get_peft_model(model, peft_config),
        original=original,
        args=args,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
    )
