"""Quality metrics: n-gram fluency golden values, reference cross-entropy, KL between models."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from abliterate.eval.kl import multi_token_kl
from abliterate.eval.metrics import (
    ngram_fluency,
    ngram_stats,
    reference_answers,
    reference_cross_entropy,
)


def test_ngram_stats_golden_values() -> None:
    assert ngram_stats("a b c", 1) == (1.0, pytest.approx(math.log2(3)))
    assert ngram_stats("The the THE the.", 1) == (0.25, 0.0)  # case-folded, punctuation dropped
    # "a b a b": bigrams ab, ba, ab -> 2 distinct of 3; entropy of (2/3, 1/3).
    distinct, entropy = ngram_stats("a b a b", 2)  # type: ignore[misc]
    assert distinct == pytest.approx(2 / 3)
    assert entropy == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    assert ngram_stats("one two", 3) is None


def test_ngram_fluency_separates_loops_from_prose() -> None:
    prose = ngram_fluency(["Preheat the oven, then mix flour, butter and sugar in a bowl."])
    loop = ngram_fluency(["the oven the oven the oven the oven the oven the oven"])
    for n in (1, 2, 3):
        assert prose[f"distinct_{n}"] == 1.0
        assert loop[f"distinct_{n}"] < 0.5  # type: ignore[operator]
        assert loop[f"entropy_{n}"] < prose[f"entropy_{n}"]  # type: ignore[operator]
    both = ngram_fluency(["a b c", "", "x x"])
    assert both["n_texts"] == 2
    assert both["distinct_1"] == pytest.approx((1.0 + 0.5) / 2)
    assert both["distinct_3"] == 1.0  # only "a b c" has a trigram
    assert ngram_fluency([""])["entropy_1"] is None


def test_reference_answers_are_shipped() -> None:
    refs = reference_answers()
    assert 40 <= len(refs) <= 60 and len(set(refs.prompts)) == len(refs)
    assert all(len(a.split()) >= 8 for a in refs.answers)
    assert len(refs.head(5)) == 5


def test_reference_cross_entropy_is_teacher_forced_mean(
    make_model: Callable[[str], Any], tokenizer: Any
) -> None:
    from abliterate.data.chat import format_chat

    model = make_model("llama")
    prompts = ["How do I bake bread?", "Write a poem.", "What is the capital of France?"]
    answers = ["Mix flour and water.", "The sea at night.", "Paris is the capital of France."]
    batched = reference_cross_entropy(model, tokenizer, prompts, answers, batch_size=2)
    # Golden computation: one unpadded sequence at a time, summed over answer tokens.
    total, count = 0.0, 0
    with torch.inference_mode():
        for text, answer in zip(format_chat(tokenizer, prompts), answers, strict=True):
            p = tokenizer(text, add_special_tokens=False).input_ids
            a = tokenizer(answer, add_special_tokens=False).input_ids
            logits = model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1 : -1]
            total += float(
                torch.nn.functional.cross_entropy(logits, torch.tensor(a), reduction="sum")
            )
            count += len(a)
    assert batched == pytest.approx(total / count, rel=1e-5)
    assert batched == pytest.approx(
        reference_cross_entropy(model, tokenizer, prompts, answers, batch_size=1), rel=1e-5
    )
    with pytest.raises(ValueError, match="one answer per prompt"):
        reference_cross_entropy(model, tokenizer, prompts, answers[:1])


def test_kl_of_a_model_against_itself_is_zero_and_positive_for_a_perturbed_copy(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("qwen2")
    same = copy.deepcopy(model)
    multi, first = multi_token_kl(model, tokenizer, texts, model_q=same, n_tokens=4, batch_size=4)
    assert multi == pytest.approx(0.0, abs=1e-6) and first == pytest.approx(0.0, abs=1e-6)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.model.layers[1].mlp.down_proj.weight.add_(0.05 * torch.randn_like(
            perturbed.model.layers[1].mlp.down_proj.weight))  # fmt: skip
    multi, first = multi_token_kl(
        model, tokenizer, texts, model_q=perturbed, n_tokens=4, batch_size=4
    )
    assert multi > 1e-4 and first > 1e-4


def test_position_kl_in_row_chunks_equals_whole_batch() -> None:
    from abliterate.core.stats import kl_divergence, position_kl

    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(7, 5, 50, generator=g), torch.randn(7, 5, 50, generator=g)
    whole = kl_divergence(
        torch.log_softmax(p, -1).flatten(0, 1), torch.log_softmax(q, -1).flatten(0, 1)
    ).view(7, 5)
    assert torch.allclose(position_kl(p, q, rows=3), whole, atol=1e-6)
    assert torch.allclose(position_kl(p, q, rows=100), whole, atol=1e-6)
