"""Invariants of ablation on tiny random models of every supported family."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.edit.export import save_model, verify_export
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.weights import bake
from abliterate.measure.activations import capture_last_token
from abliterate.model.anatomy import anatomy_of


def logits(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model(**enc).logits  # (batch, pos, vocab)


def random_direction(d_model: int, seed: int = 1) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(d_model, generator=g)).normalized()


def spec_for(model: Any, strength: float = 1.0, seed: int = 1) -> Ablation:
    arch = anatomy_of(model)
    return Ablation.uniform(random_direction(arch.d_model, seed), arch.n_layers, strength)


def test_residual_has_no_component_along_direction(
    family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model(family)
    arch = anatomy_of(model)
    spec = spec_for(model)
    d = spec.direction.vector
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    sink = torch.zeros(arch.n_layers, 3, arch.d_model, dtype=torch.float64)
    with edit_hooks(model, spec), capture_last_token(arch, ("pre", "mid", "post"), sink):
        out = model(**enc, output_hidden_states=True)
    # Every pre-norm hidden state (embedding output and each block output) is orthogonal to d.
    for h in out.hidden_states[:-1]:  # the last entry is after the final norm
        rel = (h.float() @ d).abs().max() / h.float().norm(dim=-1).max()
        assert rel < 1e-5
    # The "mid" residual between attention and MLP too (sums over the batch).
    assert float((sink.float() @ d).abs().max() / sink.float().norm(dim=-1).max()) < 1e-5
    # Without the edit the direction is clearly present, so the check above can fail.
    with torch.no_grad():
        plain = model(**enc, output_hidden_states=True)
    assert max(float((h.float() @ d).abs().max()) for h in plain.hidden_states[:-1]) > 1e-2


def test_hooks_equal_orthogonalized_weights(
    family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model(family)
    spec = spec_for(model, strength=1.0)
    with edit_hooks(model, spec):
        hooked = logits(model, tokenizer, texts)
    original = logits(model, tokenizer, texts)
    bake(model, spec)
    baked = logits(model, tokenizer, texts)
    assert torch.allclose(hooked, baked, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(original, baked, atol=1e-3)


def test_partial_strength_hooks_equal_weights(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("llama")
    arch = anatomy_of(model)
    d = random_direction(arch.d_model)
    spec = Ablation(d, embedding=0.5, attention=(0.0, 1.0, 0.3, 0.0), mlp=(1.0, 0.0, 0.7, 0.2))
    with edit_hooks(model, spec):
        hooked = logits(model, tokenizer, texts)
    bake(model, spec)
    assert torch.allclose(hooked, logits(model, tokenizer, texts), atol=1e-4, rtol=1e-4)


def test_hooks_are_removed_on_exit_and_on_error(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model("qwen2")
    before = logits(model, tokenizer, texts)
    with edit_hooks(model, spec_for(model)):
        pass
    with pytest.raises(RuntimeError), edit_hooks(model, spec_for(model)):
        raise RuntimeError("boom")
    assert torch.equal(before, logits(model, tokenizer, texts))


def test_strength_zero_is_identity(
    family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model(family)
    before = logits(model, tokenizer, texts)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = spec_for(model, strength=0.0)
    with edit_hooks(model, spec):
        assert torch.equal(before, logits(model, tokenizer, texts))
    bake(model, spec)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_ablating_twice_equals_once(
    family: str, make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    model = make_model(family)
    spec = spec_for(model)
    with edit_hooks(model, spec):
        once = logits(model, tokenizer, texts)
        with edit_hooks(model, spec):
            twice = logits(model, tokenizer, texts)
    assert torch.allclose(once, twice, atol=1e-5, rtol=1e-5)
    bake(model, spec)
    w_once = {k: v.clone() for k, v in model.state_dict().items()}
    bake(model, spec)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, w_once[k], atol=1e-6), k


def test_tied_embeddings_are_untied_before_editing(make_model: Callable[[str], Any]) -> None:
    model = make_model("qwen2")
    arch = anatomy_of(model)
    assert arch.lm_head.weight is arch.embedding.weight
    head = arch.lm_head.weight.detach().clone()
    bake(model, spec_for(model))
    arch = anatomy_of(model)
    assert arch.lm_head.weight is not arch.embedding.weight
    assert torch.equal(arch.lm_head.weight, head)
    assert model.config.tie_word_embeddings is False


def test_save_load_round_trip_is_exact(
    family: str,
    make_model: Callable[[str], Any],
    tokenizer: Any,
    texts: list[str],
    tmp_path: Path,
) -> None:
    model = make_model(family)
    spec = spec_for(model)
    bake(model, spec)
    save_model(model, tokenizer, tmp_path / "m", {"edit": spec.to_dict()})
    assert verify_export(model, tokenizer, tmp_path / "m", texts) == 0.0
    assert (tmp_path / "m" / "abliteration.json").is_file()
    assert list((tmp_path / "m").glob("*.safetensors"))


def test_edit_spec_round_trip(make_model: Callable[[str], Any], tmp_path: Path) -> None:
    model = make_model("llama")
    spec = spec_for(model, strength=0.75)
    spec.save(tmp_path)
    assert Ablation.load(tmp_path) == spec


def test_spec_must_match_model(make_model: Callable[[str], Any]) -> None:
    model = make_model("llama")
    bad = Ablation.uniform(random_direction(64), n_layers=3)
    with pytest.raises(ValueError, match="covers 3 layers"), edit_hooks(model, bad):
        pass
    with pytest.raises(ValueError, match="d_model"):
        bake(model, Ablation.uniform(random_direction(32), n_layers=4))


def test_multi_token_kl_is_zero_for_itself_and_positive_when_edited(
    make_model: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    from abliterate.core.stats import kl_divergence
    from abliterate.eval.kl import multi_token_kl
    from abliterate.model.forward import next_token_logprobs

    model = make_model("llama")
    same, first_same = multi_token_kl(model, tokenizer, texts, n_tokens=5, batch_size=4)
    assert same == pytest.approx(0.0, abs=1e-6) and first_same == pytest.approx(0.0, abs=1e-6)
    spec = spec_for(model)
    multi, first = multi_token_kl(
        model, tokenizer, texts, q_context=lambda: edit_hooks(model, spec), n_tokens=5,
        batch_size=4,
    )  # fmt: skip
    assert multi > 0 and first > 0
    # Position 0 of the multi-token measure is exactly the first-token KL.
    base = next_token_logprobs(model, tokenizer, texts)
    with edit_hooks(model, spec):
        edited = next_token_logprobs(model, tokenizer, texts)
    assert first == pytest.approx(float(kl_divergence(base, edited).mean()), rel=1e-3)
    # Two separate model objects give the same answer as hooks on one.
    import copy

    other = copy.deepcopy(model)
    bake(other, spec)
    multi2, _ = multi_token_kl(model, tokenizer, texts, model_q=other, n_tokens=5, batch_size=4)
    assert multi2 == pytest.approx(multi, rel=1e-3)


def test_position_kl_in_row_chunks_equals_whole_batch() -> None:
    from abliterate.core.stats import kl_divergence, position_kl

    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(7, 5, 50, generator=g), torch.randn(7, 5, 50, generator=g)
    whole = kl_divergence(
        torch.log_softmax(p, -1).flatten(0, 1), torch.log_softmax(q, -1).flatten(0, 1)
    ).view(7, 5)
    assert torch.allclose(position_kl(p, q, rows=3), whole, atol=1e-6)
    assert torch.allclose(position_kl(p, q, rows=100), whole, atol=1e-6)
