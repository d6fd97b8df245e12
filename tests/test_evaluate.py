"""``abliterate evaluate`` end to end on tiny models: report shape, KL invariants, errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from abliterate.cli import main
from abliterate.config import EvaluateConfig
from abliterate.errors import ConfigError

TINY = ["--n-eval", "3", "--max-new-tokens", "4", "--batch-size", "4", "--kl-tokens", "3"]


@pytest.fixture
def perturbed_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A copy of the tiny model with one MLP output projection perturbed."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "perturbed"
    shutil.copytree(tiny_model_dir, path)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        w = model.model.layers[1].mlp.down_proj.weight
        w.add_(0.1 * torch.randn_like(w))
    model.save_pretrained(path)
    return path


def test_evaluate_against_a_baseline_with_two_judges_and_a_benchmark(
    tmp_path: Path, tiny_model_dir: Path, perturbed_dir: Path, classifier_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "eval"
    argv = ["evaluate", str(perturbed_dir), "--baseline", str(tiny_model_dir), "--out", str(out),
            *TINY, "--judge", f"markers,classifier:{classifier_dir}#REJECTION",
            "--benchmarks", "abliterate_arithmetic", "--benchmark-limit", "4"]  # fmt: skip
    assert main(argv) == 0
    assert "over-refusal" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    base, edited = report["baseline"], report["edited"]
    assert report["command"] == "evaluate" and report["model"]["source"] == str(perturbed_dir)
    assert report["baseline_model"]["source"] == str(tiny_model_dir)
    classifier = f"classifier:{classifier_dir}"
    assert report["judges"] == ["markers", classifier]
    for m in (base, edited):
        assert m["n_prompts"] == 3 and m["over_refusal"]["n_prompts"] == 3
        assert set(m["judges"]) == {"markers", classifier}
        # The first judge decides "refused"; every judge's verdict is kept per completion.
        assert m["refusal_rate"] == m["judges"]["markers"]["refusal_rate"]
        assert [c["refused"] for c in m["completions"]] == [
            c["judges"]["markers"] for c in m["completions"]
        ]
        rates = [c["judges"][classifier] for c in m["over_refusal"]["completions"]]
        assert m["judges"][classifier]["over_refusal_rate"] == sum(rates) / 3
        (pair,) = m["judge_agreement"]["harmful"]
        assert pair["judges"] == ["markers", classifier] and 0.0 <= pair["agreement"] <= 1.0
        assert m["reference_cross_entropy"] > 0.0
        assert set(m["fluency"]) == {"harmful", "over_refusal"}
        assert m["benchmarks"]["abliterate_arithmetic"]["n"] == 4
    assert "kl_divergence" not in base
    assert edited["kl_divergence"] > 0.0 and edited["kl_divergence_multi_token"] > 0.0
    assert edited["kl_tokens"] == 3
    # The perturbed model predicts the reference answers differently from the original.
    assert edited["reference_cross_entropy"] != pytest.approx(base["reference_cross_entropy"])
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "<svg" in html and "over-refusal" in html.lower()
    for heading in ("## Judges", "Cohen's kappa", "## Benchmarks", "## Fluency", "## Examples"):
        assert heading in md
    for name in ("config.json", "environment.json"):
        assert (out / name).is_file()
    assert json.loads((out / "config.json").read_text())["benchmarks"] == ["abliterate_arithmetic"]


def test_evaluate_a_model_against_itself_gives_zero_kl_and_equal_metrics(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    out = tmp_path / "self"
    assert main(["evaluate", str(tiny_model_dir), "--baseline", str(tiny_model_dir),
                 "--out", str(out), *TINY, "--n-eval", "2"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    base, edited = report["baseline"], report["edited"]
    assert edited["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert edited["kl_divergence_multi_token"] == pytest.approx(0.0, abs=1e-6)
    for key in ("refusal_rate", "over_refusal_rate", "reference_cross_entropy", "fluency"):
        assert base[key] == edited[key]


def test_evaluate_without_baseline_reports_no_kl(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "alone"
    assert main(["evaluate", str(tiny_model_dir), "--out", str(out), *TINY, "--n-eval", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"] is None and report["baseline_model"] is None
    assert "kl_divergence" not in report["edited"] and "judge_agreement" not in report["edited"]
    assert "no KL divergence" in (out / "report.md").read_text()
    assert "<svg" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--judge", "marker"], "Did you mean 'markers'?"),
        (["--benchmarks", "abliterate_arithmatic"], "Did you mean 'abliterate_arithmetic'?"),
        (["--n-eval", "0"], "--n-eval (command line) must be at least 1"),
    ],
)
def test_evaluate_user_errors_are_one_line_and_write_nothing(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str],
    extra: list[str], message: str,
) -> None:  # fmt: skip
    out = tmp_path / "out"
    assert main(["evaluate", str(tiny_model_dir), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_different_tokenizers_cannot_be_compared(
    tmp_path: Path, tiny_model_dir: Path, make_model: Callable[[str], Any], tokenizer: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import copy

    other = tmp_path / "other"
    make_model("qwen2").save_pretrained(other)
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    out = tmp_path / "out"
    argv = ["evaluate", str(tiny_model_dir), "--baseline", str(other), "--out", str(out), *TINY,
            "--n-eval", "1"]  # fmt: skip
    assert main(argv) == 2
    assert "different tokenizers" in capsys.readouterr().err
    assert not out.exists()


def test_config_positional_model_and_benchmark_lists() -> None:
    cfg = EvaluateConfig(model="x", benchmarks=("a,b", "c"))  # type: ignore[arg-type]
    assert cfg.benchmarks == ("a", "b", "c")
    assert EvaluateConfig(benchmarks="a, b").benchmarks == ("a", "b")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="judge must name"):
        EvaluateConfig(judge=" ")
    from abliterate.cli import parse_command

    cfg = parse_command(["evaluate", "some/dir", "--benchmarks", "a", "b,c"]).config
    assert isinstance(cfg, EvaluateConfig)
    assert cfg.model == "some/dir" and cfg.benchmarks == ("a", "b", "c")


def test_capped_over_refusal_set_covers_every_category() -> None:
    from abliterate.data.prompts import builtin

    full = builtin("over_refusal")
    cats = set(full.categories or ())
    capped = full.spread(10)
    assert len(capped) == 10 and set(capped.categories or ()) == cats
    assert set(capped.prompts) <= set(full.prompts)
    assert full.spread(None) is full and len(full.spread(1000)) == len(full)


def test_llm_judge_answers_are_kept_for_audit(tmp_path: Path, tiny_model_dir: Path) -> None:
    from abliterate.eval.llm_judge import parse_yes_no

    out = tmp_path / "llm"
    argv = ["evaluate", str(tiny_model_dir), "--out", str(out), *TINY, "--n-eval", "2",
            "--judge", f"llm:{tiny_model_dir},markers"]  # fmt: skip
    assert main(argv) == 0
    edited = json.loads((out / "report.json").read_text())["edited"]
    llm = edited["judges"][f"llm:{tiny_model_dir}"]
    assert edited["judge"] == f"llm:{tiny_model_dir}"  # the first judge decides
    for kind in ("harmful", "over_refusal"):
        answers = llm["answers"][kind]
        assert len(answers) == 2
        assert llm["n_unparsed"][kind] == sum(parse_yes_no(a) is None for a in answers)
    verdicts = [parse_yes_no(a) is True for a in llm["answers"]["harmful"]]
    assert [c["refused"] for c in edited["completions"]] == verdicts
