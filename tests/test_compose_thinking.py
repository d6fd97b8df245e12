"""``--thinking`` on ``direction``, ``steer`` and ``detox``: what each formats with the template's
thinking switch, how many tokens it generates, and what the judges read, on a tiny model whose
template has DeepSeek-V3.1's switch (``thinking`` opens a reasoning block in the prompt, off
closes it). Generation is canned so that the answers are known: with thinking on the first one
reasons its way past a refusal to an answer, the second never finishes reasoning."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from reasoning_templates import V31_STYLE, Recorder

from abliterate.cli import main
from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction, DirectionSet
from abliterate.data.chat import ChatSet
from abliterate.data.prompts import PromptSet
from abliterate.eval.behaviour import measure_behaviour
from abliterate.eval.judges import MarkerJudge
from abliterate.report.schema import load_report

ON_END, OFF_END = "<|assistant|><think>", "<|assistant|></think>"
ANSWER = "Sure, here it is."
# Inside an opened block the refusal is reasoning and ANSWER is the answer; read whole (thinking
# off: the prompt closed the block) it is a refusal. The second never leaves the reasoning.
RESPONSES = (f"I'm sorry, I can't.</think>{ANSWER}", "Let me think about this for a long time")
# Answers to the first three general-knowledge questions (capitals of France, Japan, Italy): the
# right one after the reasoning, one never finished, a wrong one after right reasoning.
KNOWLEDGE = ("Paris</think>Paris.", "Tokyo, I believe", "Rome</think>I do not know.")
BUDGET, TOKENS = 7, 4
SMALL = ["--n-eval", "2", "--max-new-tokens", str(TOKENS), "--kl-tokens", "2", "--batch-size",
         "4", "--no-baseline-cache"]  # fmt: skip


@pytest.fixture
def v31_dir(tiny_model_dir: Path, tmp_path: Path, tokenizer: Any) -> Path:
    path = tmp_path / "tiny-v31"
    shutil.copytree(tiny_model_dir, path)
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = V31_STYLE
    tok.save_pretrained(path)
    return path


@pytest.fixture
def canned(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, Any]]]:
    """Canned generation (:data:`RESPONSES`, in turn) wherever the commands generate; each
    call's texts and token count recorded under its module's name."""
    from abliterate.commands import detox
    from abliterate.eval import behaviour, evaluator, safeedit

    calls: dict[str, list[dict[str, Any]]] = {}

    def fake(name: str) -> Any:
        def generate(_m: Any, _t: Any, texts: Sequence[str], **kw: Any) -> list[str]:
            calls.setdefault(name, []).append(
                {"texts": list(texts), "tokens": kw["max_new_tokens"]}
            )
            if kw.get("desc") == "SafeEdit (knowledge)":
                return list(KNOWLEDGE[: len(texts)])
            return [RESPONSES[i % 2] for i in range(len(texts))]

        return generate

    for module in (evaluator, behaviour, safeedit, detox):
        monkeypatch.setattr(module, "generate", fake(module.__name__.rsplit(".", 1)[1]))
    return calls


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """The only judge of ``steer`` and ``detox``."""
    from abliterate.commands import detox, steer

    judge = Recorder()
    for module in (steer, detox):
        monkeypatch.setattr(module, "build_judges", lambda *_a, **_k: [judge])
    return judge


def _thinking(on: bool) -> list[str]:
    return ["--thinking", "on", "--thinking-budget", str(BUDGET)] if on else []


def _generated(calls: list[dict[str, Any]], end: str, tokens: int) -> None:
    """Every text of ``calls`` ends with ``end`` and was given ``tokens`` tokens."""
    assert calls and all(t.endswith(end) for c in calls for t in c["texts"])
    assert {c["tokens"] for c in calls} == {tokens}


def _judged(result: Any, on: bool) -> None:
    """The reported evaluation of one model, with the canned answers."""
    if on:  # the refusal was reasoning; the second answer never arrived
        assert (result.refusal_rate, result.n_unfinished, result.unfinished_rate) == (0, 1, 0.5)
        assert [c.unfinished for c in result.completions] == [None, True]
    else:  # both read whole, as before: the first refuses, nothing is unfinished
        assert (result.refusal_rate, result.n_unfinished, result.unfinished_rate) == (
            0.5,
            None,
            None,
        )


@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
def test_direction_formats_both_kinds_of_set_with_the_switch(
    v31_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on: bool
) -> None:
    from abliterate.commands import direction

    seen: list[ChatSet] = []
    real = direction.behaviour_directions

    def spy(model: Any, tok: Any, positive: ChatSet, negative: ChatSet, **kw: Any) -> Any:
        seen.extend((positive, negative))
        return real(model, tok, positive, negative, **kw)

    monkeypatch.setattr(direction, "behaviour_directions", spy)
    pairs = {"bare": ("builtin:harmful", "builtin:harmless"),
             "responses": ("builtin:terse", "builtin:verbose")}  # fmt: skip
    written = {}
    for name, (positive, negative) in pairs.items():
        out = tmp_path / name
        args = ["direction", "--model", str(v31_dir), "--positive", positive, "--negative",
                negative, "--n-prompts", "2", "--out", str(out), *_thinking(on)[:2]]  # fmt: skip
        assert main(args) == 0
        written[name] = DirectionSet.load(out.with_suffix(".safetensors"))
    end = ON_END if on else OFF_END
    assert len(seen) == 4 and all(t.endswith(end) for s in seen for t in s.texts)
    assert [s.prompts.responses is not None for s in seen] == [False, False, True, True]
    # The switch changes what is read: the direction differs from the other setting's.
    other = DirectionSet.load(_other_direction(v31_dir, tmp_path, not on))
    assert not torch.allclose(written["bare"].vectors, other.vectors)


def _other_direction(model: Path, tmp_path: Path, on: bool) -> Path:
    out = tmp_path / "other"
    args = ["direction", "--model", str(model), "--positive", "builtin:harmful", "--negative",
            "builtin:harmless", "--n-prompts", "2", "--out", str(out),
            *_thinking(on)[:2]]  # fmt: skip
    assert main(args) == 0
    return out.with_suffix(".safetensors")


@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
def test_steer_generates_with_the_switch_and_judges_the_answer(
    v31_dir: Path, tmp_path: Path, canned: dict[str, Any], recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch, on: bool,
) -> None:  # fmt: skip
    from abliterate.commands import steer

    evaluators: list[Any] = []
    real = steer.Evaluator

    def spy(*args: Any, **kw: Any) -> Any:
        evaluators.append(real(*args, **kw))
        return evaluators[-1]

    monkeypatch.setattr(steer, "Evaluator", spy)
    vectors = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    direction = DirectionSet(vectors, (0, 1, 2, 3), site="post").save(tmp_path / "d.safetensors")
    out = tmp_path / "steer"
    args = ["steer", "--model", str(v31_dir), "--direction", str(direction), "--layers", "1",
            "--sweep", "0", "2", "--n-metric", "2", "--metric", "refusal", "--out", str(out),
            *SMALL, *_thinking(on)]  # fmt: skip
    assert main(args) == 0
    end, tokens = (ON_END, TOKENS + BUDGET) if on else (OFF_END, TOKENS)
    _generated(canned["evaluator"], end, tokens)  # harmful and over-refusal prompts
    _generated(canned["behaviour"], end, tokens)  # the sweep's metric prompts
    # The harmless prompts (KL, hooks vs weights) are read after a closed block either way.
    assert all(t.endswith(OFF_END) for t in evaluators[0].sets.harmless.texts)
    assert set(recorder.seen) == ({ANSWER} if on else set(RESPONSES))
    report = load_report(out / "report.json")
    assert report.baseline is not None
    _judged(report.baseline, on)
    _judged(report.edited, on)
    assert report.steering is not None
    for point in report.steering.sweep:
        assert (point.value, point.unfinished_rate) == ((0.0, 0.5) if on else (0.5, None))
    assert ("| unfinished |" in (out / "report.md").read_text()) == on


@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
def test_detox_measures_with_the_switch_and_learns_without_it(
    v31_dir: Path, tmp_path: Path, canned: dict[str, Any], recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch, on: bool,
) -> None:  # fmt: skip
    from abliterate.edit import dinm

    learned: list[str] = []
    real = dinm.format_chat

    def spy(*args: Any, **kw: Any) -> list[str]:
        learned.extend(real(*args, **kw))
        return learned[-len(args[1]) :]

    monkeypatch.setattr(dinm, "format_chat", spy)
    g = torch.Generator().manual_seed(1)
    Ablation.uniform(Direction(torch.randn(64, generator=g)).normalized(), 4).save(tmp_path / "a")
    out = tmp_path / "detox"
    args = ["detox", "--model", str(v31_dir), "--edit", str(tmp_path / "a"), "--n-instances",
            "2", "--steps", "1", "--n-knowledge", "3", "--n-guard", "2", "--guard-tokens", "3",
            "--no-save-model", "--out", str(out), *SMALL, *_thinking(on)]  # fmt: skip
    assert main(args) == 0
    end = ON_END if on else OFF_END
    _generated(canned["evaluator"], end, TOKENS + BUDGET if on else TOKENS)
    by_tokens = {c["tokens"] for c in canned["safeedit"]}
    assert by_tokens == ({TOKENS + BUDGET, 32 + BUDGET} if on else {TOKENS, 32})
    assert all(t.endswith(end) for c in canned["safeedit"] for t in c["texts"])
    # What DINM learns from, and the guard it holds, are answers after a closed block.
    _generated(canned["detox"], OFF_END, 3)
    assert learned and all(t.endswith(OFF_END) for t in learned)
    assert set(recorder.seen) == ({ANSWER} if on else set(RESPONSES))
    report = load_report(out / "report.json")
    assert report.baseline is not None
    for result in (report.baseline, report.edited):
        _judged(result, on)
        scores = result.safeedit
        assert scores is not None
        if on:  # over the finished answers; the unfinished ones apart, per score
            assert (scores.defense_success, scores.knowledge_accuracy) == (0.0, 0.5)
            assert scores.unfinished == {
                "defense_success": 0.5, "dg_only_question": 0.5, "dg_other_attack": 0.5,
                "dg_other_question": 0.5, "dg_other_both": 0.5, "knowledge": pytest.approx(1 / 3),
            }  # fmt: skip
            assert [e.unfinished for e in scores.examples] == [None, True]
        else:
            assert (scores.defense_success, scores.knowledge_accuracy) == (0.5, 1.0)
            assert scores.unfinished is None
            assert all(e.unfinished is None for e in scores.examples)


def test_the_length_metric_reads_finished_answers_only(
    monkeypatch: pytest.MonkeyPatch, tokenizer: Any
) -> None:
    from abliterate.eval import behaviour

    responses = ["a b</think>one two three", "never closed"]
    monkeypatch.setattr(behaviour, "generate", lambda *_a, **_k: list(responses))
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = V31_STYLE
    chats = ChatSet.format(tok, PromptSet("p", ("x", "y")), thinking="on")
    kw: dict[str, Any] = {"max_new_tokens": 4, "batch_size": 2}
    measured = measure_behaviour(None, tok, chats, "length", MarkerJudge(), reasoning=True, **kw)  # type: ignore[arg-type]
    assert (measured.value, measured.unfinished_rate) == (3.0, 0.5)
    assert measured.responses == responses and measured.answers[0] == "one two three"
    # Without reasoning the answers are counted whole, as always (a, b, think, one, two, three).
    whole = measure_behaviour(None, tok, chats, "length", MarkerJudge(), **kw)  # type: ignore[arg-type]
    assert (whole.value, whole.unfinished_rate) == (4.0, None)
