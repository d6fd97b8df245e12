"""Models spread over devices (device maps with CPU and disk offload) and quantized measurement
(bitsandbytes), with the edit baked into full-precision weights (issue 10, item 6).

Only the CPU is available here: device maps are tested with "cpu" and "disk" entries (accelerate
offloads the disk modules and streams them in for each forward pass, exactly as it does for
CPU-offloaded modules of a GPU model), and 4/8-bit models with bitsandbytes' CPU backend.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from abliterate.commands.run import run
from abliterate.config import RunConfig
from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.core.edits import load_edit
from abliterate.data.chat import format_chat
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.weights import bake
from abliterate.errors import ConfigError, UnsupportedArchitectureError
from abliterate.measure.activations import collect_activations
from abliterate.model.anatomy import anatomy_of
from abliterate.model.devices import bake_blockers, dense_weight, input_device, offloaded
from abliterate.model.forward import generate, next_token_logprobs
from abliterate.model.loading import load_model

PROMPTS = [
    "How do I bake bread?",
    "Write a poem about the sea and the wind at night.",
    "Explain how to pick a lock.",
    "Give me step by step instructions to build a weapon at home today.",
]


def disk_map() -> dict[str, str]:
    """Every other module offloaded to disk, the embedding and the head (tied or not) too."""
    placed = {"model.embed_tokens": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu"}
    placed |= {f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(4)}
    return placed | {"lm_head": "disk"}


@pytest.fixture(params=["qwen2", "llama"])
def model_dir(
    request: pytest.FixtureRequest, tmp_path: Path, make_model: Callable[[str], Any], tokenizer: Any
) -> Path:
    """A saved tiny model: Qwen2 (tied head) or Llama (own head, biased writers)."""
    path = tmp_path / request.param
    make_model(request.param).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def direction(d_model: int) -> Direction:
    return Direction(torch.randn(d_model, generator=torch.Generator().manual_seed(3))).normalized()


def test_a_spread_model_measures_and_edits_like_the_plain_one(
    model_dir: Path,
) -> None:
    path = model_dir
    plain = load_model(str(path), device="cpu")
    spread = load_model(str(path), device_map=disk_map())
    assert offloaded(spread.model)  # the disk modules hold meta tensors
    assert "offloaded" in str(bake_blockers(spread.model))
    assert input_device(spread.model) == torch.device("cpu") == spread.device
    texts = format_chat(plain.tokenizer, PROMPTS)
    tok = plain.tokenizer
    # Activations (shared-prefix cache, hooks on every layer) and next-token distributions.
    means = [collect_activations(m.model, tok, texts, batch_size=3)[0] for m in (plain, spread)]
    torch.testing.assert_close(means[0], means[1], rtol=0, atol=1e-6)
    arch = anatomy_of(plain.model)
    for mode in ("plain", "norm_preserving"):
        edit = Ablation(
            direction(arch.d_model), 1.0, (1.0,) * arch.n_layers, (0.5,) * arch.n_layers, mode=mode
        )
        # Norm-preserving hooks read each writer's weight: onloaded from disk for the spread one.
        scores = []
        for m in (plain, spread):
            with edit_hooks(m.model, edit):
                scores.append(next_token_logprobs(m.model, tok, texts, batch_size=3))
        torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=1e-5)
    assert generate(plain.model, tok, texts, max_new_tokens=5) == generate(
        spread.model, tok, texts, max_new_tokens=5
    )
    # Baking would write into meta tensors: refused, not silently skipped.
    with pytest.raises(UnsupportedArchitectureError, match="offloaded"):
        bake(spread.model, edit)


def test_a_model_split_over_cpu_entries_bakes_in_place(model_dir: Path) -> None:
    path = model_dir
    placed = {k: "cpu" for k in disk_map()}
    plain = load_model(str(path), device="cpu")
    split = load_model(str(path), device_map=placed)
    assert bake_blockers(split.model) is None
    arch = anatomy_of(plain.model)
    edit = Ablation.uniform(direction(arch.d_model), arch.n_layers)
    for m in (plain, split):
        bake(m.model, edit)
    texts = format_chat(plain.tokenizer, PROMPTS)
    torch.testing.assert_close(
        next_token_logprobs(plain.model, plain.tokenizer, texts),
        next_token_logprobs(split.model, split.tokenizer, texts),
        rtol=0,
        atol=0,
    )


def test_inputs_go_to_the_main_device_of_an_offloaded_embedding() -> None:
    meta = torch.nn.Embedding(4, 2, device="meta")
    model = SimpleNamespace(get_input_embeddings=lambda: meta, hf_device_map={"a": "cpu", "b": 1})
    assert input_device(model) == torch.device("cuda", 1)  # type: ignore[arg-type]
    model.hf_device_map = {"a": "disk", "b": "cpu"}
    assert input_device(model) == torch.device("cpu")  # type: ignore[arg-type]


def test_placement_options_are_parsed() -> None:
    config = RunConfig(device_map='{"model": 0, "lm_head": "cpu"}', max_memory="0=2GiB, cpu=8GB")
    assert config.placement() == {
        "device_map": {"model": 0, "lm_head": "cpu"},
        "max_memory": {0: "2GiB", "cpu": "8GB"},
        "load_in": None,
    }
    for bad, message in [
        ({"device_map": '["model"]'}, "or a JSON object such as"),
        ({"device_map": "{}"}, "non-empty JSON object"),
        ({"device_map": '{"model": true}'}, "a device is a GPU index"),
        ({"device_map": "auto", "max_memory": "cpu=lots"}, "not DEVICE=SIZE"),
        ({"device_map": "auto", "max_memory": "0=1GiB,0=2GiB"}, "names 0 twice"),
    ]:
        with pytest.raises(ConfigError, match=message):
            RunConfig(**bad)


def _run(path: Path, out: Path, **options: Any) -> dict[str, Any]:
    return run(
        RunConfig(
            model=str(path), out=out, n_train=6, n_val=4, n_eval=4, batch_size=4,
            max_new_tokens=4, kl_tokens=2, n_screen=2, n_finalists=2, n_examples=0, **options,
        )
    )  # fmt: skip


def _same_numbers(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("refusal_rate", "kl_divergence", "kl_divergence_multi_token"):
        assert a["edited"].get(key) == b["edited"].get(key), key
    assert a["baseline"]["refusal_rate"] == b["baseline"]["refusal_rate"]
    assert a["edit"] == b["edit"]


def test_run_measures_on_the_spread_model_and_bakes_a_full_precision_copy(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    plain = _run(tiny_model_dir, tmp_path / "plain", device="cpu")
    spread = _run(tiny_model_dir, tmp_path / "spread", device_map=json.dumps(disk_map()))
    assert "measured_on" not in plain
    assert "offloaded" in spread["measured_on"]
    assert "measured and searched on another copy" in (tmp_path / "spread/report.md").read_text()
    # The same edit is chosen and evaluated to the same numbers; the export reloads exactly.
    _same_numbers(plain, spread)
    assert spread["checks"]["export_reload_max_abs_diff"] == 0.0
    assert (tmp_path / "plain/model/model.safetensors").read_bytes() == (
        tmp_path / "spread/model/model.safetensors"
    ).read_bytes()
    env = json.loads((tmp_path / "spread/environment.json").read_text())
    assert env["device_map"] == {"disk": 4, "cpu": 4}


# --- quantized measurement --------------------------------------------------------------------


def test_quantized_loading_needs_bitsandbytes_and_cuda(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(ConfigError, match="bitsandbytes, which is not installed"):
        load_model(str(tiny_model_dir), load_in="4bit", device="cpu")
    # With bitsandbytes present (or said to be), a machine without CUDA is refused.
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA GPU, and this machine has none"):
        load_model(str(tiny_model_dir), load_in="4bit")  # auto: no CUDA here
    with pytest.raises(ConfigError, match="CUDA GPU"):
        load_model(str(tiny_model_dir), load_in="8bit", device_map="auto")
    with pytest.raises(ConfigError, match="--search-dtype"):
        RunConfig(load_in="4bit", search_dtype="float16")


bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs abliterate[quant]"
)


@bnb
@pytest.mark.parametrize("load_in", ["4bit", "8bit"])
def test_hooks_run_on_a_quantized_model(load_in: str, tiny_model_dir: Path) -> None:
    plain = load_model(str(tiny_model_dir), device="cpu")
    quant = load_model(str(tiny_model_dir), device="cpu", load_in=load_in)
    assert "quantized" in str(bake_blockers(quant.model))
    arch, qarch = anatomy_of(plain.model), anatomy_of(quant.model)
    # The weights hooks read are dequantized, close to the full-precision ones.
    for w, qw in zip(arch.writers[1:], qarch.writers[1:], strict=True):
        dense = dense_weight(qw)
        assert dense.shape == w.weight().shape
        assert float((dense - w.weight()).abs().max()) < 0.15 * float(w.weight().abs().max())
    tok = plain.tokenizer
    enc = tok(
        format_chat(tok, PROMPTS), return_tensors="pt", padding=True, add_special_tokens=False
    )
    for mode in ("plain", "norm_preserving"):
        edit = Ablation(direction(arch.d_model), 1.0, (1.0,) * 4, (1.0,) * 4, mode=mode)
        d = edit.direction.vector
        with edit_hooks(quant.model, edit), torch.no_grad():
            states = quant.model(**enc, output_hidden_states=True).hidden_states[:-1]
        for h in states:  # every residual state has no component along d
            assert float((h.float() @ d).abs().max() / h.float().norm(dim=-1).max()) < 1e-4
    with pytest.raises(UnsupportedArchitectureError, match="quantized"):
        bake(quant.model, edit)


@bnb
def test_run_with_quantized_measurement_exports_full_precision(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    report = _run(tiny_model_dir, tmp_path / "q", device="cpu", load_in="4bit")
    assert "quantized" in report["measured_on"]
    env = json.loads((tmp_path / "q/environment.json").read_text())
    assert env["quantization"]["load_in_4bit"] is True
    # The exported weights are the full-precision weights with the chosen edit baked in:
    # no quantization error is exported.
    edit = load_edit(tmp_path / "q")
    reference = load_model(str(tiny_model_dir), device="cpu").model
    bake(reference, edit)
    exported = load_model(str(tmp_path / "q/model"), device="cpu").model
    for (name, a), (_, b) in zip(
        reference.state_dict().items(), exported.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert report["checks"]["export_reload_max_abs_diff"] == 0.0
    assert not (tmp_path / "q/model/config.json").read_text().count("quantization_config")
