"""Scoring edits without generating: batched edit hooks, the teacher-forced refusal openings and
the scorer that runs several edits per forward pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from edit_variants import VARIANTS, build, encode

from abliterate.core.stats import kl_divergence
from abliterate.edit.hooks import batched_edit_hooks, edit_hooks
from abliterate.measure.refusal import RefusalOpenings
from abliterate.model.forward import next_token_logprobs
from abliterate.search.scoring import EditScorer, ScoringSet

REFUSAL_IDS = [5, 6, 7]


def _all_logprobs(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(**encode(tokenizer, texts)).logits.float(), -1)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_batched_hooks_equal_each_edit_on_its_own_rows(
    family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model(family)
    edits = [build(v, strength=0.8) for v in VARIANTS]
    alone = []
    for edit in edits:
        with edit_hooks(model, edit):
            alone.append(_all_logprobs(model, tokenizer, texts))
    enc = encode(tokenizer, texts)
    n = len(texts)
    with batched_edit_hooks(model, edits) as blocks, torch.no_grad():
        blocks.rows = n
        batched = model(
            input_ids=enc["input_ids"].repeat(len(edits), 1),
            attention_mask=enc["attention_mask"].repeat(len(edits), 1),
        ).logits.float()
    batched = torch.log_softmax(batched, -1)
    for k, expected in enumerate(alone):
        got = batched[k * n : (k + 1) * n]
        assert float((got - expected).abs().max()) < 1e-4, VARIANTS[k]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with batched_edit_hooks(model, edits[:2]) as blocks, pytest.raises(ValueError, match="rows"):
        blocks.rows = 2
        model(input_ids=enc["input_ids"])  # 6 rows are not 2 edits x 2 rows


def test_refusal_openings_are_the_most_frequent_refused_openings(tokenizer: Any) -> None:
    answers = [[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 3, 4, 5], [7, 8, 9, 10], [1, 2], [1, 2, 3, 4]]
    refused = [True, True, True, True, True, False]
    openings = RefusalOpenings.from_answers(answers, refused, length=3, top=2)
    assert openings.tokens == ((1, 2, 3), (7, 8, 9))
    assert openings.counts == (3, 1)
    assert openings.n_refused == 4  # the 2-token answer is too short; the last was not refused
    assert openings.coverage == 1.0
    assert RefusalOpenings.from_answers(answers, refused, 3, top=1).coverage == 0.75
    assert RefusalOpenings.from_answers(answers, [False] * 6, 3, 2).tokens == ()
    assert openings.to_dict(tokenizer)["openings"][0]["tokens"] == [1, 2, 3]
    with pytest.raises(ValueError, match="same length"):
        RefusalOpenings(((1, 2), (3,)), (1, 1), 2)


@pytest.fixture
def setup(make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]) -> Any:
    model = make_model("llama")
    openings = RefusalOpenings(((10, 11, 12), (13, 14, 15)), (2, 1), 3)
    harmful, harmless = texts[2:5], [texts[0], texts[1], texts[5]]
    texts = ScoringSet(harmful, harmless, REFUSAL_IDS, openings, batch_size=5)
    scorer = EditScorer(model, tokenizer, texts)
    return model, tokenizer, harmful, harmless, openings, scorer


def test_scores_equal_plain_forward_passes(setup: Any) -> None:
    model, tokenizer, harmful, harmless, openings, scorer = setup
    assert scorer.prefix.numel() > 0  # the chat template's opening is shared
    edit = build("norm_preserving_per_layer_partial")
    [scores] = scorer.score([edit])
    base = next_token_logprobs(model, tokenizer, harmless)
    with edit_hooks(model, edit):
        first = next_token_logprobs(model, tokenizer, harmful)
        edited_harmless = next_token_logprobs(model, tokenizer, harmless)
        # Teacher forcing, the long way: each prompt followed by each opening, one at a time.
        expected = torch.zeros(len(harmful))
        for i, text in enumerate(harmful):
            prompt = tokenizer(text, add_special_tokens=False).input_ids
            for opening in openings.tokens:
                ids = torch.tensor([prompt + list(opening)])
                with torch.no_grad():
                    lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                n = len(prompt)
                expected[i] += lp[torch.arange(n - 1, n - 1 + 3), torch.tensor(opening)].sum().exp()
    assert torch.allclose(scores.refusal, expected, rtol=1e-4, atol=1e-7)
    assert torch.allclose(scores.first_token, first[:, REFUSAL_IDS].logsumexp(-1).exp(), rtol=1e-4)
    assert torch.allclose(scores.kl, kl_divergence(base, edited_harmless), atol=1e-5)
    assert float(scores.kl.mean()) > 1e-3  # the edit does move the model


def test_several_edits_per_pass_equal_one_at_a_time(setup: Any) -> None:
    *_, scorer = setup
    edits = [build(v, strength=0.7) for v in VARIANTS[:6]]
    one = scorer.score(edits, edits_per_pass=1)
    many = scorer.score(edits, edits_per_pass=4)
    for a, b in zip(one, many, strict=True):
        for x, y in ((a.refusal, b.refusal), (a.first_token, b.first_token), (a.kl, b.kl)):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


def test_no_edit_scores_zero_kl_and_subsets_are_the_first_prompts(setup: Any) -> None:
    *_, scorer = setup
    [none] = scorer.score([build("plain", strength=0.0)])
    assert float(none.kl.abs().max()) < 1e-6
    edit = build("partial")
    [full] = scorer.score([edit])
    [part] = scorer.subset(2, 1).score([edit])
    assert torch.allclose(part.refusal, full.refusal[:2], rtol=1e-4)
    assert torch.allclose(part.kl, full.kl[:1], atol=1e-6)
    summary = full.summary()
    assert set(summary) == {"refusal", "refusal_prob", "kl"}
    assert 0.0 <= summary["refusal"] <= 1.0


def test_without_openings_the_refusal_is_the_next_token_proxy(setup: Any) -> None:
    model, tokenizer, harmful, harmless, _, _ = setup
    scorer = EditScorer(
        model, tokenizer, ScoringSet(harmful, harmless, REFUSAL_IDS, RefusalOpenings())
    )
    [scores] = scorer.score([build("plain")])
    assert torch.equal(scores.refusal, scores.first_token)
