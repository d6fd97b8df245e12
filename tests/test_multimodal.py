"""Image-text-to-text checkpoints: the language model is measured and edited from text
prompts, and the whole checkpoint (vision tower included, untouched) is saved and reloads
exactly through :func:`~abliterate.model.loading.load_model`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from arch_cases import MULTIMODAL, along, build_multimodal, residual_states

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.edit.export import save_model, verify_export
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.weights import bake
from abliterate.measure.activations import collect_activations
from abliterate.model import families
from abliterate.model.anatomy import Anatomy, anatomy_of
from abliterate.model.forward import SharedPrefixScorer
from abliterate.model.loading import load_model
from abliterate.model.verify import verify_anatomy

pytestmark = pytest.mark.filterwarnings("ignore")

TEXT_FAMILY = {
    "gemma3": "gemma3_text",
    "qwen2_vl": "qwen2_vl_text",
    "qwen2_5_vl": "qwen2_5_vl_text",
    "qwen3_vl": "qwen3_vl_text",
    "qwen3_vl_moe": "qwen3_vl_moe_text",
    "qwen3_5": "qwen3_5_text",
    "qwen3_5_moe": "qwen3_5_moe_text",
    "mistral3": "mistral",
    "gemma4": "gemma4_text",
    "llama4": "llama4_text",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread (see test_architectures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WHOLE = [t for t in MULTIMODAL if families.MULTIMODAL[t].whole]


@pytest.mark.parametrize("model_type", WHOLE)
def test_language_model_of_a_multimodal_checkpoint_round_trips(
    model_type: str, tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    model = build_multimodal(model_type, len(tokenizer))
    arch = anatomy_of(model)
    assert arch.anatomy.family == TEXT_FAMILY[model_type]
    decoder = families.MULTIMODAL[model_type].decoder  # model.language_model, Llama 4 aside
    assert arch.anatomy.decoder == decoder
    assert all(w.tensor.startswith(f"{decoder}.") for w in arch.anatomy.writers)
    # The same anatomy from config.json alone (what streaming edits read).
    assert Anatomy.from_config(model.config.to_dict()).writers == arch.anatomy.writers
    verify_anatomy(model, tokenizer)

    # Measured from text prompts: activations and scoring run on the language model.
    means, _ = collect_activations(model, tokenizer, texts[:3], batch_size=3)
    assert means.shape == (arch.n_layers, 3, arch.d_model) and bool(torch.isfinite(means).all())
    SharedPrefixScorer(model, tokenizer, texts[:3]).logprobs()

    g = torch.Generator().manual_seed(1)
    d = Direction(torch.randn(arch.d_model, generator=g)).normalized()
    spec = Ablation.uniform(d, arch.n_layers)
    ids = tokenizer(texts[:2], return_tensors="pt", padding=True, add_special_tokens=False)
    with edit_hooks(model, spec), residual_states(arch) as states, torch.no_grad():
        hooked = model(**ids).logits
    assert along(states, d.vector) < 1e-5

    before = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    bake(model, spec)
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, hooked, atol=1e-4)
    writers = {w.tensor for w in arch.anatomy.writers} | {
        w.bias for w in arch.anatomy.writers if w.bias is not None
    }
    for name, p in model.named_parameters():
        if name not in writers:  # vision tower, projector, norms, head: untouched
            assert torch.equal(p, before[name]), name

    out = tmp_path / "edited"
    save_model(model, tokenizer, out, {"edit": spec.to_dict()})
    assert verify_export(model, tokenizer, out, texts[:2]) == 0.0
    loaded = load_model(str(out), device="cpu")
    assert type(loaded.model) is type(model)  # loaded whole, not as a text-only causal LM
    reloaded = dict(loaded.model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(reloaded[name], p), name


def test_llama4_checkpoint_loads_its_language_model(
    tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    """Llama 4's image-text-to-text class cannot run text prompts in transformers 5.24: its
    checkpoints load as the language model alone, with the anatomy of that class."""
    model = build_multimodal("llama4", len(tokenizer))
    whole = anatomy_of(model).anatomy
    assert whole.decoder == "language_model.model"
    assert whole.lm_head == "language_model.lm_head"
    assert whole.writers[0].tensor == "language_model.model.embed_tokens.weight"
    verify_anatomy(model, tokenizer)
    model.save_pretrained(tmp_path / "llama4")
    tokenizer.save_pretrained(tmp_path / "llama4")
    loaded = load_model(str(tmp_path / "llama4"), device="cpu")
    assert type(loaded.model).__name__ == "Llama4ForCausalLM"
    text_only = anatomy_of(loaded.model).anatomy
    assert text_only.decoder == "model"
    assert Anatomy.from_config(model.config.to_dict()).decoder == "model"  # as load_model does
    assert [w.name.removeprefix("model.") for w in text_only.writers] == [
        w.name.removeprefix("language_model.model.") for w in whole.writers
    ]
    ids = tokenizer(texts[:2], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        hidden = model.language_model.model(**ids).last_hidden_state
        assert torch.equal(loaded.model(**ids).logits, model.language_model.lm_head(hidden))
