"""``run --stream``: a whole run on a model that is not loaded (layer-streamed measurement,
streaming export, evaluation with weights offloaded to disk) agrees with the in-memory run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from abliterate.commands import streamed
from abliterate.commands.run import run
from abliterate.config import RunConfig
from abliterate.core.directions import Direction
from abliterate.errors import ConfigError
from abliterate.files import file_sha256

TINY = dict(n_train=8, n_val=4, n_eval=3, n_screen=2, n_finalists=2, max_new_tokens=4,
            batch_size=4, kl_tokens=3, n_examples=1)  # fmt: skip


@pytest.fixture
def small_memory(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """Pretend the machine has 400 KB available: the tiny model (~700 KB) does not fit, and an
    offloaded model keeps its embedding and two layers' room in memory, the rest on disk.
    Returns the device maps of the models loaded offloaded, as they are loaded."""
    from abliterate.commands import outcome
    from abliterate.commands import run as run_module

    monkeypatch.setattr(streamed, "available_memory", lambda: 400 * 1024)
    maps: list[dict[str, str]] = []

    def load(*args: Any, **kwargs: Any) -> Any:
        loaded = streamed.load_offloaded(*args, **kwargs)
        maps.append(dict(loaded.model.hf_device_map))
        return loaded

    monkeypatch.setattr(run_module, "load_offloaded", load)  # the original
    monkeypatch.setattr(outcome, "load_offloaded", load)  # the edited model
    return maps


def test_auto_streams_only_what_does_not_fit(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = RunConfig(model=str(tiny_model_dir))
    monkeypatch.setattr(streamed, "available_memory", lambda: 2**40)
    assert streamed.stream_source(config) is None
    monkeypatch.setattr(streamed, "available_memory", lambda: 400 * 1024)
    assert streamed.stream_source(config) == tiny_model_dir
    assert streamed.stream_source(RunConfig(model=str(tiny_model_dir), stream="off")) is None
    assert streamed.stream_source(RunConfig(model="org/name")) is None  # not local: loaded
    with pytest.raises(ConfigError, match="--stream on needs a local safetensors checkpoint"):
        streamed.stream_source(RunConfig(model="org/name", stream="on"))


def test_streamed_run_agrees_with_the_in_memory_run(
    tiny_model_dir: Path, tmp_path: Path, small_memory: list[dict[str, str]]
) -> None:
    report = run(RunConfig(model=str(tiny_model_dir), out=tmp_path / "s", stream="on", **TINY))
    # Both evaluated models (original and exported) were partly offloaded to disk.
    assert len(small_memory) == 2
    for device_map in small_memory:
        assert "disk" in device_map.values() and device_map["model.embed_tokens"] == "cpu"
    checks = report["checks"]
    assert checks["hooks_vs_weights_max_abs_diff"] < 1e-4
    assert checks["edited_writers"]["n_tensors"] == 9
    out = tmp_path / "s"
    record = json.loads((out / "model" / "abliteration.json").read_text())
    assert record == json.loads((out / "abliteration.json").read_text())
    weights = sorted(f"model/{p.name}" for p in (out / "model").glob("*.safetensors"))
    assert sorted(record["files"]) == weights
    assert all(record["files"][n] == file_sha256(out / n) for n in weights)
    assert not (out / ".offload").exists()
    assert {"activations", "selection", "export", "edited eval"} <= set(report["timings"])

    reference = run(RunConfig(model=str(tiny_model_dir), out=tmp_path / "m", stream="off", **TINY))
    assert (report["selection"]["layer"], report["selection"]["site"]) == (
        reference["selection"]["layer"], reference["selection"]["site"])  # fmt: skip
    a, b = (Direction.load(tmp_path / d / "direction") for d in ("s", "m"))
    assert float(a.vector @ b.vector) > 1 - 1e-6
    for key in ("refusal_rate", "kl_divergence"):
        assert report["edited"][key] == pytest.approx(reference["edited"][key], abs=1e-3)


def test_streamed_optimize_scores_and_confirms_layer_by_layer(
    tiny_model_dir: Path, tmp_path: Path, small_memory: list[dict[str, str]]
) -> None:
    options = dict(stream="on", optimize=True, trials=3, max_confirm=1, confirm_tokens=3)
    config = RunConfig(model=str(tiny_model_dir), out=tmp_path / "o", save_model=False,
                       **options, **TINY)  # type: ignore[arg-type]  # fmt: skip
    report = run(config)
    optimization = report["optimization"]
    assert len(optimization["trials"]) == 3
    assert optimization["search_dtype"] == "float32"
    assert optimization["chosen"]["confirmed_refusal_rate"] is not None
    assert not (tmp_path / "o" / "model").exists()
    assert torch.isfinite(torch.tensor(report["edited"]["kl_divergence"]))


def test_stream_on_a_hub_id_is_a_one_line_error(tmp_path: Path, capsys: Any) -> None:
    from abliterate.cli import main

    assert main(["run", "--model", "org/name", "--stream", "on", "--out", str(tmp_path)]) == 2
    assert "--stream on needs a local safetensors checkpoint" in capsys.readouterr().err
