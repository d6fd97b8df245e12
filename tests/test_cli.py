"""The command line: help, clear errors without tracebacks, and a full run on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cli_errors import one_error
from pydantic_core import PydanticUndefined

from abliterate import __version__
from abliterate.cli import COMMANDS, main, parse_command
from abliterate.config import RunConfig, option_name

TINY_RUN = [
    "--n-train", "8", "--n-val", "4", "--n-eval", "3", "--n-screen", "2",
    "--n-finalists", "2", "--max-new-tokens", "4", "--batch-size", "4",
]  # fmt: skip


def test_help_of_every_command_imports_neither_torch_nor_transformers() -> None:
    # A fresh interpreter proves that --help (top level and per command) stays light.
    code = textwrap.dedent(
        """
        import contextlib, io, sys
        from abliterate.cli import COMMANDS, main
        for argv in [["--help"]] + [[name, "--help"] for name in COMMANDS]:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    main(argv)
                except SystemExit as e:
                    assert e.code == 0, argv
            assert "usage: abliterate" in out.getvalue(), argv
            print(out.getvalue())
        heavy = [m for m in ("torch", "transformers", "optuna") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name, command in COMMANDS.items():
        assert name in out.stdout and command.help.split()[0] in out.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_help_lists_every_option_with_help_and_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    # Compare without whitespace: argparse wraps (and breaks at hyphens) as it likes.
    out = "".join(capsys.readouterr().out.split())
    model = COMMANDS[command].config
    for name, field in model.model_fields.items():
        assert option_name(model, name) in out, name
        assert "".join(str(field.description).split()) in out, name
        if field.default not in (None, PydanticUndefined):
            assert "".join(f"(default: {field.default})".split()) in out, name
    for flag in ("--config", "--verbose", "-v", "ABLITERATE_<OPTION>"):
        assert flag in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"abliterate {__version__}\n"


# Today's spellings, as the README and scripts use them, and what they resolve to.
SPELLINGS = [
    (
        ["run", *TINY_RUN, "--kl-threshold", "0.05", "--out", "o", "--overwrite"],
        {
            "n_train": 8,
            "n_val": 4,
            "n_eval": 3,
            "n_screen": 2,
            "n_finalists": 2,
            "max_new_tokens": 4,
            "batch_size": 4,
            "kl_threshold": 0.05,
            "out": Path("o"),
            "overwrite": True,
        },
    ),
    (
        ["run", "--no-save-model", "--trust-remote-code", "--sites", "pre", "mid"],
        {"save_model": False, "trust_remote_code": True, "sites": ("pre", "mid")},
    ),
    (
        ["run", "--sites", "pre,mid", "--no-overwrite", "--seed", "3"],
        {"sites": ("pre", "mid"), "overwrite": False, "seed": 3},
    ),
    (
        ["run", "--model", "model.gguf", "--layer", "14", "--site", "pre"],
        {"model": "model.gguf", "layer": 14, "site": "pre"},
    ),
    (
        [
            "run",
            "--optimize",
            "--trials",
            "3",
            "--strength",
            "0.5",
            "--direction",
            "d.safetensors",
            "--no-optimize",
        ],
        {"optimize": False, "trials": 3, "direction": Path("d.safetensors")},
    ),
    (
        [
            "optimize",
            "--trial",
            "17",
            "--max-directions",
            "3",
            "--storage",
            "sqlite:///s.db",
            "--study-name",
            "q",
            "--refusal-target",
            "0.1",
            "--search-dtype",
            "model",
        ],
        {
            "optimize": True,
            "trial": 17,
            "max_directions": 3,
            "storage": "sqlite:///s.db",
            "study_name": "q",
            "refusal_target": 0.1,
            "search_dtype": "model",
        },
    ),
    (
        [
            "evaluate",
            "runs/demo/model",
            "--baseline",
            "demo",
            "--judge",
            "markers,classifier:./c,llm:demo",
            "--benchmarks",
            "a,b",
            "--n-eval",
            "2",
        ],
        {
            "model": "runs/demo/model",
            "baseline": "demo",
            "judge": "markers,classifier:./c,llm:demo",
            "benchmarks": ("a", "b"),
            "n_eval": 2,
        },
    ),
    (
        ["evaluate", "--benchmarks", "a", "b,c", "--benchmark-limit", "5"],
        {"model": "demo", "benchmarks": ("a", "b", "c"), "benchmark_limit": 5},
    ),
    (
        [
            "chat",
            "runs/demo/model",
            "--baseline",
            "demo",
            "--system-prompt",
            "Be brief.",
            "--max-new-tokens",
            "128",
            "--temperature",
            "0.7",
        ],
        {
            "model": "runs/demo/model",
            "system_prompt": "Be brief.",
            "max_new_tokens": 128,
            "temperature": 0.7,
        },
    ),
    (["report", "runs/demo"], {"run": Path("runs/demo")}),
]


@pytest.mark.parametrize(("argv", "expected"), SPELLINGS, ids=lambda v: str(v)[:40])
def test_todays_spellings_still_parse(argv: list[str], expected: dict[str, Any]) -> None:
    invocation = parse_command(argv, environ={})
    assert invocation.command == argv[0] and not invocation.verbose
    assert {k: getattr(invocation.config, k) for k in expected} == expected
    assert parse_command([*argv, "-v"], environ={}).verbose
    assert parse_command([*argv, "--verbose"], environ={}).verbose


def test_config_file_environment_and_flags_layer_through_the_cli(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('n_train = 5\nn_val = 5\nmodel = "from-file"\nsites = ["mid"]\n')
    env = {"ABLITERATE_N_TRAIN": "6", "ABLITERATE_N_VAL": "6", "ABLITERATE_N_SCREEN": "6"}
    argv = ["run", "--config", str(cfg), "--n-train", "7"]
    config = parse_command(argv, environ=env).config
    assert isinstance(config, RunConfig)
    assert (config.n_train, config.n_val, config.n_screen) == (7, 6, 6)
    assert (config.model, config.sites, config.n_finalists) == ("from-file", ("mid",), 8)
    assert parse_command(argv, environ=None).config.n_val == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["run", "--strength", "nan"],
            "--strength (command line) must be a finite number, got 'nan'",
        ),
        (
            ["run", "--strength", "inf"],
            "--strength (command line) must be a finite number, got 'inf'",
        ),
        (
            ["run", "--strength=-inf"],
            "--strength (command line) must be a finite number, got '-inf'",
        ),
        (
            ["run", "--kl-threshold", "nan"],
            "--kl-threshold (command line) must be a finite number, got 'nan'",
        ),
        (
            ["chat", "m", "--temperature", "nan"],
            "--temperature (command line) must be a finite number, got 'nan'",
        ),
        (
            ["optimize", "--refusal-target", "1.5"],
            "--refusal-target (command line) must be at most 1.0, got '1.5'",
        ),
        (["run", "--n-train", "0"], "--n-train (command line) must be at least 1, got '0'"),
        (["run", "--batch-size", "-2"], "--batch-size (command line) must be at least 1, got '-2'"),
        (["evaluate", "--n-eval", "0"], "--n-eval (command line) must be at least 1, got '0'"),
        (["run", "--n-train", "3.5"], "--n-train (command line) must be an integer, got '3.5'"),
        (
            ["run", "--sites", "pre", "nowhere"],
            "--sites (command line) must be one of 'pre', 'mid' or 'post', got 'nowhere'",
        ),
        (["run", "--sites"], "--sites (command line) must not be empty"),
        (["run", "--n-trian", "5"], "unrecognized arguments: --n-trian 5; did you mean --n-train?"),
        (["run", "--trust"], "unrecognized arguments: --trust; did you mean --trust-remote-code?"),
        (
            ["run", "--layer", "3", "--optimize"],
            "--layer fixes the direction; it cannot be combined with --optimize.",
        ),
        (
            ["run", "--trial", "2"],
            "--trial picks a trial of an optimization study; add --optimize.",
        ),
        (
            ["run", "--direction", "d", "--layer", "2"],
            "pass either --direction or --layer, not both.",
        ),
        (["chat"], "the following arguments are required: MODEL"),
        (["bogus"], f"argument {{{','.join(COMMANDS)}}}: invalid choice: 'bogus'"),
        ([], f"choose a command: {', '.join(COMMANDS)} (abliterate --help"),
    ],
)
def test_bad_command_lines_end_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert one_error(argv, capsys).startswith(f"abliterate: error: {message}")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "run.toml",
            'trust_remote_code = "false"',
            "--trust-remote-code (config file {}) must be true or false, got 'false'",
        ),
        (
            "run.toml",
            'trust_remote_code = "no"',
            "--trust-remote-code (config file {}) must be true or false, got 'no'",
        ),
        (
            "run.json",
            '{"overwrite": "false"}',
            "--overwrite (config file {}) must be true or false, got 'false'",
        ),
        ("run.toml", "n_train = 3.5", "--n-train (config file {}) must be an integer, got 3.5"),
        ("run.toml", 'strength = "x"', "--strength (config file {}) must be a number, got 'x'"),
        (
            "run.toml",
            "n_trian = 3",
            "unknown option 'n_trian' in config file {}; did you mean 'n_train'?",
        ),
    ],
)
def test_bad_config_file_is_refused_before_anything_is_touched(
    tmp_path: Path, name: str, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before, "false" was truthy: remote code ran, and --overwrite deleted an existing directory.
    cfg = tmp_path / name
    cfg.write_text(text)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    msg = one_error(["run", "--config", str(cfg), "--out", str(out)], capsys)
    assert msg == f"abliterate: error: {message.format(cfg)}"
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_environment_value_ends_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ABLITERATE_N_TRAIN", "many")
    msg = one_error(["run"], capsys)
    assert msg == (
        "abliterate: error: --n-train (environment variable ABLITERATE_N_TRAIN) must be an "
        "integer, got 'many'"
    )


def test_missing_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    msg = one_error(["run", "--model", str(tmp_path / "nope"), "--out", str(out)], capsys)
    assert "does not exist" in msg
    assert not out.exists()


def test_model_without_chat_template(
    tmp_path: Path, no_template_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["run", "--model", str(no_template_model_dir), "--out", str(out), *TINY_RUN]
    msg = one_error(argv, capsys)
    assert "no chat template" in msg
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_unknown_column_and_empty_file(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.csv").write_text("question\nhow?\n")
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "out"
    base = ["run", "--model", str(tiny_model_dir), "--out", str(out)]
    msg = one_error([*base, "--eval-harmful", str(tmp_path / "p.csv"), "--prompt-column", "x"],
                    capsys)  # fmt: skip
    assert "no column 'x'" in msg
    msg = one_error([*base, "--eval-harmless", str(tmp_path / "empty.txt")], capsys)
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
    msg = one_error(["run", "--model", str(path), "--out", str(out), *TINY_RUN], capsys)
    assert "unsupported architecture 'gpt2'" in msg and "qwen2" in msg
    assert not out.exists()


def test_existing_output_dir_is_kept(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    msg = one_error(["run", "--model", str(tiny_model_dir), "--out", str(out)], capsys)
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
    msg = one_error(["run", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"),
                     "--direction", str(tmp_path / "nope.safetensors")], capsys)  # fmt: skip
    assert "not found" in msg
