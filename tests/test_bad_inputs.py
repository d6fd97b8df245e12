"""Bad inputs end in one clear line (exit status 2), before the work they would spoil: corrupt
weight and direction files, non-finite weights and logits, prompts longer than the context,
devices that do not exist, malformed prompt files, chat without input, pickled classifiers."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_errors import one_error

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.data.prompts import load_prompts
from abliterate.edit.weights import bake
from abliterate.errors import (
    ConfigError,
    DirectionFileError,
    JudgeError,
    ModelLoadError,
    NonFiniteError,
    PromptSetError,
)
from abliterate.model.anatomy import anatomy_of
from abliterate.model.loading import MAX_PROMPT_TOKENS, context_limit, load_model, resolve_device
from abliterate.progress import Stages

TINY = ["--n-train", "4", "--n-val", "2", "--n-eval", "2", "--max-new-tokens", "2",
        "--batch-size", "4", "--no-save-model"]  # fmt: skip


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


# --- corrupt weight and direction files -------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b"not a safetensors file at all",
        lambda b: b[: len(b) // 2],  # a download cut in the middle
        lambda b: b[:200],
        lambda b: b"",
    ],
    ids=["garbage", "truncated", "header-only", "empty"],
)
def test_corrupt_safetensors_model_is_one_line(
    tmp_path: Path, tiny_model_dir: Path, damage: Callable[[bytes], bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    model = _copy(tiny_model_dir, tmp_path / "damaged")
    weights = model / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    out = tmp_path / "out"
    msg = one_error(["evaluate", str(model), "--out", str(out)], capsys)
    assert "cannot load model" in msg and "SafetensorError" in msg
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("which", ["safetensors", "json"])
def test_corrupt_direction_file_is_one_line(
    tmp_path: Path, tiny_model_dir: Path, which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    direction = Direction(torch.randn(64), layer=1, site="pre")
    path = direction.save(tmp_path / "direction")
    target = path if which == "safetensors" else path.with_suffix(".json")
    target.write_bytes(target.read_bytes()[:20])
    out = tmp_path / "out"
    argv = ["run", "--model", str(tiny_model_dir), "--out", str(out), "--direction", str(path),
            *TINY]  # fmt: skip
    msg = one_error(argv, capsys)
    assert "cannot read the direction" in msg
    assert not out.exists()


def test_zero_or_nan_direction_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = Direction(torch.zeros(8)).save(tmp_path / "d")
    with pytest.raises(DirectionFileError, match="zero or not finite"):
        Direction.load(path)
    # A NaN direction cannot even be built, but a file can hold one.
    save_file({"direction": torch.full((8,), float("nan"))}, str(path))
    with pytest.raises(DirectionFileError, match="finite"):
        Direction.load(path)


# --- non-finite values --------------------------------------------------------------------------


def test_model_with_nan_weights_is_refused_at_load_naming_the_tensor(
    tmp_path: Path, make_model: Callable[[str], Any], tokenizer: Any
) -> None:
    model = make_model("qwen2")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[3, 5] = float("inf")
    model.save_pretrained(tmp_path / "broken")
    tokenizer.save_pretrained(tmp_path / "broken")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.2\.mlp\.down_proj\.weight"):
        load_model(str(tmp_path / "broken"), device="cpu")


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]
)
def test_first_nonfinite_finds_nan_and_inf_in_every_float_type(dtype: torch.dtype) -> None:
    from abliterate.core.finite import first_nonfinite

    for bad in ("nan", "inf", "-inf"):
        if dtype == torch.float8_e4m3fn and bad != "nan":
            continue  # this type has no infinity
        x = torch.randn(3000).to(dtype)
        assert first_nonfinite([("x", x)]) is None
        x[1234] = float(bad)
        named = [("ints", torch.arange(3)), ("empty", torch.zeros(0)), ("ok", torch.zeros(3)),
                 ("x", x)]  # fmt: skip
        assert first_nonfinite(named) == "x"


def test_scanning_weights_costs_little_next_to_loading_them(tiny_model_dir: Path) -> None:
    from abliterate.core.finite import first_nonfinite

    start = time.perf_counter()
    loaded = load_model(str(tiny_model_dir), device="cpu")
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    assert first_nonfinite(loaded.model.named_parameters()) is None
    scan_s = time.perf_counter() - start
    assert scan_s < load_s, (scan_s, load_s)


def test_infinite_logits_with_finite_weights_are_refused_before_evaluation(
    tmp_path: Path, make_model: Callable[[str], Any], tokenizer: Any,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    model = make_model("qwen2")
    with torch.no_grad():
        model.model.norm.weight.fill_(3e38)  # finite, but the head's sums overflow
    path = tmp_path / "overflow"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    assessed: list[str] = []
    monkeypatch.setattr("abliterate.eval.evaluator.Evaluator.assess",
                        lambda self, m, label: assessed.append(label))  # fmt: skip
    out = tmp_path / "out"
    msg = one_error(["evaluate", str(path), "--out", str(out), "--n-eval", "2"], capsys)
    assert "non-finite logits" in msg
    assert assessed == [] and not out.exists()


def test_an_edit_that_produces_nan_names_the_tensor_and_is_never_kept(
    make_model: Callable[[str], Any], tmp_path: Path
) -> None:
    model = make_model("qwen2")
    n_layers = anatomy_of(model).n_layers
    # A finite strength whose product overflows float32.
    edit = Ablation.uniform(Direction(torch.randn(64)).normalized(), n_layers, 1e300)
    with pytest.raises(NonFiniteError, match=r"model\.embed_tokens\.weight"):
        bake(model, edit)


def test_non_finite_strengths_are_refused_by_the_edit_itself() -> None:
    direction = Direction(torch.randn(8)).normalized()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            Ablation.uniform(direction, 2, bad)


# --- prompts longer than the model reads ------------------------------------------------------


def test_context_limit_is_the_smallest_known_and_capped(
    make_model: Callable[[str], Any], tokenizer: Any
) -> None:
    model = make_model("qwen2")  # max_position_embeddings = 256
    assert context_limit(model, tokenizer)[0] == 256
    tokenizer.model_max_length, saved = 100, tokenizer.model_max_length
    try:
        assert context_limit(model, tokenizer) == (100, "the tokenizer's model_max_length")
    finally:
        tokenizer.model_max_length = saved
    model.config.max_position_embeddings = 10**9
    assert context_limit(model, tokenizer)[0] == MAX_PROMPT_TOKENS


def test_a_huge_prompt_is_refused_before_any_forward_pass(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    prompts = tmp_path / "harm.txt"
    prompts.write_text("Pick a lock.\nBake bread.\n" + "word " * 40_000 + "\nLast one.\n")
    forwards: list[int] = []
    monkeypatch.setattr("abliterate.commands.choice.collect_activations",
                        lambda *a, **k: forwards.append(1))  # fmt: skip
    out = tmp_path / "out"
    argv = ["run", "--model", str(tiny_model_dir), "--out", str(out), "--harmful", str(prompts),
            *TINY]  # fmt: skip
    msg = one_error(argv, capsys)
    assert f"prompt 3 of {prompts}" in msg and "tokens long" in msg and "256" in msg
    assert "max_position_embeddings" in msg
    assert forwards == [] and not out.exists()


# --- devices ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "meta"])
def test_bad_devices_fail_before_anything_loads(
    tmp_path: Path, tiny_model_dir: Path, device: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    loads: list[str] = []
    monkeypatch.setattr("abliterate.commands.run.load_prompt_sets",
                        lambda config: loads.append("prompts"))  # fmt: skip
    for command in (["run", "--model", str(tiny_model_dir)], ["evaluate", str(tiny_model_dir)]):
        msg = one_error([*command, "--out", str(tmp_path / "o"), "--device", device], capsys)
        assert f"--device '{device}'" in msg
    assert loads == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line() -> None:
    with pytest.raises(ConfigError, match="has no cuda device"):
        resolve_device("cuda")
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") in ("cpu", "mps")


# --- prompt files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.parquet", b"prompt\nhello\n", "not a readable Parquet file"),
        ("p.json", b'[{"prompt": "a"}, "b"]', "element 2 of .* is a string but element 1 is an"),
        ("p.json", b'["a", {"prompt": "b"}]', "element 2 of .* is an object but element 1 is a"),
        ("p.json", b"[1, 2]", "element 1 of .* is a number"),
        ("p.json", b'[{"prompt": NaN}]', "'prompt' is a number, not a string"),
        ("p.jsonl", b'"a"\n\n{"prompt": "b"}\n', "line 3 of .* is an object but line 1"),
        ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n\n{"prompt": \n', "line 4, column"),
        ("p.jsonl", b'{"prompt": "a"}\n{"prompt": ["x"]}\n', "line 2 of .*'prompt' is a list"),
        ("p.txt", "caf\u00e9\n".encode("latin-1"), r"not UTF-8 text \(byte 0xe9 at offset 3\)"),
        ("p.csv", b"prompt\n\xff\xfe\n", "not UTF-8 text"),
        ("p.json", b"[" * 100_000, "nested too deeply|cannot parse"),
    ],
)
def test_malformed_prompt_files_are_one_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PromptSetError, match=message):
        load_prompts(str(path))


def test_jsonl_line_numbers_count_every_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    # U+2028 is legal inside a JSON string; it must neither split a line nor shift numbers.
    path.write_text('{"prompt": "one\u2028two"}\n{"prompt": "b"}\n{"prompt": }\n', "utf-8")
    with pytest.raises(PromptSetError, match="line 3, column"):
        load_prompts(str(path))
    path.write_text('{"prompt": "one\u2028two"}\n', "utf-8")
    assert load_prompts(str(path)).prompts == ("one\u2028two",)


# --- chat ---------------------------------------------------------------------------------------


def test_chat_with_stdin_closed_ends_cleanly_without_loading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from abliterate.commands import chat as chat_mod
    from abliterate.config import ChatConfig

    monkeypatch.setattr(sys, "stdin", None)
    monkeypatch.setattr(chat_mod, "load_sides", lambda config: pytest.fail("models loaded"))
    assert chat_mod.chat(ChatConfig(model="demo"), interactive=False) == 0


def test_chat_with_a_malformed_record_is_one_line_before_loading(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    model = _copy(tiny_model_dir, tmp_path / "edited")
    loads: list[str] = []
    monkeypatch.setattr("abliterate.commands.chat.load_model",
                        lambda name, **k: loads.append(name))  # fmt: skip
    for record in ("{not json", "[1, 2]", '{"base_model": "x"}', '{"base_model": {"name": 3}}'):
        (model / "abliteration.json").write_text(record)
        msg = one_error(["chat", str(model)], capsys)
        assert "abliteration.json" in msg and "--baseline" in msg
    assert loads == []


def test_chat_refuses_a_turn_longer_than_the_context(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from abliterate.commands import chat as chat_mod
    from abliterate.config import ChatConfig

    side = chat_mod.ChatModel("tiny", load_model(str(tiny_model_dir), device="cpu"))
    lines = iter(["word " * 5000, "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    config = ChatConfig(model=str(tiny_model_dir), max_new_tokens=2)
    assert chat_mod.chat(config, interactive=False, sides=[side]) == 0
    assert "it was not sent" in capsys.readouterr().out
    assert side.history == []


# --- judges -------------------------------------------------------------------------------------


def test_classifier_with_only_pickled_weights_is_refused_unread(
    tmp_path: Path, classifier_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from abliterate.eval.judges import ClassifierJudge

    pickled = _copy(classifier_dir, tmp_path / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was unpickled"))
    with pytest.raises(JudgeError, match=r"no \.safetensors weights"):
        ClassifierJudge.load(str(pickled), device="cpu")


def test_classifier_is_loaded_with_safetensors_only(
    classifier_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForSequenceClassification

    from abliterate.eval.judges import ClassifierJudge

    seen: dict[str, Any] = {}
    real = AutoModelForSequenceClassification.from_pretrained

    def spy(source: str, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(source, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", spy)
    ClassifierJudge.load(str(classifier_dir), device="cpu")
    assert seen.get("use_safetensors") is True


def test_an_unreachable_endpoint_fails_before_any_answer(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    loads: list[str] = []
    monkeypatch.setattr("abliterate.commands.evaluate.load_model",
                        lambda name, **k: loads.append(name))  # fmt: skip
    argv = ["evaluate", str(tiny_model_dir), "--out", str(tmp_path / "o"),
            "--judge", "markers,llm:http://127.0.0.1:9/v1#judge"]  # fmt: skip
    msg = one_error(argv, capsys)
    assert "unreachable" in msg and loads == []


# --- stage logs ---------------------------------------------------------------------------------


def test_a_failed_stage_is_logged_as_failed(caplog: pytest.LogCaptureFixture) -> None:
    stages = Stages()
    with caplog.at_level(logging.INFO, logger="abliterate"):
        with stages.stage("good"):
            pass
        with pytest.raises(KeyError), stages.stage("bad"):
            raise KeyError("x")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("good done in") for m in messages), messages
    assert any(m.startswith("bad failed after") for m in messages), messages
    assert not any(m.startswith("bad done") for m in messages)


# --- the same prompts as harmful and harmless ---------------------------------------------------


def test_identical_training_sets_are_one_line_for_every_way_of_choosing(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    same = tmp_path / "same.txt"
    same.write_text("\n".join(f"How do I do thing {i}?" for i in range(4)) + "\n")
    for choice in ([], ["--optimize", "--trials", "2"], ["--layer", "2"]):
        out = tmp_path / "out"
        argv = ["run", "--model", str(tiny_model_dir), "--out", str(out), "--harmful", str(same),
                "--harmless", str(same), *TINY, *choice]  # fmt: skip
        assert "identical activations" in one_error(argv, capsys)
        assert not out.exists()
