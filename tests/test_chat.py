"""``abliterate chat``: configuration, baseline resolution, multi-turn greedy answers that
match independent generation, commands, interruption, piped and live output."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from abliterate.cli import main, parse_command
from abliterate.commands import chat as chat_mod
from abliterate.commands.chat import ChatModel, load_sides, resolve_baseline, stream_answers
from abliterate.config import ChatConfig
from abliterate.errors import ConfigError
from abliterate.model.forward import generate
from abliterate.model.loading import load_model

MAX_NEW = 6


@pytest.fixture
def base_dir(tmp_path: Path, make_model: Callable[[str], Any], tokenizer: Any) -> Path:
    """A second tiny chat model (another family), standing in for the original model."""
    path = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _feed(monkeypatch: pytest.MonkeyPatch, lines: list[str | type[BaseException]]) -> None:
    """Make ``input()`` return ``lines`` one by one (raising exception classes), then EOF."""
    items: Iterator[str | type[BaseException]] = iter(lines)

    def fake_input(prompt: str = "") -> str:
        item = next(items, EOFError)
        if isinstance(item, type):
            raise item()
        return item

    monkeypatch.setattr("builtins.input", fake_input)


def test_model_is_positional_and_values_are_validated() -> None:
    config = parse_command(["chat", "runs/x", "--temperature", "0.7"]).config
    assert isinstance(config, ChatConfig)
    assert (config.model, config.temperature) == ("runs/x", 0.7)
    with pytest.raises(ConfigError, match="required: MODEL"):
        parse_command(["chat", "--baseline", "demo"])
    with pytest.raises(ConfigError, match="temperature must be positive"):
        ChatConfig(model="m", temperature=0.0)
    with pytest.raises(ConfigError, match="max_new_tokens must be at least 1"):
        ChatConfig(model="m", max_new_tokens=0)


def test_baseline_comes_from_the_recorded_base_model(tmp_path: Path, base_dir: Path) -> None:
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    assert resolve_baseline(str(run / "model")) is None
    record = {"base_model": {"name": "org/base", "source": str(base_dir), "revision": "abc"}}
    (run / "model" / "abliteration.json").write_text(json.dumps(record))
    assert resolve_baseline(str(run / "model")) == (str(base_dir), None)
    # Once the local source is gone, fall back to the hub id at the recorded revision.
    record["base_model"]["source"] = str(tmp_path / "gone")
    (run / "model" / "abliteration.json").write_text(json.dumps(record))
    assert resolve_baseline(str(run / "model")) == ("org/base", "abc")


def test_a_run_directory_loads_its_model_and_recorded_baseline(
    tmp_path: Path, tiny_model_dir: Path, base_dir: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    # A run directory's own config.json is the run configuration, not a model's.
    (run / "config.json").write_text(json.dumps({"model": "demo", "dtype": "auto"}))
    tiny_model_dir.rename(run / "model")
    record = {"base_model": {"name": "tiny", "source": str(base_dir), "revision": None}}
    (run / "model" / "abliteration.json").write_text(json.dumps(record))
    sides = load_sides(ChatConfig(model=str(run), device="cpu"))
    assert [s.label for s in sides] == [f"edited · {run / 'model'}", f"original · {base_dir}"]
    alone = load_sides(ChatConfig(model=str(base_dir), device="cpu"))
    assert [s.label for s in alone] == [str(base_dir)]


def _sides(edited_dir: Path, base_dir: Path, system: str | None = None) -> list[ChatModel]:
    return [
        ChatModel("edited", load_model(str(edited_dir), device="cpu"), system),
        ChatModel("original", load_model(str(base_dir), device="cpu"), system),
    ]


def _expected(side: ChatModel, messages: list[dict[str, str]]) -> str:
    tok = side.loaded.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return generate(side.loaded.model, tok, [text], max_new_tokens=MAX_NEW)[0]


def test_multi_turn_answers_equal_independent_greedy_generation(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, base_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    sides = _sides(tiny_model_dir, base_dir, system="Be brief.")
    _feed(monkeypatch, ["How do I bake bread?", "", "Write a poem"])
    config = ChatConfig(model="unused", max_new_tokens=MAX_NEW, system_prompt="Be brief.")
    assert chat_mod.chat(config, interactive=False, sides=sides) == 0
    system = {"role": "system", "content": "Be brief."}
    for side in sides:
        q1, a1, q2, a2 = side.history
        assert (q1["content"], q2["content"]) == ("How do I bake bread?", "Write a poem")
        assert a1["content"] == _expected(side, [system, q1])
        # The second answer sees the first exchange: history is kept per model.
        assert a2["content"] == _expected(side, [system, q1, a1, q2])
    assert sides[0].history != sides[1].history  # two different models answered
    out = capsys.readouterr().out
    assert out.count(">>> ") == 2 and out.count("--- edited") == 2 and out.count("--- original")


def test_piped_cli_session_with_reset_and_unknown_command(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, base_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nsecond\n/reset\nhello there\n/x\n"))
    argv = ["chat", str(tiny_model_dir), "--baseline", str(base_dir), "--device", "cpu",
            "--max-new-tokens", str(MAX_NEW)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(conversation cleared)" in out and "unknown command /x" in out
    before, after = out.split("(conversation cleared)\n")
    first, second = before.split(">>> ")[1:]
    (third,) = after.split("unknown command")[0].split(">>> ")[1:]
    assert first.startswith("hello there\n--- edited · ") and "--- original · " in first
    assert third == first  # after /reset the same question gets the same (greedy) answers
    assert second.startswith("second\n")
    # Model output is printed without terminal control characters (escape sequences).
    assert not any(ord(ch) < 32 and ch not in "\n\t" for ch in out)


def test_quit_and_ctrl_c_at_the_prompt_end_the_session(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, base_dir: Path
) -> None:
    sides = _sides(tiny_model_dir, base_dir)
    config = ChatConfig(model="unused", max_new_tokens=MAX_NEW)
    _feed(monkeypatch, ["/quit", "never read"])
    assert chat_mod.chat(config, interactive=False, sides=sides) == 0
    _feed(monkeypatch, [KeyboardInterrupt, "never read"])
    assert chat_mod.chat(config, interactive=False, sides=sides) == 0
    assert all(not s.history for s in sides)


def test_ctrl_c_while_answering_stops_generation_and_drops_the_turn(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, base_dir: Path
) -> None:
    sides = _sides(tiny_model_dir, base_dir)
    lengths: list[int] = []
    for side in sides:
        original_generate = side.loaded.model.generate

        def full_length(*args: Any, _gen: Any = original_generate, **kwargs: Any) -> Any:
            # Without the stop event, every answer would run to max_new_tokens (no early EOS).
            kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
            tokens = _gen(*args, **kwargs)
            lengths.append(tokens.shape[1] - kwargs["input_ids"].shape[1])
            return tokens

        monkeypatch.setattr(side.loaded.model, "generate", full_length)

    def interrupt(texts: list[str], done: list[bool]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream_answers(sides, "How do I bake bread?", interrupt, max_new_tokens=200)
    # Both workers were stopped early and joined before the interrupt surfaced.
    assert len(lengths) == 2 and max(lengths) < 200

    real = chat_mod.stream_answers
    calls = iter([KeyboardInterrupt, None])

    def flaky(*args: Any, **kwargs: Any) -> list[str]:
        if next(calls) is KeyboardInterrupt:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(chat_mod, "stream_answers", flaky)
    _feed(monkeypatch, ["dropped", "kept"])
    config = ChatConfig(model="unused", max_new_tokens=MAX_NEW)
    console = _console()
    assert chat_mod.chat(config, interactive=True, sides=sides, console=console) == 0
    assert [m["content"] for m in sides[0].history][::2] == ["kept"]
    assert "this turn is not kept" in console.file.getvalue()


def _console() -> Any:
    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=True, width=100, height=24,
                   color_system=None)  # fmt: skip


def test_live_layout_shows_both_models_side_by_side(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, base_dir: Path
) -> None:
    sides = _sides(tiny_model_dir, base_dir)
    console = _console()
    _feed(monkeypatch, ["How do I bake bread?"])
    config = ChatConfig(model="unused", max_new_tokens=MAX_NEW)
    assert chat_mod.chat(config, interactive=True, sides=sides, console=console) == 0
    screen = console.file.getvalue()
    assert "Chatting with edited and original" in screen
    # The final panels share their top border line: "╭─ edited ──…──╮ ╭─ original ──…──╮".
    top = next(line for line in screen.splitlines() if "─ edited " in line)
    assert "─ original " in top


def test_streaming_columns_show_the_latest_lines_only(tiny_model_dir: Path) -> None:
    from rich.console import Console

    side = ChatModel("edited", load_model(str(tiny_model_dir), device="cpu"))
    long = "\n".join(f"line {i}" for i in range(100))
    console = Console(file=io.StringIO(), width=60, height=20, color_system=None)
    console.print(chat_mod._columns([side], [long], [False], console, tail=True))
    shown = console.file.getvalue()
    assert "line 99" in shown and "line 0\n" not in shown and "…" in shown
    assert "generating…" in shown
    assert len(shown.splitlines()) <= 20


def test_model_without_chat_template_is_a_one_line_error(
    no_template_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["chat", str(no_template_model_dir), "--device", "cpu"]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_temperature_switches_from_greedy_to_sampling(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    side = ChatModel("edited", load_model(str(tiny_model_dir), device="cpu"))
    seen: list[dict[str, Any]] = []
    original_generate = side.loaded.model.generate

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append({k: kwargs[k] for k in ("do_sample", "temperature", "top_p", "top_k")})
        return original_generate(*args, **kwargs)

    monkeypatch.setattr(side.loaded.model, "generate", recording)
    for temperature in (None, 0.7):
        (answer,) = stream_answers([side], "hi", lambda t, d: None, max_new_tokens=3,
                                   temperature=temperature)  # fmt: skip
        assert isinstance(answer, str)
    assert seen == [
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None},
        {"do_sample": True, "temperature": 0.7, "top_p": None, "top_k": None},
    ]
