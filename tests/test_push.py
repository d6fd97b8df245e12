"""Hub upload with a model card, checked offline: the card carries the run's numbers and the
command that reproduces it, and the planned commit holds every file with its SHA-256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from report_samples import sample_report

from abliterate.cli import main
from abliterate.commands.push import operations, plan_upload, upload
from abliterate.config import RunConfig, to_dict
from abliterate.edit.card import reproduce_command
from abliterate.report.schema import Report


def _run_dir(tmp_path: Path, *, model: bool = True, evaluated: bool = False) -> Path:
    run = tmp_path / "run"
    (run / "gguf").mkdir(parents=True)
    report = sample_report(evaluated=evaluated)
    report["command"] = "run"
    report["checks"]["exports"] = [
        {"format": "gguf:q8_0", "path": "gguf/model-Q8_0.gguf", "size_bytes": 12,
         "sha256": "00" * 32, "max_abs_logit": 0.21, "mean_kl": 0.0004},
    ]  # fmt: skip
    (run / "report.json").write_text(Report.model_validate(report).to_json())
    config = to_dict(RunConfig(n_train=64, export=("gguf:q8_0",), out=Path("runs/x")))
    (run / "config.json").write_text(json.dumps(config))
    (run / "abliteration.json").write_text(json.dumps({"abliterate_version": "0.1.0"}))
    (run / "gguf" / "model-Q8_0.gguf").write_bytes(b"GGUF gguf...")
    if model:
        (run / "model").mkdir()
        (run / "model" / "model.safetensors").write_bytes(b"weights")
        (run / "model" / "config.json").write_text("{}")
        (run / "model" / "abliteration.json").write_text("{}")
    else:
        (run / "adapter").mkdir()
        (run / "adapter" / "adapter_model.safetensors").write_bytes(b"lora")
        (run / "adapter" / "adapter_config.json").write_text("{}")
    return run


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_card_carries_the_measured_numbers(tmp_path: Path) -> None:
    plan = plan_upload(_run_dir(tmp_path), "org/qwen-abliterated")
    card = plan.generated["README.md"]
    assert card.startswith('---\nbase_model: "Qwen2.5-Coder-0.5B-Instruct <demo>"')
    assert "library_name: transformers" in card and "- gguf" in card
    # refusals before/after with the judge named, KL, the export check, the command.
    assert "| refusal rate | 87.5% (21/24) | 16.7% (4/24) |" in card
    assert "judged by `markers`" in card
    assert "| first-token KL (harmless prompts) | – | 0.0321 |" in card
    assert "| multi-token KL (16 tokens) | – | 0.0874 |" in card
    assert "| gguf:q8_0 | `gguf/model-Q8_0.gguf` | 12 B | 0.21 | 0.0004 |" in card
    assert "abliterate run --n-train 64 --out runs/x --export gguf:q8_0" in card
    assert 'layer 12, site "pre"' in card and "automatic selection" in card
    assert f"| `model.safetensors` | `{_sha(b'weights')}` |" in card
    assert "llama-cli -hf org/qwen-abliterated --hf-file gguf/model-Q8_0.gguf" in card


def test_card_lists_benchmarks(tmp_path: Path) -> None:
    card = plan_upload(_run_dir(tmp_path, evaluated=True), "org/x").generated["README.md"]
    assert "| abliterate_arithmetic (acc) |" in card


def test_planned_commit_holds_every_file_with_its_hash(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    plan = plan_upload(run, "org/x")
    ops = operations(plan)
    paths = [op.path_in_repo for op in ops]
    assert paths == ["config.json", "gguf/model-Q8_0.gguf", "model.safetensors",
                     "README.md", "abliteration.json"]  # fmt: skip
    record = json.loads(plan.generated["abliteration.json"])
    assert record["files"] == {"gguf/model-Q8_0.gguf": _sha(b"GGUF gguf..."),
                               "model.safetensors": _sha(b"weights")}  # fmt: skip
    assert record["abliterate_version"] == "0.1.0"
    assert not json.loads((run / "abliteration.json").read_text()).get("files")  # input untouched


def test_adapter_only_run_uploads_the_adapter_at_the_root(tmp_path: Path) -> None:
    plan = plan_upload(_run_dir(tmp_path, model=False), "org/x")
    assert plan.is_adapter and "adapter_config.json" in plan.files
    card = plan.generated["README.md"]
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card


class FakeApi:
    """Records the calls huggingface_hub's HfApi would receive."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def create_repo(self, repo: str, **kwargs: Any) -> None:
        self.calls.append(("create_repo", (repo, kwargs)))

    def create_commit(self, repo: str, ops: list, **kwargs: Any) -> Any:
        self.calls.append(("create_commit", (repo, [op.path_in_repo for op in ops], kwargs)))
        return type("Info", (), {"commit_url": f"https://hub/{repo}/commit/1"})()


def test_upload_creates_the_repo_and_one_commit(tmp_path: Path) -> None:
    api = FakeApi()
    url = upload(plan_upload(_run_dir(tmp_path), "org/x"), private=True, api=api)
    assert url == "https://hub/org/x/commit/1"
    (name, (repo, kwargs)), (name2, (repo2, paths, _)) = api.calls
    assert (name, repo, kwargs["private"], kwargs["exist_ok"]) == (
        "create_repo",
        "org/x",
        True,
        True,
    )
    assert name2 == "create_commit" and repo2 == "org/x" and "README.md" in paths


def test_push_command_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_dir(tmp_path)
    assert main(["push", str(run), "org/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Upload to org/x (model):" in out and "| refusal rate |" in out
    assert main(["push", str(run), "not-a-repo"]) == 2
    assert "ORG/NAME" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "org/x", "--dry-run"]) == 2


def test_reproduce_command_lists_non_defaults() -> None:
    config = to_dict(RunConfig(model="m.gguf", sites=("pre", "mid"), save_model=False))
    assert reproduce_command(config, "run") == (
        "abliterate run --model m.gguf --sites pre mid --no-save-model"
    )


def test_failed_upload_is_one_line(tmp_path: Path) -> None:
    from abliterate.errors import HubError

    class Offline(FakeApi):
        def create_repo(self, repo: str, **kwargs: Any) -> None:
            raise ConnectionError("Name or service not known")

    with pytest.raises(HubError, match="retry with: abliterate push RUN org/x"):
        upload(plan_upload(_run_dir(tmp_path), "org/x"), api=Offline())


def test_run_exports_and_pushes(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run --export gguf:q8_0,lora --push-to-hub: the exports are written and checked, their
    hashes recorded, and the upload (stubbed here) carries the card. lora-gguf is refused before
    any evaluation: the tiny model ties its head to the edited embedding."""
    import abliterate.commands.run as run_module

    uploaded: list[Any] = []
    monkeypatch.setattr(run_module, "upload", lambda plan: uploaded.append(plan) or "url")
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--out", str(out), "--n-train", "8",
            "--n-eval", "3", "--max-new-tokens", "4", "--batch-size", "4", "--layer", "1",
            "--export", "gguf:q8_0", "lora", "--push-to-hub", "org/tiny"]  # fmt: skip
    assert main([*argv[:-4], "lora-gguf"]) == 2 and not out.exists()
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    exports = {e["format"]: e for e in report["checks"]["exports"]}
    assert set(exports) == {"gguf:q8_0", "lora"}
    assert exports["gguf:q8_0"]["max_abs_logit"] < 1.0 and exports["lora"]["note"] == "rank 1"
    record = json.loads((out / "abliteration.json").read_text())
    for path in ("gguf/model-Q8_0.gguf", "adapter/adapter_model.safetensors",
                 "model/model.safetensors"):  # fmt: skip
        assert record["files"][path] == _sha((out / path).read_bytes()), path
    assert json.loads((out / "model" / "abliteration.json").read_text())["files"] == record["files"]
    (plan,) = uploaded
    assert plan.repo == "org/tiny" and "adapter/adapter_config.json" in plan.files
    assert "| gguf:q8_0 | `gguf/model-Q8_0.gguf` |" in plan.generated["README.md"]
