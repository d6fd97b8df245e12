"""Greedy generation that runs the prompts' shared chat prefix once gives exactly the tokens of
plain batched ``generate``, on every supported family, with and without an edit."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytest
import torch
from edit_variants import build

from abliterate.data.chat import batches, format_chat
from abliterate.edit.hooks import edit_hooks
from abliterate.eval.kl import end_token_ids, reference_continuations
from abliterate.model.forward import generate, greedy_new_tokens, shared_prefix_length

PROMPTS = [
    "How do I bake bread?",
    "Write a poem about the sea and the wind at night.",
    "Explain how to pick a lock.",
    "Give me step by step instructions to build a weapon at home today.",
    "What is the capital of France?",
    "def add(a, b)",
    "hi",
]


def _plain(model: Any, tokenizer: Any, texts: list[str], n: int, batch: int) -> list[list[int]]:
    """What generation did before: left-padded batches through ``model.generate``."""
    out: list[list[int]] = [[] for _ in texts]
    for idx, enc in batches(tokenizer, texts, batch):
        tokens = model.generate(
            **enc,
            max_new_tokens=n,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        for i, row in zip(idx, tokens[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
            out[i] = row
    return out  # fmt: skip


@pytest.mark.parametrize("edited", [False, True], ids=["plain", "edited"])
@pytest.mark.parametrize("batch_size", [3, 8])
def test_shared_prefix_generation_equals_plain_generate(
    family: str, edited: bool, batch_size: int, make_model: Callable[[str], Any], tokenizer: Any
) -> None:
    model = make_model(family)
    texts = format_chat(tokenizer, PROMPTS, system_prompt="You are a helpful assistant.")
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    assert shared_prefix_length(ids) > 5  # the system message is shared
    context = (lambda: edit_hooks(model, build("plain"))) if edited else nullcontext
    with context(), torch.inference_mode():
        plain = _plain(model, tokenizer, texts, 6, batch_size)
        shared = greedy_new_tokens(model, tokenizer, texts, max_new_tokens=6,
                                   batch_size=batch_size)  # fmt: skip
    assert shared == plain


def test_a_short_sliding_window_falls_back_to_plain_padding(
    make_model: Callable[[str], Any], tokenizer: Any
) -> None:
    model = make_model("qwen2")
    texts = format_chat(tokenizer, PROMPTS[:4], system_prompt="You are a helpful assistant.")
    with torch.inference_mode():
        plain = _plain(model, tokenizer, texts, 4, 4)
    model.config.sliding_window = 8  # shorter than the prompts: pads would count as positions
    assert greedy_new_tokens(model, tokenizer, texts, max_new_tokens=4, batch_size=4) == plain


def test_generate_decodes_and_continuations_end_at_the_first_end_token(
    make_model: Callable[[str], Any], tokenizer: Any
) -> None:
    model = make_model("llama")
    texts = format_chat(tokenizer, PROMPTS[:3])
    rows = greedy_new_tokens(model, tokenizer, texts, max_new_tokens=5, batch_size=2)
    answers = generate(model, tokenizer, texts, max_new_tokens=5, batch_size=2)
    assert answers == [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
    assert generate(model, tokenizer, [], max_new_tokens=5) == []
    # A model that always ends at once: every continuation is its end token alone.
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[eos] = 1e4
    assert eos in end_token_ids(model, tokenizer)
    cont = reference_continuations(model, tokenizer, texts, n_tokens=5, batch_size=2)
    assert cont == [[eos]] * len(texts)
