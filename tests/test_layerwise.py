"""Layer-streamed measurement and scoring (LayerwiseModel) agree with the in-memory model:
next-token log-probabilities with and without edits, activation means at every site, the
selection's scores and the search's objectives, on dense and mixture-of-experts families; and
only one decoder layer's weights are in memory at a time.

Tolerance: float32 computations in another order (left-padded full prompts layer by layer,
against the in-memory paths' batching and shared-prefix cache) agree to ~1e-5; the tests allow
1e-4 absolute on log-probabilities and activations (whose entries are O(1)), and 1e-4 relative
on scores."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import MOE_TYPES, make_moe

from abliterate.config import RunConfig
from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.edit.hooks import edit_hooks
from abliterate.measure.activations import collect_activations
from abliterate.measure.candidates import Candidates
from abliterate.measure.refusal import RefusalOpenings
from abliterate.measure.streamed import collect_activations_streamed
from abliterate.model.forward import next_token_logprobs
from abliterate.model.layerwise import LayerwiseModel
from abliterate.search.objective import CheapObjective
from abliterate.search.scoring import ScoringSet
from abliterate.search.selection import select_direction
from abliterate.search.streamed import streamed_logprobs

ATOL = 1e-4


@pytest.fixture(params=["llama", "qwen2", "gemma", *MOE_TYPES])
def saved(
    request: pytest.FixtureRequest, make_model: Callable[[str], Any], tokenizer: Any, tmp_path: Path
) -> Iterator[tuple[Any, LayerwiseModel]]:
    """(in-memory model, layer-streamed model of the same checkpoint), for each family."""
    family = str(request.param)
    model = make_moe(family, len(tokenizer)) if family in MOE_TYPES else make_model(family)
    model.save_pretrained(tmp_path / family, max_shard_size="60KB")
    yield model, LayerwiseModel(tmp_path / family)


def _edits(d_model: int, n_layers: int) -> list[Ablation]:
    g = torch.Generator().manual_seed(3)
    d = [Direction(torch.randn(d_model, generator=g)).normalized() for _ in range(3)]
    return [
        Ablation.uniform(d[0], n_layers),
        Ablation(direction=d[1], embedding=0.5, attention=(1.0,) * n_layers,
                 mlp=tuple(0.25 * i for i in range(n_layers)), mode="norm_preserving"),
        Ablation(direction=d[2], embedding=0.0, attention=(0.0,) * n_layers,
                 mlp=(1.0,) * n_layers, extra_directions=(d[0],)),
    ]  # fmt: skip


def test_logprobs_with_and_without_edits_equal_the_loaded_model(
    saved: tuple[Any, LayerwiseModel], tokenizer: Any, texts: list[str]
) -> None:
    model, streamed = saved
    edits = _edits(model.config.hidden_size, model.config.num_hidden_layers)
    # One pass: the unedited model and three edits as four streams, two text sets.
    got = streamed_logprobs(streamed, tokenizer, [texts[:4], texts[4:]], [None, *edits],
                            batch_size=3)  # fmt: skip
    for edit, per_set in zip([None, *edits], got, strict=True):
        with nullcontext() if edit is None else edit_hooks(model, edit):
            want = next_token_logprobs(model, tokenizer, texts, batch_size=3)
        assert torch.allclose(torch.cat(per_set), want, atol=ATOL), edit is None
    # The edits matter (so the agreement above is not trivial).
    assert (torch.cat(got[1]) - torch.cat(got[0])).abs().max() > 100 * ATOL


def test_activations_equal_the_loaded_model(
    saved: tuple[Any, LayerwiseModel], tokenizer: Any, texts: list[str]
) -> None:
    model, streamed = saved
    want, want_kept = collect_activations(model, tokenizer, texts, keep_site="mid", batch_size=4)
    got, got_kept = collect_activations_streamed(streamed, tokenizer, texts, keep_site="mid",
                                                 batch_size=4)  # fmt: skip
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert torch.allclose(got, want, atol=ATOL)
    assert got_kept is not None and want_kept is not None
    assert torch.allclose(got_kept, want_kept, atol=ATOL)


def test_selection_scores_equal_the_loaded_model(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    model = make_model("llama")
    model.save_pretrained(tmp_path / "m", max_shard_size="60KB")
    streamed = LayerwiseModel(tmp_path / "m")
    harmful, harmless = texts[2:4] + texts[5:], texts[:2] + texts[4:5]
    candidates = Candidates(
        harmful_mean=collect_activations_streamed(streamed, tokenizer, harmful)[0],
        harmless_mean=collect_activations_streamed(streamed, tokenizer, harmless)[0],
    )
    config = RunConfig(n_screen=2, n_finalists=3, batch_size=2, prune_last_layers=0.25)
    refusal_ids = [5, 6, 7]
    args = (candidates, harmful, harmless, refusal_ids, RefusalOpenings(), config)
    want = select_direction(model, tokenizer, *args)
    got = select_direction(streamed, tokenizer, *args)
    assert (got.layer, got.site) == (want.layer, want.site)
    assert got.baseline_refusal == pytest.approx(want.baseline_refusal, rel=1e-4, abs=ATOL)
    assert len(got.scores) == len(want.scores) == 8  # layers 0-2 × 3 sites, less 0/pre
    for g, w in zip(got.scores, want.scores, strict=True):
        assert (g.key, g.same_as) == (w.key, w.same_as)
        for a, b in ((g.screen_refusal, w.screen_refusal), (g.screen_kl, w.screen_kl),
                     (g.refusal, w.refusal), (g.kl, w.kl)):  # fmt: skip
            assert (a is None) == (b is None)
            assert a is None or a == pytest.approx(b, rel=1e-4, abs=ATOL)


def test_streamed_selection_falls_back_to_next_token_scores(
    make_model: Callable[[str], Any],
    tokenizer: Any,
    texts: list[str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Teacher-forced openings and the descent need the model loaded: a layer-streamed model is
    # screened on the next-token proxy, unrefined, and the selection says which measure it used.
    model = make_model("llama")
    model.save_pretrained(tmp_path / "m")
    streamed = LayerwiseModel(tmp_path / "m")
    harmful, harmless = texts[2:4] + texts[5:], texts[:2] + texts[4:5]
    candidates = Candidates(
        harmful_mean=collect_activations_streamed(streamed, tokenizer, harmful)[0],
        harmless_mean=collect_activations_streamed(streamed, tokenizer, harmless)[0],
    )
    config = RunConfig(n_screen=2, n_finalists=2, batch_size=2, refusal_objective="openings",
                       refine_steps=2, screen_halving=True)  # fmt: skip
    plain = RunConfig(n_screen=2, n_finalists=2, batch_size=2, screen_halving=True)
    args = (candidates, harmful, harmless, [5, 6, 7], RefusalOpenings())
    got = select_direction(streamed, tokenizer, *args, config)
    want = select_direction(streamed, tokenizer, *args, plain)
    assert got.objective == "next_token" and "refinement" not in got.details
    assert got.to_dict() == want.to_dict()
    assert "--refusal-objective openings needs the model loaded" in caplog.text
    assert "--refine-steps needs gradients" in caplog.text


@pytest.mark.parametrize("family", ["qwen2", "mixtral"])
def test_search_objective_equals_the_loaded_model(
    family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    model = make_moe(family, len(tokenizer)) if family in MOE_TYPES else make_model(family)
    model.save_pretrained(tmp_path / family)
    streamed = LayerwiseModel(tmp_path / family)
    scoring = ScoringSet(texts[2:4], texts[:2], [5, 6, 7], RefusalOpenings())
    want = CheapObjective(model, tokenizer, scoring)
    got = CheapObjective(streamed, tokenizer, scoring)
    assert got.baseline == pytest.approx(want.baseline, rel=1e-4, abs=ATOL)
    for edit in _edits(model.config.hidden_size, model.config.num_hidden_layers):
        assert got(edit) == pytest.approx(want(edit), rel=1e-4, abs=ATOL)


def test_one_layer_of_weights_at_a_time(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    make_model("qwen2").save_pretrained(tmp_path / "m")
    streamed = LayerwiseModel(tmp_path / "m")
    seen: list[int] = []

    @contextmanager
    def check(layer: int, _batch: int) -> Iterator[None]:
        real = {n for n, p in streamed.model.named_parameters() if p.device.type != "meta"}
        assert real == set(streamed.layer_parameters(layer)), layer
        seen.append(layer)
        yield

    from abliterate.data.chat import batches

    encodings = [enc for _, enc in batches(tokenizer, texts, 4)]
    streamed.run(encodings, per_batch=check, logits=False)
    assert seen == [0, 0, 1, 1, 2, 2, 3, 3]  # layer-major: both batches through each layer
    assert all(p.device.type == "meta" for p in streamed.model.parameters())


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_greedy_generation_equals_the_loaded_model(
    family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    from abliterate.model.forward import generate
    from abliterate.search.streamed import streamed_generate

    model = make_moe(family, len(tokenizer)) if family in MOE_TYPES else make_model(family)
    model.save_pretrained(tmp_path / family)
    edit = _edits(64, model.config.num_hidden_layers)[1]
    streamed = LayerwiseModel(tmp_path / family)
    for e in (None, edit):
        with nullcontext() if e is None else edit_hooks(model, e):
            want = generate(model, tokenizer, texts, max_new_tokens=6, batch_size=4)
        got = streamed_generate(streamed, tokenizer, texts, e, max_new_tokens=6, batch_size=4)
        assert got == want
