"""Preference pairs for ``heal``: built from an abliteration run, or read from a dataset.

**Built from the run** (:func:`build_pairs`). Abliteration should remove refusals and change
nothing else, so the damage to heal is the abliterated model's *difference from the original*
on everything but refusals. The original and the abliterated model answer the same prompts
(greedy, :func:`answers`), and

* on a harmless prompt the original's answer is *chosen* over the abliterated model's, so that
  the model moves back towards the original where it should not have moved at all;
* on a harmful prompt the abliterated model's compliant answer is *chosen* over the original's
  refusal, so that healing does not bring refusals back.

A pair that teaches nothing or the wrong thing is skipped and counted: identical answers, a
harmless prompt the original refused (healing must not teach over-refusal), a harmful prompt
the original answered, or one the abliterated model still refused (judged by the evaluation's
first judge). The pairs need no download and target exactly what abliteration broke.

**Read from a dataset** (:func:`preference_rows`): rows with ``chosen`` and ``rejected`` (and
usually ``prompt``), each as text or as chat messages, in any of the containers of
:mod:`abliterate.data.conversations` (e.g. ``hf:mlabonne/orpo-dpo-mix-40k``). Text prompts are
user messages: the model's chat template is applied, as everywhere in abliterate.

Both become TRL's conversational preference rows ``{"prompt": [...], "chosen": [...],
"rejected": [...]}`` plus ``kind`` (``harmless``/``harmful`` for self-built pairs, read back from
a file that has it, else None; ``heal --loss distill`` picks its teacher by it) and
``chosen_truncated`` / ``rejected_truncated``: a self-built answer
cut at the generation budget has no real end, and
:class:`~abliterate.train.dpo.CutAnswerCollator` keeps the
end-of-turn tokens the chat template appends to it out of the loss, so that healing does not
teach the model to stop wherever the budget happened to cut.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from abliterate.data.chat import format_chat
from abliterate.data.conversations import RowSource
from abliterate.errors import DatasetError
from abliterate.model.forward import greedy_new_tokens

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from abliterate.data.prompts import PromptSet
    from abliterate.eval.judges import Judge

Message = dict[str, str]


@dataclass(frozen=True)
class Answer:
    """A greedy answer, and whether it ended (an end-of-sequence token within the budget)."""

    text: str
    finished: bool


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        found.add(int(tokenizer.eos_token_id))
    return found


@torch.inference_mode()
def answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    desc: str,
) -> list[Answer]:
    """Greedy answers to chat-formatted ``texts``, in order, each with whether it finished."""
    stops = _stop_ids(model, tokenizer)
    rows = greedy_new_tokens(
        model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc
    )
    return [
        Answer(
            str(tokenizer.decode(row, skip_special_tokens=True)).strip(),
            any(t in stops for t in row),
        )
        for row in rows
    ]


def _prompt(text: str, system_prompt: str | None) -> list[Message]:
    messages = [{"role": "user", "content": text}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _pair(prompt: list[Message], chosen: Answer, rejected: Answer, kind: str) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen.text}],
        "rejected": [{"role": "assistant", "content": rejected.text}],
        "chosen_truncated": not chosen.finished,
        "rejected_truncated": not rejected.finished,
        "kind": kind,
    }


def build_pairs(
    original: PreTrainedModel,
    abliterated: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    harmful: PromptSet,
    harmless: PromptSet,
    judge: Judge,
    *,
    max_new_tokens: int,
    batch_size: int,
    system_prompt: str | None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Preference pairs from both models' answers (see the module docstring).

    Returns:
        The pairs (harmless ones first, each set in prompt order) and the counts of pairs and of
        skipped prompts by reason.
    """
    counts = dict.fromkeys(
        ("harmless", "harmful", "skipped_identical", "skipped_original_refused",
         "skipped_original_complied", "skipped_abliterated_refused"), 0,
    )  # fmt: skip
    pairs: list[dict[str, Any]] = []
    for kind, prompts in (("harmless", harmless), ("harmful", harmful)):
        texts = format_chat(tokenizer, prompts.prompts, system_prompt)
        said = {
            name: answers(model, tokenizer, texts, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, desc=f"Answers ({name}, {kind})")
            for name, model in (("original", original), ("abliterated", abliterated))
        }  # fmt: skip
        refused = {
            name: judge(prompts.prompts, [a.text for a in got]) for name, got in said.items()
        }
        for i, prompt in enumerate(prompts.prompts):
            orig, abl = said["original"][i], said["abliterated"][i]
            if orig.text == abl.text:
                reason = "skipped_identical"
            elif kind == "harmless":
                reason = "skipped_original_refused" if refused["original"][i] else kind
            elif not refused["original"][i]:
                reason = "skipped_original_complied"
            else:
                reason = "skipped_abliterated_refused" if refused["abliterated"][i] else kind
            counts[reason] += 1
            if reason == kind:
                chosen, rejected = (orig, abl) if kind == "harmless" else (abl, orig)
                pairs.append(_pair(_prompt(prompt, system_prompt), chosen, rejected, kind))
    return pairs, counts


def write_pairs(path: Path, pairs: Sequence[dict[str, Any]]) -> None:
    """Write pairs as JSONL (a file ``--preferences`` reads back), atomically."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8"
    )
    tmp.replace(path)


# --- preference datasets ----------------------------------------------------------------------


def _messages(value: Any, role: str, where: str) -> list[Message]:
    """Text as one message of ``role``, or a list of ``{"role", "content"}`` messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DatasetError(f"{where} must be text or a list of {{role, content}} messages.")


def normalize_pair(row: dict[str, Any], where: str, system_prompt: str | None) -> dict[str, Any]:
    """One row as a conversational preference row (see the module docstring).

    Message lists of ``chosen`` and ``rejected`` that repeat the conversation (an implicit
    prompt, as in orpo-dpo-mix-40k) are split: their shared opening messages are the prompt.

    Raises:
        DatasetError: no chosen/rejected, or no prompt to be found.
    """
    if "chosen" not in row or "rejected" not in row:
        raise DatasetError(f"{where} has no chosen/rejected fields.")
    chosen = _messages(row["chosen"], "assistant", f"{where} chosen")
    rejected = _messages(row["rejected"], "assistant", f"{where} rejected")
    # The longest shared opening that leaves each side at least one message, ending before an
    # assistant message (earlier assistant turns of a multi-turn prompt are part of it).
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared]["role"] != "assistant":
        shared -= 1
    prompt = chosen[:shared]
    if not prompt:
        if row.get("prompt") is None:
            raise DatasetError(f"{where} has no prompt (a prompt field, or chat messages).")
        prompt = _messages(row["prompt"], "user", f"{where} prompt")
    chosen, rejected = chosen[shared:], rejected[shared:]
    if system_prompt is not None and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_truncated": bool(row.get("chosen_truncated", False)),
        "rejected_truncated": bool(row.get("rejected_truncated", False)),
        "kind": None if row.get("kind") is None else str(row["kind"]),
    }


def preference_rows(spec: str, system_prompt: str | None) -> Iterator[dict[str, Any]]:
    """The normalised rows of a preference dataset (file or ``hf:``), streamed."""
    source = RowSource.parse(spec)
    for batch in source.batches(256, ("prompt", "chosen", "rejected", "chosen_truncated",
                                      "rejected_truncated", "kind")):  # fmt: skip
        for i, row in enumerate(batch.rows):
            yield normalize_pair(row, f"{source.name} row {batch.start + i}", system_prompt)


def build_preferences(spec: str, system_prompt: str | None, cache_dir: Path) -> Dataset:
    """The rows of :func:`preference_rows` as an Arrow-backed dataset written to ``cache_dir``.

    Raises:
        DatasetError: a malformed row, or no row at all.
    """
    from datasets import Dataset

    # Fail on the first row before datasets starts its own machinery (its errors are wrapped).
    if next(preference_rows(spec, system_prompt), None) is None:
        raise DatasetError(f"{spec} holds no preference pairs.")
    return Dataset.from_generator(
        preference_rows,
        gen_kwargs={"spec": spec, "system_prompt": system_prompt},
        cache_dir=str(cache_dir),
    )
