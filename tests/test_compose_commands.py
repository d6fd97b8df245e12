"""``steer``, ``detox``, ``evaluate --steer`` and ``chat --steer`` end to end on a tiny model, and
the SafeEdit-style generalization inputs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from abliterate.cli import main
from abliterate.config import ChatConfig, DetoxConfig, SteerConfig
from abliterate.core.ablation import Ablation
from abliterate.core.delta import WeightDelta
from abliterate.core.directions import Direction, DirectionSet
from abliterate.core.edits import Composite, load_edit
from abliterate.core.steering import Steering
from abliterate.data.detox import DetoxInstance, InstanceSet
from abliterate.data.prompts import PromptSet
from abliterate.edit.control_vector import read_control_vector
from abliterate.eval.safeedit import generalization_inputs
from abliterate.report.schema import load_report

SMALL = ["--n-eval", "2", "--max-new-tokens", "4", "--kl-tokens", "2", "--batch-size", "4"]


def direction_file(tmp_path: Path, d_model: int = 64, site: str = "post") -> Path:
    g = torch.Generator().manual_seed(0)
    dset = DirectionSet(torch.randn(4, d_model, generator=g), (0, 1, 2, 3), site=site)  # type: ignore[arg-type]
    return dset.save(tmp_path / "style.safetensors")


def test_steer_sweeps_evaluates_and_exports(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "steer"
    args = ["steer", "--model", str(tiny_model_dir), "--direction", str(direction_file(tmp_path)),
            "--strength", "2", "--layers", "1", "2", "--sweep", "0", "2", "--n-metric", "2",
            "--out", str(out), *SMALL]  # fmt: skip
    assert main(args) == 0
    report = load_report(out / "report.json")
    steering = report.steering
    assert steering is not None and steering.layers == [1, 2] and steering.metric == "length"
    assert [p.strength for p in steering.sweep] == [0.0, 2.0]
    for point in steering.sweep:  # the answers' repetitiveness beside the metric
        assert point.distinct_3 is None or 0 < point.distinct_3 <= 1
    markdown = (out / "report.md").read_text()
    assert "## Steering" in markdown and "| strength | length | distinct 3-grams |" in markdown
    assert report.checks is not None and report.checks.hooks_vs_weights_max_abs_diff < 1e-4
    assert report.edited.kl_divergence is not None and report.edited.kl_divergence > 0
    edit = load_edit(out)
    assert isinstance(edit, Steering) and edit.strength == 2.0
    _, vectors = read_control_vector(out / "control_vector.gguf")
    assert sorted(vectors) == [1, 2] and torch.equal(vectors[2], edit.vector_at(2))
    assert (out / "plots" / "steering_sweep.svg").is_file()
    assert steering.bake_refused is None and not (out / "model").exists()


def test_steer_refuses_to_export_what_the_config_cannot_hold(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "steer"
    path = direction_file(tmp_path)
    args = ["steer", "--model", str(tiny_model_dir), "--direction", str(path), "--layers", "1",
            "--save-model", "--metric", "refusal", "--out", str(out), *SMALL]  # fmt: skip
    assert main(args) == 0
    report = load_report(out / "report.json")
    assert report.steering is not None and "'qwen2' config cannot declare" in str(
        report.steering.bake_refused
    )
    assert not (out / "model").exists()


def test_steer_removal_and_a_prior_edit(tiny_model_dir: Path, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    Ablation.uniform(Direction(torch.randn(64, generator=g)).normalized(), 4).save(tmp_path / "a")
    out = tmp_path / "steer"
    args = ["steer", "--model", str(tiny_model_dir), "--direction", str(direction_file(tmp_path)),
            "--remove", "--edit", str(tmp_path / "a"), "--out", str(out), *SMALL]  # fmt: skip
    assert main(args) == 0
    edit = load_edit(out)
    assert isinstance(edit, Composite) and [e.kind for e in edit.edits] == [
        "directional_ablation", "directional_ablation"]  # fmt: skip
    assert not (out / "control_vector.gguf").exists()  # a removal is no control vector
    # The unsteered model carries the prior edit, which the baseline cache cannot know.
    assert load_report(out / "report.json").baseline_cache is None


def test_detox_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    Ablation.uniform(Direction(torch.randn(64, generator=g)).normalized(), 4).save(tmp_path / "a")
    out = tmp_path / "detox"
    args = ["detox", "--model", str(tiny_model_dir), "--edit", str(tmp_path / "a"),
            "--n-instances", "2", "--steps", "2", "--lr", "0.01", "--n-knowledge", "3",
            "--n-guard", "3", "--guard-tokens", "4", "--out", str(out), *SMALL]  # fmt: skip
    assert main(args) == 0
    report = load_report(out / "report.json")
    detox = report.detox
    assert detox is not None and len(detox.records) == 2 and detox.kl_to_original is not None
    assert all(len(r.nll) == 2 and len(r.distances) == 4 for r in detox.records)
    assert detox.guard_prompts == 3 and all(len(r.guard_kl) == 2 for r in detox.records)
    # By default neither the first nor the last of the 4 layers is where DINM tunes.
    assert all(r.layer in (1, 2) for r in detox.records)
    assert report.baseline is not None and report.baseline.safeedit is not None
    assert report.baseline_cache is None  # the model before detox carries --edit
    assert report.edited.safeedit is not None and report.edited.safeedit.n_instances == 2
    assert report.checks is not None and report.checks.export_reload_max_abs_diff is not None
    assert report.checks.export_reload_max_abs_diff < 1e-4
    edit = load_edit(out)
    assert isinstance(edit, Composite) and isinstance(edit.edits[1], WeightDelta)
    assert (out / "plots" / "detox_losses.svg").is_file()
    record = json.loads((out / "model" / "abliteration.json").read_text())
    assert record["edit"]["kind"] == "composite"


def test_steer_evaluate_and_detox_share_the_baseline_cache(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    direction = direction_file(tmp_path)
    steer = ["steer", "--model", str(tiny_model_dir), "--direction", str(direction),
             "--layers", "1", *SMALL]  # fmt: skip
    assert main([*steer, "--out", str(tmp_path / "s1")]) == 0
    assert main([*steer, "--out", str(tmp_path / "s2")]) == 0
    first, second = (
        load_report(tmp_path / "s1" / "report.json"),
        load_report(tmp_path / "s2" / "report.json"),
    )
    assert first.baseline_cache is not None and second.baseline_cache is not None
    assert (first.baseline_cache.hit, first.baseline_cache.stored) == (False, True)
    assert second.baseline_cache.hit and second.baseline_cache.key == first.baseline_cache.key
    assert second.baseline == first.baseline and second.edited == first.edited
    # Damage per category of the harmless prompts, as run reports it.
    assert first.edited.kl_by_category is not None
    # evaluate --steer measures the same unsteered model on the same sets and settings: the
    # entry steer stored is its baseline.
    out = tmp_path / "eval"
    args = ["evaluate", str(tiny_model_dir), "--baseline", str(tiny_model_dir), "--steer",
            str(direction), "--steer-layers", "1", "--out", str(out), *SMALL]  # fmt: skip
    assert main(args) == 0
    evaluated = load_report(out / "report.json")
    assert evaluated.baseline_cache is not None and evaluated.baseline_cache.hit
    assert evaluated.baseline == first.baseline
    assert evaluated.edited.kl_divergence == pytest.approx(first.edited.kl_divergence)
    # So does detox without --edit (the same files, evaluation sets and settings).
    detox = ["detox", "--model", str(tiny_model_dir), "--n-instances", "1", "--steps", "1",
             "--n-knowledge", "2", "--no-safeedit", "--no-save-model", *SMALL]  # fmt: skip
    assert main([*detox, "--out", str(tmp_path / "d")]) == 0
    detoxed = load_report(tmp_path / "d" / "report.json")
    assert detoxed.baseline_cache is not None
    assert detoxed.baseline_cache.key == first.baseline_cache.key and detoxed.baseline_cache.hit
    assert detoxed.baseline == first.baseline


def test_detox_config_checks_its_values() -> None:
    from abliterate.errors import ConfigError

    with pytest.raises(ConfigError, match="lr"):
        DetoxConfig(lr=0)
    with pytest.raises(ConfigError, match="mode"):
        DetoxConfig(mode="parallel")
    with pytest.raises(ConfigError, match="distance"):
        DetoxConfig(distance="cosine")
    with pytest.raises(ConfigError, match=r"n_guard|n-guard"):
        DetoxConfig(n_guard=-1)
    assert SteerConfig(direction="d.safetensors", sweep="-2,0,2").sweep == (-2.0, 0.0, 2.0)


def test_evaluate_with_steering_reuses_the_model_as_its_baseline(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    args = ["evaluate", str(tiny_model_dir), "--baseline", str(tiny_model_dir), "--steer",
            str(direction_file(tmp_path)), "--strength", "3", "--steer-layers", "2",
            "--out", str(out), *SMALL]  # fmt: skip
    assert main(args) == 0
    report = load_report(out / "report.json")
    assert report.edit is not None and report.edit.kind == "steering"
    assert report.edited.kl_divergence is not None and report.edited.kl_divergence > 0


def test_chat_steers_the_edited_side(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import io

    from abliterate.commands.chat import chat

    path = direction_file(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/quit\n"))
    plain = ChatConfig(model=str(tiny_model_dir), max_new_tokens=6)
    steered = ChatConfig(model=str(tiny_model_dir), max_new_tokens=6, steer=path, strength=50)
    assert chat(plain, interactive=False) == 0
    before = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/quit\n"))
    assert chat(steered, interactive=False) == 0
    after = capsys.readouterr().out
    assert "steered ×50" in after and after.split("\n", 2)[2] != before.split("\n", 2)[2]


def test_generalization_inputs_rewrap_questions() -> None:
    def inst(i: int, attack: str) -> DetoxInstance:
        return DetoxInstance(f"i{i}", "c", f"Q{i}?", f"[{attack}] Q{i}?", "No.", "Yes.", "K?", "A.",
                             attack)  # fmt: skip

    attacks = {"a": "[a] {question}", "b": "[b] {question}"}
    given = DetoxInstance("g", "c", "Q?", "[x] Q?", "No.", "Yes.", "K?", "A.", None,
                          {"only_question": "1", "other_attack": "2", "other_question": "3",
                           "other_both": "4"})  # fmt: skip
    instances = InstanceSet("t", (inst(0, "a"), inst(1, "b"), given), attacks)
    others = PromptSet("held-out", ("R0?", "R1?", "R2?"))
    got = generalization_inputs(instances, others)
    assert got["only_question"] == ["Q0?", "Q1?", "1"]
    assert got["other_attack"] == ["[b] Q0?", "[a] Q1?", "2"]
    assert got["other_question"] == ["[a] R0?", "[b] R1?", "3"]
    assert got["other_both"] == ["[b] R0?", "[a] R1?", "4"]


def test_edit_kinds_register_for_loading(make_model: Callable[[str], Any], tmp_path: Path) -> None:
    dset = DirectionSet(torch.ones(2, 4), (1, 2), site="mid", description="d")
    Steering(dset, 0.5).then(Steering(dset, -1.0, (2,))).save(tmp_path)
    loaded = load_edit(tmp_path)
    assert isinstance(loaded, Composite) and loaded.edits[1] == Steering(dset, -1.0, (2,))
