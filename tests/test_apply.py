"""``abliterate apply``: every form of --direction, the options, the record it writes, and
one-line errors that leave nothing behind."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from abliterate.cli import main
from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.edit.weights import bake
from abliterate.files import file_sha256


@pytest.fixture
def source(make_model: Callable[[str], Any], tokenizer: Any, tmp_path: Path) -> Path:
    """A sharded tiny Qwen2 chat model (tied head) with its tokenizer."""
    path = tmp_path / "src"
    make_model("qwen2").save_pretrained(path, max_shard_size="40KB")
    tokenizer.save_pretrained(path)
    return path


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def _check_equal_to_baked(out: Path, edit: Ablation, make_model: Callable[[str], Any]) -> None:
    from transformers import AutoModelForCausalLM

    model = make_model("qwen2")
    bake(model, edit)
    edited = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(3, 40).view(1, -1)
    assert torch.equal(_logits(model, ids), _logits(edited, ids))


def test_apply_a_saved_direction(
    source: Path, make_model: Callable[[str], Any], tmp_path: Path, capsys: Any
) -> None:
    direction = Direction(torch.randn(64), layer=2, site="pre").normalized()
    direction.save(tmp_path / "run" / "direction")
    out = tmp_path / "out"
    args = ["apply", "--direction", str(tmp_path / "run" / "direction.safetensors"),
            "--model", str(source), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "Edited 9 tensors" in capsys.readouterr().out  # embedding + 4 × (attention, MLP)
    _check_equal_to_baked(out, Ablation.uniform(direction, 4), make_model)
    record = json.loads((out / "abliteration.json").read_text())
    assert record["edit"]["kind"] == "directional_ablation"
    assert record["edit_source"]["kind"] == "direction"
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(record["weight_files"]) == weights
    assert all(record["weight_files"][n] == file_sha256(out / n) for n in weights)
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_apply_an_edit_saved_by_a_run(
    source: Path, make_model: Callable[[str], Any], tmp_path: Path
) -> None:
    edit = Ablation(
        direction=Direction(torch.randn(64)).normalized(), embedding=0.0,
        attention=(1.0, 0.5, 0.0, 1.0), mlp=(0.0, 1.0, 1.0, 0.25), mode="norm_preserving",
    )  # fmt: skip
    edit.save(tmp_path / "run")
    for given in (tmp_path / "run", tmp_path / "run" / "edit_spec.json"):
        out = tmp_path / f"out-{given.name}"
        assert main(["apply", "--direction", str(given), "--model", str(source),
                     "--out", str(out)]) == 0  # fmt: skip
        _check_equal_to_baked(out, edit, make_model)
        record = json.loads((out / "abliteration.json").read_text())
        assert record["edit_source"]["kind"] == "edit"
        # The embedding was not edited, so the tied head stays tied.
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_apply_a_npy_vector_to_chosen_writers(
    source: Path, make_model: Callable[[str], Any], tmp_path: Path
) -> None:
    vector = np.random.default_rng(0).normal(size=64) * 7.0  # any length: it is normalised
    np.save(tmp_path / "v.npy", vector)
    out = tmp_path / "out"
    args = ["apply", "--direction", str(tmp_path / "v.npy"), "--model", str(source),
            "--out", str(out), "--writers", "attention,embedding", "--strength", "0.5"]  # fmt: skip
    assert main(args) == 0
    direction = Direction(torch.from_numpy(vector.astype(np.float32))).normalized()
    edit = Ablation(direction=direction, embedding=0.5, attention=(0.5,) * 4, mlp=(0.0,) * 4)
    _check_equal_to_baked(out, edit, make_model)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--strength", "0.5"], "--strength applies to a direction"),
        (["--writers", "mlp"], "--writers applies to a direction"),
    ],
)
def test_options_of_a_direction_are_refused_with_a_saved_edit(
    source: Path, tmp_path: Path, capsys: Any, extra: list[str], message: str
) -> None:
    Ablation.uniform(Direction(torch.randn(64)).normalized(), 4).save(tmp_path / "run")
    out = tmp_path / "out"
    args = ["apply", "--direction", str(tmp_path / "run"), "--model", str(source),
            "--out", str(out), *extra]  # fmt: skip
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_errors_are_one_line_and_write_nothing(source: Path, tmp_path: Path, capsys: Any) -> None:
    np.save(tmp_path / "short.npy", np.ones(32))
    np.save(tmp_path / "matrix.npy", np.ones((2, 64)))
    cases = [
        (["--direction", str(tmp_path / "short.npy")], "d_model=32 but the model has 64"),
        (["--direction", str(tmp_path / "matrix.npy")], "must hold one numeric vector"),
        (["--direction", str(tmp_path / "missing")], "expected a direction saved by the tool"),
        (["--direction", str(tmp_path / "short.npy"), "--writers", "lm_head"],
         "--writers (command line) must name writers among embedding, attention, mlp"),
    ]  # fmt: skip
    for extra, message in cases:
        out = tmp_path / "out"
        assert main(["apply", "--model", str(source), "--out", str(out), *extra]) == 2
        errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("abliterate")]
        assert len(errors) == 1 and message in errors[0], errors
        assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    np.save(tmp_path / "v.npy", np.ones(64))
    missing = ["apply", "--direction", str(tmp_path / "v.npy"), "--out", str(tmp_path / "o")]
    assert main([*missing, "--model", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
