"""The typed report.json: its keys stay those of 0.1.0, it round-trips, old files migrate,
bad files are refused in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from report_samples import report_dicts, sample_report, sample_scores

from abliterate.errors import AbliterateError, ReportError
from abliterate.report.schema import (
    SCHEMA_VERSION,
    AblationEdit,
    OtherEdit,
    Report,
    SelectionScores,
    Trial,
    load_report,
    load_scores,
    migrate,
)

REPO = Path(__file__).resolve().parents[1]
BENCHMARK_REPORT = REPO / "benchmarks" / "results" / "abliterate_report.json"
SAMPLES = {
    "run": {},
    "optimize": {"optimized": True},
    "evaluate": {"evaluated": True},
    "evaluate+optimize": {"optimized": True, "evaluated": True},
}


def _paths(value: Any, prefix: str = "") -> dict[str, Any]:
    """Every key path of a JSON value (list items under ``[i]``) mapped to its leaf value."""
    if isinstance(value, dict):
        out: dict[str, Any] = {prefix: "{}"} if prefix else {}
        for k, v in value.items():
            out.update(_paths(v, f"{prefix}.{k}"))
        return out
    if isinstance(value, list):
        out = {prefix: "[]"}
        for i, v in enumerate(value):
            out.update(_paths(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _written(raw: dict[str, Any]) -> dict[str, Any]:
    return json.loads(Report.model_validate(migrate(raw)).to_json())


@pytest.mark.parametrize("kind", SAMPLES)
def test_samples_round_trip(kind: str) -> None:
    report = Report.model_validate(migrate(sample_report(**SAMPLES[kind])))
    assert Report.model_validate_json(report.model_dump_json()) == report
    assert Report.model_validate(json.loads(report.to_json())) == report


def test_a_real_optimize_report_keeps_every_key_and_value() -> None:
    """A report written by 0.1.0 on the demo model, loaded and written again: every key path
    and value is still there, and the only additions are the version, the command, the named
    refusal objective and the (null) baseline model."""
    raw = json.loads(BENCHMARK_REPORT.read_text())
    old, new = _paths(raw), _paths(_written(raw))
    assert {k: new.get(k) for k in old} == old
    added = {k.split("[")[0] + k.split("]")[-1] if "[" in k else k for k in set(new) - set(old)}
    assert added == {
        ".schema_version",
        ".command",
        ".baseline_model",
        ".optimization.trials.refusal_prob",
        ".optimization.chosen.refusal_prob",
    }
    assert new[".command"] == "optimize" and new[".schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("kind", SAMPLES)
def test_written_keys_are_a_superset_of_the_producers(kind: str) -> None:
    raw = sample_report(**SAMPLES[kind])
    old, new = _paths(raw), _paths(_written(raw))
    assert {k: new.get(k) for k in old} == old


def test_absent_stays_absent_and_null_stays_null() -> None:
    """Keys 0.1.0 left out stay out (scripts test for them); keys it wrote as null stay null."""
    run = _written(sample_report())
    assert "kl_divergence" not in run["baseline"] and "optimization" not in run
    assert "over_refusal" not in run["edited"] and "judges" not in run
    assert "confirmed_refusal_rate" not in json.dumps(run)
    assert run["model"]["revision"] is None and "category" in run["edited"]["completions"][0]
    optimized = _written(sample_report(optimized=True))
    assert optimized["selection"] is None
    trials = optimized["optimization"]["trials"]
    assert ["confirmed_refusal_rate" in t for t in trials] == [t["pareto"] for t in trials]
    alone = sample_report(evaluated=True)
    alone.update(baseline=None, baseline_model=None)
    alone["edited"].pop("kl_divergence")
    alone["edited"].pop("kl_divergence_multi_token")
    alone["edited"].pop("kl_tokens")
    written = _written(alone)
    assert written["baseline"] is None and written["baseline_model"] is None
    assert "kl_divergence" not in written["edited"] and "checks" in written


def test_trials_name_the_objective_and_keep_the_old_key() -> None:
    report = Report.model_validate(migrate(sample_report(optimized=True)))
    trial = report.optimization.trials[0] if report.optimization else None
    assert (
        trial is not None
        and trial.refusal_prob
        == sample_report(optimized=True)["optimization"]["trials"][0]["refusal_score"]
    )
    dumped = trial.model_dump(mode="json")
    assert dumped["refusal_prob"] == dumped["refusal_score"] == trial.refusal_prob
    assert Trial.model_validate(dumped) == trial  # both keys, as written, load again
    with pytest.raises(ValueError, match="refusal_score and refusal_prob differ"):
        Trial.model_validate({**dumped, "refusal_score": 0.5, "refusal_prob": 0.25})
    with pytest.raises(ValueError, match="less than or equal to 1"):
        Trial.model_validate({**dumped, "refusal_score": 2.3, "refusal_prob": 2.3})


def test_edits_of_other_kinds_are_kept_as_they_are() -> None:
    raw = sample_report()
    assert isinstance(Report.model_validate(migrate(raw)).edit, AblationEdit)
    raw["edit"] = {"kind": "steering", "vector": "steer.safetensors", "coefficient": -4.0}
    report = Report.model_validate(migrate(raw))
    assert isinstance(report.edit, OtherEdit) and report.edit.kind == "steering"
    assert json.loads(report.to_json())["edit"] == raw["edit"]
    raw["edit"] = {"vector": "steer.safetensors"}
    with pytest.raises(ValueError, match="kind"):
        Report.model_validate(migrate(raw))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["edited"].update(refusal_rate=1.5), "less than or equal to 1"),
        (lambda r: r["edited"].update(n_prompts=23), "n_prompts is 23 but there are 24"),
        (lambda r: r["edited"].update(kl_divergence="low"), "valid number"),
        (lambda r: r["checks"].pop("export_reload_max_abs_diff"), "Field required"),
        (lambda r: r.update(surprise=1), "Extra inputs are not permitted"),
        (
            lambda r: r["optimization"].update(
                chosen={**r["optimization"]["chosen"], "number": 99}
            ),
            "chosen trial 99",
        ),
        (lambda r: r.update(command="detoxify"), "command"),
    ],
)
def test_invalid_reports_are_refused(change: Any, message: str) -> None:
    raw = sample_report(optimized=True)
    change(raw)
    with pytest.raises(ValueError, match=message):
        Report.model_validate(migrate(raw))


def test_load_report_migrates_a_0_1_0_file(tmp_path: Path) -> None:
    for kind, command in (("run", "run"), ("optimize", "optimize"), ("evaluate", "evaluate")):
        path = tmp_path / f"{kind}.json"
        path.write_text(json.dumps(sample_report(**SAMPLES[kind])))
        report = load_report(path)
        assert report.command == command and report.schema_version == SCHEMA_VERSION
    current = Report.model_validate(migrate(sample_report()))
    path.write_text(current.to_json())
    assert load_report(path) == current  # a current file loads as it is


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object, not list"),
        ('{"schema_version": 2}', "has schema_version 2, but this abliterate reads version 1"),
        ('{"schema_version": "1"}', "has schema_version '1'"),
        ('{"schema_version": true}', "has schema_version True"),
        ('{"abliterate_version": "0.1.0"}', "is not a valid Report: model: Field required"),
    ],
)
def test_bad_files_raise_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "report.json"
    path.write_text(content)
    with pytest.raises(ReportError) as info:
        load_report(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text
    assert isinstance(info.value, AbliterateError)


def test_a_malformed_field_is_named_with_its_path(tmp_path: Path) -> None:
    raw = sample_report()
    raw["baseline"]["completions"][3]["refused"] = "maybe"
    path = tmp_path / "report.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ReportError, match=r"baseline\.completions\.3\.refused: Input should be"):
        load_report(path)
    with pytest.raises(ReportError, match="does not exist"):
        load_report(tmp_path / "missing.json")


def test_scores_load_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(sample_scores()))
    scores = load_scores(path)
    assert len(scores.scores) == 57 and scores.layer == 12
    assert scores.model_dump(mode="json") == sample_scores()
    path.write_text(json.dumps({**sample_scores(), "layer": "twelve"}))
    with pytest.raises(ReportError, match="not a valid SelectionScores: layer"):
        load_scores(path)
    assert SelectionScores.model_validate(sample_scores()).scores[0].same_as is None


def test_non_finite_numbers_survive_the_json(tmp_path: Path) -> None:
    raw = sample_report()
    raw["edited"]["kl_divergence"] = math.nan
    raw["checks"]["hooks_vs_weights_max_abs_diff"] = math.inf
    report = Report.model_validate(migrate(raw))
    path = tmp_path / "report.json"
    path.write_text(report.to_json())
    loaded = load_report(path)
    assert loaded.edited.kl_divergence is not None and math.isnan(loaded.edited.kl_divergence)
    assert loaded.checks is not None and loaded.checks.hooks_vs_weights_max_abs_diff == math.inf


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(report_dicts())
def test_generated_reports_round_trip(raw: dict[str, Any]) -> None:
    report = Report.model_validate(migrate(raw))
    assert Report.model_validate_json(report.model_dump_json()) == report
    assert Report.model_validate(json.loads(report.to_json())) == report
    old = _paths(raw)
    assert {k: _paths(json.loads(report.to_json())).get(k) for k in old} == old
