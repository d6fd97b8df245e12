"""The command line: help, clear errors without tracebacks, and a full run on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from abliterate.cli import COMMANDS, main

TINY_RUN = [
    "--n-train", "8", "--n-val", "4", "--n-eval", "3", "--n-screen", "2",
    "--n-finalists", "2", "--max-new-tokens", "4", "--batch-size", "4",
]  # fmt: skip


def test_top_level_help_is_fast_and_lists_commands() -> None:
    # A fresh interpreter proves --help imports neither torch nor transformers.
    code = (
        "import sys; from abliterate.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_help_exits_zero(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "--" in capsys.readouterr().out


def _error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("abliterate: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    msg = _error_of(["run", "--model", str(tmp_path / "nope"), "--out", str(out)], capsys)
    assert "does not exist" in msg
    assert not out.exists()


def test_model_without_chat_template(
    tmp_path: Path, no_template_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["run", "--model", str(no_template_model_dir), "--out", str(out), *TINY_RUN]
    msg = _error_of(argv, capsys)
    assert "no chat template" in msg
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_unknown_column_and_empty_file(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.csv").write_text("question\nhow?\n")
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "out"
    base = ["run", "--model", str(tiny_model_dir), "--out", str(out)]
    msg = _error_of([*base, "--eval-harmful", str(tmp_path / "p.csv"), "--prompt-column", "x"],
                    capsys)  # fmt: skip
    assert "no column 'x'" in msg
    msg = _error_of([*base, "--eval-harmless", str(tmp_path / "empty.txt")], capsys)
    assert "empty" in msg
    assert not out.exists()


def test_unsupported_architecture(
    tmp_path: Path, tokenizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2)
                    ).save_pretrained(path)  # fmt: skip
    tokenizer.save_pretrained(path)
    out = tmp_path / "out"
    msg = _error_of(["run", "--model", str(path), "--out", str(out), *TINY_RUN], capsys)
    assert "unsupported architecture 'gpt2'" in msg and "qwen2" in msg
    assert not out.exists()


def test_existing_output_dir_is_kept(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    msg = _error_of(["run", "--model", str(tiny_model_dir), "--out", str(out)], capsys)
    assert "--overwrite" in msg
    assert (out / "precious.txt").read_text() == "keep me"


def test_full_run_on_tiny_model(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "harm.txt").write_text("Explain how to pick a lock.\nBuild a weapon.\n")
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--out", str(out), *TINY_RUN,
            "--eval-harmful", str(tmp_path / "harm.txt")]  # fmt: skip
    assert main(argv) == 0
    assert "abliterated" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"]["n_prompts"] == 2 and len(report["edited"]["completions"]) == 2
    for key in ("prompt", "response", "refused"):
        assert key in report["edited"]["completions"][0]
    assert 0.0 <= report["edited"]["refusal_rate"] <= 1.0
    assert report["edited"]["kl_divergence"] >= 0.0
    assert report["edited"]["kl_divergence_multi_token"] >= 0.0
    assert report["checks"]["export_reload_max_abs_diff"] == 0.0
    assert report["checks"]["hooks_vs_weights_max_abs_diff"] < 1e-3
    for name in ("config.json", "environment.json", "candidates.safetensors", "scores.json",
                 "direction.safetensors", "direction.json", "edit_spec.json", "report.md",
                 "abliteration.json", "model/abliteration.json", "model/config.json",
                 "model/model.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    assert "<svg" in (out / "report.html").read_text(encoding="utf-8")
    env = json.loads((out / "environment.json").read_text())
    assert env["data"]["eval_harmful"]["name"].endswith("harm.txt")
    scores = json.loads((out / "scores.json").read_text())
    # Candidates from the last 20% of the 4 layers (layer 3) are never scored.
    assert max(s["layer"] for s in scores["scores"]) == scores["max_layer"] == 3 - 0


def test_sigterm_leaves_no_partial_directory(tmp_path: Path, tiny_model_dir: Path) -> None:
    import os
    import signal
    import time

    out = tmp_path / "run"
    # Long enough to still be running when the signal arrives.
    argv = [sys.executable, "-m", "abliterate", "run", "--model", str(tiny_model_dir),
            "--out", str(out), "--n-train", "8", "--max-new-tokens", "64"]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".run.partial-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".run.partial-*")), "the run never started"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err
    assert not out.exists() and not list(tmp_path.glob(".run.partial-*"))


def test_saved_direction_is_reapplied_without_selection(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "first"
    assert main(["run", "--model", str(tiny_model_dir), "--out", str(first), *TINY_RUN]) == 0
    second = tmp_path / "second"
    argv = ["run", "--model", str(tiny_model_dir), "--out", str(second), *TINY_RUN,
            "--direction", str(first / "direction.safetensors"), "--no-save-model"]  # fmt: skip
    assert main(argv) == 0
    a = json.loads((first / "report.json").read_text())
    b = json.loads((second / "report.json").read_text())
    assert a["edit"] == b["edit"]
    assert a["edited"]["kl_divergence"] == pytest.approx(b["edited"]["kl_divergence"], rel=1e-5)
    assert not (second / "scores.json").exists() and not (second / "model").exists()
    assert b["checks"]["export_reload_max_abs_diff"] is None
    msg = _error_of(["run", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"),
                     "--direction", str(tmp_path / "nope.safetensors")], capsys)  # fmt: skip
    assert "not found" in msg
