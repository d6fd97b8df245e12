"""The prompt sets of a run: train (directions), validation (selection, search) and evaluation
(the held-out report), harmful and harmless, and their chat-formatted texts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from abliterate.config import RunConfig
from abliterate.data.chat import ChatSet
from abliterate.data.prompts import resolve_prompts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from abliterate.data.prompts import PromptSet


TRAIN_SETS = ("train_harmful", "train_harmless")
VAL_SETS = ("val_harmful", "val_harmless")
SCORED = {"val_harmful": "scored_val_harmful", "val_harmless": "scored_val_harmless",
          "eval_harmless": "scored_eval_harmless"}  # fmt: skip
"""Sets whose next-token distributions are read, and the key of their thinking-off texts."""


def format_sets(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase, sets: dict[str, PromptSet]
) -> dict[str, ChatSet]:
    """Every set chat-formatted with ``--thinking``, plus the :data:`SCORED` sets with thinking
    off (the same texts when thinking is off)."""
    system = config.system_prompt
    chats = {k: ChatSet.format(tokenizer, s, system, config.thinking) for k, s in sets.items()}
    for key, scored in SCORED.items():
        chats[scored] = (
            chats[key]
            if config.thinking == "off"
            else ChatSet.format(tokenizer, sets[key], system, "off")
        )
    return chats


def load_prompt_sets(config: RunConfig) -> dict[str, PromptSet]:
    """The six prompt sets of a run (train, validation and evaluation, harmful and harmless)."""

    col = config.prompt_column
    return {
        "train_harmful": resolve_prompts(config.harmful, "harmful", "train", col).head(
            config.n_train
        ),
        "train_harmless": resolve_prompts(config.harmless, "harmless", "train", col).head(
            config.n_train
        ),
        "val_harmful": resolve_prompts(None, "harmful", "val", col).head(config.n_val),
        "val_harmless": resolve_prompts(None, "harmless", "val", col).head(config.n_val),
        "eval_harmful": resolve_prompts(config.eval_harmful, "harmful", "eval", col).head(
            config.n_eval
        ),
        "eval_harmless": resolve_prompts(config.eval_harmless, "harmless", "eval", col).head(
            config.n_eval
        ),
    }
