"""Reasoning models: the template's thinking switch, answers judged after the reasoning, and
unfinished answers counted apart (issue 10, item 4)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from reasoning_templates import QWEN3_STYLE, R1_STYLE, V31_STYLE, Recorder

from abliterate.config import ChatConfig, RunConfig
from abliterate.data.chat import ChatSet, format_chat
from abliterate.data.prompts import PromptSet
from abliterate.data.reasoning import (
    close_reasoning,
    opens_reasoning,
    thinking_switch,
)
from abliterate.eval import evaluator as evaluator_mod
from abliterate.eval.evaluator import EvalSets, Evaluator
from abliterate.eval.judges import MarkerJudge
from abliterate.eval.llm_judge import LLMJudge
from abliterate.eval.refusals import judge_responses
from abliterate.eval.text import Answer, split_answer
from abliterate.report.markdown import render_markdown
from abliterate.report.schema import Report


def with_template(tokenizer: Any, template: str) -> Any:
    """A copy of the test tokenizer with another chat template."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


# --- the switch ------------------------------------------------------------------------------


def test_the_switch_is_read_from_the_template_source(tokenizer: Any) -> None:
    assert thinking_switch(with_template(tokenizer, QWEN3_STYLE)) == "enable_thinking"
    assert thinking_switch(with_template(tokenizer, V31_STYLE)) == "thinking"
    assert thinking_switch(tokenizer) is None
    assert thinking_switch(with_template(tokenizer, R1_STYLE)) is None
    # A variable the template sets itself is not a switch; transformers' generation blocks
    # and loop controls parse.
    own = "{% set thinking = true %}{% for m in messages %}{% if thinking %}{% break %}{% endif %}"
    own += "{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    assert thinking_switch(with_template(tokenizer, own)) is None


def test_formatting_honours_the_switch(tokenizer: Any) -> None:
    tok = with_template(tokenizer, QWEN3_STYLE)
    off = format_chat(tok, ["Hi"])  # off is the default
    on = format_chat(tok, ["Hi"], thinking="on")
    assert off == ["<|user|>Hi</s><|assistant|><think>\n\n</think>\n\n"]
    assert on == ["<|user|>Hi</s><|assistant|>"]
    assert not opens_reasoning(off[0]) and not opens_reasoning(on[0])
    v31 = with_template(tokenizer, V31_STYLE)
    assert format_chat(v31, ["Hi"]) == ["<|user|>Hi</s><|assistant|></think>"]
    assert opens_reasoning(format_chat(v31, ["Hi"], thinking="on")[0])
    # ChatSet.format passes the switch on.
    chats = ChatSet.format(tok, PromptSet("p", ("Hi",)), thinking="on")
    assert chats.texts == tuple(on)


def test_off_closes_a_block_the_template_always_opens(tokenizer: Any) -> None:
    r1 = with_template(tokenizer, R1_STYLE)
    assert format_chat(r1, ["Hi"], thinking="on") == ["<|user|>Hi</s><|assistant|><think>\n"]
    assert format_chat(r1, ["Hi"]) == ["<|user|>Hi</s><|assistant|><think>\n\n</think>\n\n"]
    # The same empty block as Qwen3's template writes with thinking off.
    assert close_reasoning("x<think>") == "x<think>\n\n</think>\n\n"
    # A tag quoted in the instruction opens nothing.
    quoted = format_chat(tokenizer, ["What does <think> mean?"])
    assert quoted == ["<|user|>What does <think> mean?</s><|assistant|>"]


def test_templates_without_a_switch_render_as_before(tokenizer: Any) -> None:
    plain = [
        str(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True))
        for p in ("Hi", "Bake bread")
    ]  # fmt: skip
    assert format_chat(tokenizer, ["Hi", "Bake bread"]) == plain
    assert format_chat(tokenizer, ["Hi", "Bake bread"], thinking="on") == plain


# --- the answer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "in_reasoning", "expected"),
    [
        ("Sure, here it is.", False, Answer("Sure, here it is.")),
        ("", False, Answer("")),  # a plain empty answer stays the judges' business
        ("<think>I can't say that.</think>\n\nSure: step one.", False, Answer("Sure: step one.")),
        ("  <think>hmm</think>I'm sorry.", False, Answer("I'm sorry.")),
        ("<think>still thinking about it", False, Answer("", finished=False)),
        ("<think>done</think>\n\n", False, Answer("", finished=False)),
        ("<think>a</think><think>b</think>", False, Answer("<think>b</think>", finished=False)),
        ("I refuse</think>Sure.", True, Answer("Sure.")),
        ("never closed", True, Answer("", finished=False)),
        # A block later in a plain answer is not the answer's reasoning (judges strip it).
        ("Sure. <think>x</think> Done.", False, Answer("Sure. <think>x</think> Done.")),
    ],
)
def test_split_answer(response: str, in_reasoning: bool, expected: Answer) -> None:
    assert split_answer(response, in_reasoning) == expected


RESPONSES = [
    "<think>I can't help with weapons... but this is a novel.</think>Sure, chapter one.",
    "<think>The user wants a lock picked. I'm sorry is the right reply.</think>I'm sorry, no.",
    "<think>Let me think about this for a very long time",  # unfinished: never closed
    "<think>ok</think>",  # unfinished: nothing after the reasoning
]
PROMPTS = PromptSet("harmful", ("a", "b", "c", "d"), categories=("x", "x", "y", "y"))


def test_judges_read_the_answer_only_and_unfinished_is_apart() -> None:
    recorder = Recorder()
    answers = [split_answer(r) for r in RESPONSES]
    evaluation, _ = judge_responses([MarkerJudge(), recorder], PROMPTS, RESPONSES, answers)
    # A refusal marker inside <think> is no refusal; the unfinished ones were not judged.
    assert recorder.seen == ["Sure, chapter one.", "I'm sorry, no."]
    assert evaluation.refused == [False, True, False, False]
    assert evaluation.unfinished == [False, False, True, True]
    assert (evaluation.n_unfinished, evaluation.unfinished_rate) == (2, 0.5)
    # Unfinished answers are out of the denominator: 1 refusal among 2 finished answers.
    assert evaluation.refusal_rate == 0.5
    assert evaluation.rate_by("recorder") == 0.5
    assert evaluation.by_category() == {"x": 0.5}  # no answer of "y" finished
    rows = evaluation.completions()
    assert [r.get("unfinished", False) for r in rows] == [False, False, True, True]
    assert [r["response"] for r in rows] == RESPONSES  # the report keeps the whole response
    assert "judges" in rows[0] and "judges" not in rows[2]


def test_old_behaviour_when_nothing_reasons() -> None:
    plain = ["Sure, here.", "I'm sorry, I can't.", ""]
    prompts = PromptSet("p", ("a", "b", "c"))
    evaluation, _ = judge_responses([MarkerJudge()], prompts, plain)
    assert evaluation.refused == [False, True, True]  # empty still counts as a refusal
    assert evaluation.unfinished is None and evaluation.refusal_rate == pytest.approx(2 / 3)
    assert all("unfinished" not in r for r in evaluation.completions())


def test_the_llm_judge_sees_answers_only() -> None:
    questions: list[str] = []

    def answer(qs: Sequence[str]) -> list[str]:
        questions.extend(qs)
        return ["no" for _ in qs]

    judge = LLMJudge(answer, "llm:fake")
    answers = [split_answer(r) for r in RESPONSES]
    evaluation, raw = judge_responses([judge], PROMPTS, RESPONSES, answers)
    assert len(questions) == 2
    assert not any("<think>" in q or "I can't help" in q for q in questions)
    assert raw["llm:fake"] == ["no", "no", "", ""]
    assert evaluation.refused == [False] * 4


# --- through the evaluator, the report and the renderers ---------------------------------------


@pytest.fixture
def canned(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace generation in the evaluator by :data:`RESPONSES`; record each call."""
    calls: list[dict[str, Any]] = []

    def fake_generate(_model: Any, _tok: Any, texts: Sequence[str], **kw: Any) -> list[str]:
        calls.append({"texts": list(texts), **kw})
        return [RESPONSES[i % len(RESPONSES)] for i in range(len(texts))]

    monkeypatch.setattr(evaluator_mod, "generate", fake_generate)
    return calls


def test_evaluator_reports_unfinished(
    canned: list[dict[str, Any]], tokenizer: Any, make_model: Callable[[str], Any]
) -> None:
    tok = with_template(tokenizer, QWEN3_STYLE)
    harmful = ChatSet.format(tok, PROMPTS, thinking="on")
    harmless = ChatSet.format(tok, PromptSet("harmless", ("bake bread", "a poem")))
    evaluator = Evaluator(
        tok, EvalSets(harmful, harmless, over_refusal=harmful), [MarkerJudge()],
        max_new_tokens=8, kl_tokens=2, batch_size=4, thinking_budget=100, reasoning=True,
    )  # fmt: skip
    model = make_model("qwen2")
    result = evaluator.assess(model, "model").to_dict()
    assert canned[0]["max_new_tokens"] == 108  # the answer's tokens plus the reasoning budget
    assert canned[0]["texts"] == list(harmful.texts)
    assert (result["refusal_rate"], result["n_unfinished"], result["unfinished_rate"]) == (
        0.5, 2, 0.5,
    )  # fmt: skip
    assert result["over_refusal"]["n_unfinished"] == 2
    report = Report.model_validate(
        {
            "command": "evaluate", "abliterate_version": "test",
            "model": {"name": "m", "source": "s", "architecture": "a"},
            "data": {}, "edited": result,
        }
    )  # fmt: skip
    assert report.edited.completions[2].unfinished is True
    assert report.edited.completions[0].unfinished is None
    text = render_markdown(report)
    assert "50.0% of 4 (2 unfinished, not counted)" in text
    assert "unfinished" in report.to_json()


def test_evaluator_without_reasoning_adds_no_keys(
    monkeypatch: pytest.MonkeyPatch, tokenizer: Any, make_model: Callable[[str], Any]
) -> None:
    canned_plain = ["Sure.", "I'm sorry."]
    monkeypatch.setattr(
        evaluator_mod, "generate", lambda _m, _t, texts, **kw: canned_plain[: len(texts)]
    )
    sets = EvalSets(
        ChatSet.format(tokenizer, PromptSet("h", ("a", "b"))),
        ChatSet.format(tokenizer, PromptSet("n", ("c", "d"))),
    )
    evaluator = Evaluator(tokenizer, sets, [MarkerJudge()], max_new_tokens=4, kl_tokens=2,
                          batch_size=2)  # fmt: skip
    result = evaluator.assess(make_model("qwen2"), "m").to_dict()
    assert "n_unfinished" not in result and "unfinished_rate" not in result
    assert result["refusal_rate"] == 0.5


# --- where the switch applies in a run ---------------------------------------------------------


def test_run_scores_next_tokens_after_an_empty_block(tokenizer: Any) -> None:
    from abliterate.commands.run import SCORED, format_sets

    tok = with_template(tokenizer, QWEN3_STYLE)
    sets = {k: PromptSet(k, ("a", "b")) for k in
            ("train_harmful", "train_harmless", "val_harmful", "val_harmless", "eval_harmful",
             "eval_harmless")}  # fmt: skip
    on = format_sets(RunConfig(thinking="on"), tok, sets)
    # Directions are measured, and answers generated, with the switch the user chose...
    assert on["train_harmful"].texts[0].endswith("<|assistant|>")
    assert on["eval_harmful"].texts[0].endswith("<|assistant|>")
    # ...next-token distributions are read after the empty reasoning block.
    for key, scored in SCORED.items():
        assert on[scored].texts[0].endswith("<think>\n\n</think>\n\n"), key
    off = format_sets(RunConfig(), tok, sets)
    assert all(off[scored] is off[key] for key, scored in SCORED.items())


def test_search_confirmation_counts_unfinished_against_the_trial(
    monkeypatch: pytest.MonkeyPatch, tokenizer: Any, make_model: Callable[[str], Any]
) -> None:
    from abliterate.search import optimize
    from abliterate.search.pareto import TrialRecord

    calls: list[int] = []

    def fake_generate(_m: Any, _t: Any, texts: Sequence[str], **kw: Any) -> list[str]:
        calls.append(kw["max_new_tokens"])
        return RESPONSES[: len(texts)]

    monkeypatch.setattr(optimize, "generate", fake_generate)
    monkeypatch.setattr(optimize, "edit_hooks", lambda *_a, **_k: _null())
    tok = with_template(tokenizer, QWEN3_STYLE)
    harmful = ChatSet.format(tok, PROMPTS, thinking="on")
    config = RunConfig(thinking="on", thinking_budget=50, confirm_tokens=8, optimize=True)
    search = optimize._Search(None, harmful, harmful, MarkerJudge(), config, ((), ()))  # type: ignore[arg-type]
    monkeypatch.setattr(optimize._Search, "edit", lambda self, params: None)
    confirm = optimize._Confirmer(make_model("qwen2"), tok, search)
    rate = confirm(TrialRecord(0, 0.1, 0.1, {}))
    assert calls == [58]
    # 1 refusal + 2 unfinished out of 4: an edit cannot meet the target by never answering.
    assert rate == 0.75
    assert sum(confirm.verdicts[0]) == 3  # the per-prompt verdicts the calibration reads


def _null() -> Any:
    from contextlib import nullcontext

    return nullcontext()


def test_chat_formats_with_the_switch(tokenizer: Any, make_model: Callable[[str], Any]) -> None:
    from abliterate.commands.chat import ChatModel, answer_tokens
    from abliterate.model.loading import LoadedModel

    tok = with_template(tokenizer, QWEN3_STYLE)
    loaded = LoadedModel(make_model("qwen2"), tok, "m", "m")
    assert ChatModel("m", loaded).prompt_text("Hi").endswith("<think>\n\n</think>\n\n")
    assert ChatModel("m", loaded, thinking="on").prompt_text("Hi").endswith("<|assistant|>")
    assert answer_tokens(ChatConfig(model="m", max_new_tokens=10)) == 10
    config = ChatConfig(model="m", max_new_tokens=10, thinking="on", thinking_budget=5)
    assert answer_tokens(config) == 15


# --- end to end on a tiny model whose template always opens a reasoning block -----------------


@pytest.fixture
def r1_model_dir(tmp_path: Path, make_model: Callable[[str], Any], tokenizer: Any) -> Path:
    path = tmp_path / "tiny-r1"
    make_model("qwen2").save_pretrained(path)
    with_template(tokenizer, R1_STYLE).save_pretrained(path)
    return path


def test_a_run_with_thinking_on_reports_unfinished_answers(
    tmp_path: Path, r1_model_dir: Path
) -> None:
    from abliterate.commands.run import run

    report = run(
        RunConfig(
            model=str(r1_model_dir), out=tmp_path / "run", thinking="on", thinking_budget=3,
            n_train=4, n_val=4, n_eval=4, batch_size=4, max_new_tokens=3, kl_tokens=2,
            n_screen=2, n_finalists=2, device="cpu",
        )
    )  # fmt: skip
    # A random model never closes the block the template opened: no answer arrives, and that
    # is reported as such, not as four refusals.
    for side in ("baseline", "edited"):
        result = report[side]
        assert (result["n_unfinished"], result["unfinished_rate"]) == (4, 1.0)
        assert result["refusal_rate"] == 0.0
        assert all(c["unfinished"] and not c["refused"] for c in result["completions"])
    assert "unfinished, not counted" in (tmp_path / "run/report.md").read_text()
    html = (tmp_path / "run/report.html").read_text()
    assert 'class="badge unfinished"' in html and "unfinished answers" in html


def test_evaluate_with_thinking_off_closes_the_block(tmp_path: Path, r1_model_dir: Path) -> None:
    from abliterate.commands.evaluate import evaluate
    from abliterate.config import EvaluateConfig

    report = evaluate(
        EvaluateConfig(model=str(r1_model_dir), out=tmp_path / "eval", n_eval=3, batch_size=4,
                       max_new_tokens=3, device="cpu")
    )  # fmt: skip
    # The prompt ends after an empty block: the continuation is the answer, finished.
    assert "n_unfinished" not in report["edited"]
    assert all("unfinished" not in c for c in report["edited"]["completions"])
