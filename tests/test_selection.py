"""Selection rules and model-loading errors that need no real model."""

from __future__ import annotations

from pathlib import Path

import pytest

from abliterate.errors import ModelLoadError
from abliterate.model.loading import load_model
from abliterate.search.selection import CandidateScore, _best_tradeoff, max_candidate_layer


def test_last_fifth_of_layers_is_pruned() -> None:
    assert max_candidate_layer(24, 0.2) == 19  # layers 0..19 kept, 20..23 discarded
    assert max_candidate_layer(4, 0.2) == 3
    assert max_candidate_layer(10, 0.0) == 9


def test_best_tradeoff_is_closest_to_the_ideal_point() -> None:
    finalists = [
        CandidateScore(1, "pre", 0, 0, refusal=-5.0, kl=2.0),  # fewest refusals, huge KL
        CandidateScore(2, "pre", 0, 0, refusal=-4.5, kl=0.3),  # nearly as good, low KL
        CandidateScore(3, "pre", 0, 0, refusal=1.0, kl=0.2),  # lowest KL, still refusing
    ]
    assert _best_tradeoff(finalists).layer == 2


def test_hub_id_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # The environment variable is read at import time, so patch the constant it set.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model", device="cpu")


def test_directory_without_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelLoadError, match="GGUF file"):
        load_model(str(tmp_path / "missing.gguf"), device="cpu")


def test_run_directory_is_not_a_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.json").write_text('{"model": "demo", "dtype": "auto"}')  # a run's settings
    (run / "candidates.safetensors").write_bytes(b"")
    (run / "model" / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(ModelLoadError, match=r"run directory: its model is .*model"):
        load_model(str(run), device="cpu")
    (run / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not readable JSON"):
        load_model(str(run), device="cpu")
