"""``filter-dataset``: marker matching (with the known false positives of topic words), every
row format and container, whole-conversation dropping, ``--invert``, judges, determinism and
bounded memory."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from abliterate.cli import main
from abliterate.commands.filter_dataset import filter_dataset, report_path
from abliterate.config import FilterDatasetConfig
from abliterate.data.conversations import RowSource, RowWriter, conversation, exchanges
from abliterate.errors import DatasetError, JudgeError
from abliterate.eval.markers import EMPTY, MarkerList
from abliterate.report.datasets import FilterReport
from abliterate.train.filtering import filter_rows

# Compliant answers that mention a topic word a naive list would flag. Both lists keep them.
COMPLIANT = [
    "Insider trading is illegal because it exploits information the public does not have.",
    "Harmful algal blooms are caused by nutrient runoff and warm, still water.",
    "Ethical theories include utilitarianism, deontology and virtue ethics.",
    "Ethics is the branch of philosophy that studies right and wrong.",
    "Lock picking is legal in most places if you own the lock; here is how a pin tumbler works.",
    "I'm sorry to hear about your loss. Here are some ways to cope with grief.",
    "The answer is 42. I can't stress enough how useful it is to check your units.",
    "As an aide to the mayor, she handled the press.",
    "To remove the stain, dab it with cold water; it is not harmful to the fabric.",
    "Sure! The chemical reaction is harmless at room temperature.",
]
REFUSALS = [
    "I'm sorry, but I can't help with that request.",
    "I cannot provide instructions for making weapons.",
    "I can't assist with that.",
    "Sorry, but I cannot do this.",
    "I must decline to answer.",
    "Unfortunately, I can't share that information.",
    "**I'm unable** to help with hacking.",
    "That is something I won't help with. I will not provide it.",
]
MORALIZING = [
    "As an AI language model, I don't have personal opinions on that.",
    "Here you go, but I must remind you to use this responsibly.",
    "You can do it, but only in a legal and ethical manner.",
    "I do not condone such behaviour.",
]


@pytest.mark.parametrize("text", COMPLIANT)
def test_compliant_answers_mentioning_topics_are_kept_by_both_lists(text: str) -> None:
    assert MarkerList.shipped("refusal").matches(text) == []
    assert MarkerList.shipped("broad").matches(text) == []


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_flagged_by_both_lists(text: str) -> None:
    assert MarkerList.shipped("refusal").matches(text)
    assert MarkerList.shipped("broad").matches(text)


@pytest.mark.parametrize("text", MORALIZING)
def test_moralizing_is_flagged_by_the_broad_list_only(text: str) -> None:
    assert MarkerList.shipped("broad").matches(text)
    assert MarkerList.shipped("refusal").matches(text) == []


def test_shipped_lists_hold_no_bare_topic_words() -> None:
    for name in ("refusal", "broad"):
        markers = MarkerList.shipped(name)
        for word in ("illegal", "harmful", "ethical", "unethical", "dangerous", "ethics", "legal"):
            assert word not in markers.anywhere and word not in markers.anchored


def test_anchored_markers_match_only_at_the_start() -> None:
    markers = MarkerList("t", [], ["i can't"])
    assert markers.matches("I can't do that.") == ["^i can't"]
    assert markers.matches("Well, I can't believe it is so easy.") == []


def test_matches_are_whole_words_longest_first_and_distinct() -> None:
    markers = MarkerList("t", ["i cannot", "i cannot provide", "as an ai"])
    assert markers.matches("I cannot provide that. I cannot provide it twice.") == [
        "i cannot provide"
    ]
    assert markers.matches("as an aide") == []
    assert markers.matches("<think>I cannot</think> Here it is.") == []
    assert markers.matches("   ") == [EMPTY]


def test_user_marker_file(tmp_path: Path) -> None:
    path = tmp_path / "m.txt"
    path.write_text("# mine\nPurple Monkey\n^nope  # anchored\n\n", encoding="utf-8")
    markers = MarkerList.resolve(str(path))
    assert markers.matches("The *purple* monkey danced.") == ["purple monkey"]
    assert markers.matches("Nope, not today") == ["^nope"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(JudgeError, match="holds no markers"):
        MarkerList.resolve(str(tmp_path / "empty.txt"))
    with pytest.raises(JudgeError, match="cannot read"):
        MarkerList.resolve(str(tmp_path / "missing.txt"))


# --- formats and containers ---------------------------------------------------------------


def _alpaca(answer: str, i: int) -> dict[str, Any]:
    return {"instruction": f"question {i}", "input": "", "output": answer, "id": i}


def _sharegpt(answer: str, i: int) -> dict[str, Any]:
    # The refusal-looking user turn must not flag the row: only assistant turns are judged.
    return {
        "id": i,
        "conversations": [
            {"from": "system", "value": "Be helpful."},
            {"from": "human", "value": "I'm sorry, but I can't sleep. Question?"},
            {"from": "gpt", "value": "Here is a first answer."},
            {"from": "human", "value": f"question {i}"},
            {"from": "gpt", "value": answer},
        ],
    }


def _messages(answer: str, i: int) -> dict[str, Any]:
    return {
        "id": i,
        "messages": [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": "You're welcome."},
        ],
    }


MAKERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages}
ANSWERS = [COMPLIANT[0], REFUSALS[0], COMPLIANT[2], MORALIZING[0], COMPLIANT[5], REFUSALS[3]]
FLAGGED_BROAD = [False, True, False, True, False, True]
FLAGGED_REFUSAL = [False, True, False, False, False, True]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return path


def _read(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if path.suffix == ".json":
        return list(json.loads(path.read_text(encoding="utf-8")))
    import pyarrow.parquet as pq

    return list(pq.read_table(path).to_pylist())


def _run(tmp_path: Path, src: Path, **options: Any) -> tuple[Path, FilterReport]:
    out = tmp_path / f"out{src.suffix}"
    report = filter_dataset(FilterDatasetConfig(dataset=str(src), out=out, **options))
    return out, report


@pytest.mark.parametrize("container", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages"])
def test_each_format_and_container_keeps_the_right_rows(
    tmp_path: Path, fmt: str, container: str
) -> None:
    rows = [MAKERS[fmt](a, i) for i, a in enumerate(ANSWERS)]
    src = _write(tmp_path / f"in.{container}", rows)
    for markers, flagged in (("broad", FLAGGED_BROAD), ("refusal", FLAGGED_REFUSAL)):
        out, report = _run(tmp_path, src, markers=markers, overwrite=True)
        kept = [r for r, f in zip(rows, flagged, strict=True) if not f]
        assert _read(out) == kept
        assert (report.row_format, report.container) == (fmt, container)
        assert report.n_rows == len(rows) and report.n_kept == len(kept)
        assert [e.row for e in report.examples] == [i for i, f in enumerate(flagged) if f]
        turns = 1 if fmt == "alpaca" else 2
        assert report.n_assistant_turns == turns * len(rows)
        assert FilterReport.model_validate_json(report_path(out).read_text()) == report


def test_jsonl_rows_are_written_byte_for_byte(tmp_path: Path) -> None:
    lines = [
        '{"instruction": "a",  "output": "fine"}',
        '{"output":"I cannot assist.","instruction":"b"}',
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    out, _ = _run(tmp_path, src)
    assert out.read_text(encoding="utf-8") == lines[0] + "\n"


def test_parquet_keeps_schema_and_other_columns(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    rows = [dict(_messages(a, i), score=float(i)) for i, a in enumerate(ANSWERS)]
    src = _write(tmp_path / "in.parquet", rows)
    out, _ = _run(tmp_path, src)
    assert pq.read_schema(out) == pq.read_schema(src)
    assert [r["score"] for r in _read(out)] == [0.0, 2.0, 4.0]


def test_a_flagged_turn_drops_the_whole_conversation(tmp_path: Path) -> None:
    row = _messages(COMPLIANT[0], 0)
    row["messages"][3]["content"] = REFUSALS[2]  # only the second answer refuses
    out, report = _run(tmp_path, _write(tmp_path / "in.jsonl", [row, _messages(COMPLIANT[1], 1)]))
    assert [r["id"] for r in _read(out)] == [1]
    assert report.examples[0].response == REFUSALS[2]


def test_invert_keeps_only_flagged_rows(tmp_path: Path) -> None:
    rows = [_alpaca(a, i) for i, a in enumerate(ANSWERS)]
    out, report = _run(tmp_path, _write(tmp_path / "in.jsonl", rows), invert=True)
    assert _read(out) == [r for r, f in zip(rows, FLAGGED_BROAD, strict=True) if f]
    assert report.n_flagged == report.n_kept == 3
    assert all(not e.markers for e in report.examples)  # the dropped rows are the clean ones


def test_counts_per_marker(tmp_path: Path) -> None:
    answers = [REFUSALS[0], REFUSALS[0], "As an AI, I cannot assist with that.", COMPLIANT[0]]
    rows = [_alpaca(a, i) for i, a in enumerate(answers)]
    _, report = _run(tmp_path, _write(tmp_path / "in.jsonl", rows))
    assert report.by_marker == {"i'm sorry, but i": 2, "as an ai": 1, "i cannot assist": 1}
    assert report.n_dropped == 3


def test_output_is_deterministic(tmp_path: Path) -> None:
    rows = [MAKERS["sharegpt"](a, i) for i, a in enumerate(ANSWERS * 5)]
    src = _write(tmp_path / "in.json", rows)
    first, _ = _run(tmp_path, src)
    text = first.read_bytes()
    again, _ = _run(tmp_path, src, overwrite=True, batch_size=7)
    assert again.read_bytes() == text


class _Calls:
    """A judge that flags answers containing 'soup' and records its batch sizes."""

    name = "soup"

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
        self.sizes.append(len(responses))
        return ["soup" in r for r in responses]


def test_judges_see_batches_and_are_counted(tmp_path: Path) -> None:
    answers = ["a soup recipe", COMPLIANT[0], REFUSALS[1], "more soup"] * 3
    src = _write(tmp_path / "in.jsonl", [_alpaca(a, i) for i, a in enumerate(answers)])
    judge = _Calls()
    with RowWriter(tmp_path / "out.jsonl", "jsonl") as writer:
        fmt, stats = filter_rows(
            RowSource.parse(str(src)), writer, fmt=None, markers=None, judges=[judge],
            batch_rows=5,
        )  # fmt: skip
    assert fmt == "alpaca" and judge.sizes == [5, 5, 2]
    assert stats.by_judge == {"soup": 6} and stats.by_marker == {}
    assert [r["output"] for r in _read(tmp_path / "out.jsonl")] == [COMPLIANT[0], REFUSALS[1]] * 3


def test_classifier_judge_from_the_registry(tmp_path: Path, classifier_dir: Path) -> None:
    rows = [_alpaca(a, i) for i, a in enumerate(ANSWERS)]
    src = _write(tmp_path / "in.jsonl", rows)
    spec = f"classifier:{classifier_dir}#REJECTION"
    out, report = _run(tmp_path, src, markers="none", judge=spec, device="cpu")
    name = f"classifier:{classifier_dir}"
    assert report.markers is None and report.judges == [name]
    assert report.by_judge.get(name, 0) == report.n_flagged == report.n_dropped
    assert len(_read(out)) == report.n_kept


def test_hub_rows_stream_to_jsonl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    rows = [_messages(a, i) for i, a in enumerate(ANSWERS)]
    seen: dict[str, Any] = {}

    def fake_load(repo: str, split: str, streaming: bool) -> Any:
        seen.update(repo=repo, split=split, streaming=streaming)
        return datasets.Dataset.from_list(rows).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    out = tmp_path / "kept.jsonl"
    report = filter_dataset(FilterDatasetConfig(dataset="hf:org/chat:test", out=out))
    assert seen == {"repo": "org/chat", "split": "test", "streaming": True}
    assert report.container == "hub" and report.n_kept == 3
    assert [r["id"] for r in _read(out)] == [0, 2, 4]


def test_streaming_memory_is_bounded(tmp_path: Path) -> None:
    """Python allocations stay far below the file size: rows are never all in memory."""
    padding = "lorem ipsum dolor sit amet " * 45  # ~1,200 characters a row
    rows = [_alpaca(a + " " + padding, i) for i, a in enumerate(ANSWERS * 700)]  # 4,200 rows
    for suffix in (".jsonl", ".json", ".parquet"):
        src = _write(tmp_path / f"big{suffix}", rows)
        size = src.stat().st_size
        tracemalloc.start()
        try:
            _, report = _run(tmp_path, src, batch_size=64, overwrite=True, n_examples=5)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert report.n_rows == len(rows) and report.n_kept == len(rows) // 2
        assert size > 4_000_000
        assert peak < size / 4, (suffix, peak, size)  # loading it all would take > size


def test_malformed_rows_and_paths_fail_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _write(tmp_path / "in.jsonl", [_messages("fine", 0), {"messages": "oops"}])
    with pytest.raises(DatasetError, match=r"in.jsonl row 1 has no list 'messages'"):
        _run(tmp_path, src)
    assert not (tmp_path / "out.jsonl").exists()
    assert not list(tmp_path.glob(".out.jsonl*"))  # the partial file is gone
    with pytest.raises(DatasetError, match="never overwritten"):
        filter_dataset(FilterDatasetConfig(dataset=str(src), out=src, overwrite=True))
    with pytest.raises(DatasetError, match=r"name the output .*x\.jsonl"):
        filter_dataset(FilterDatasetConfig(dataset=str(src), out=tmp_path / "x.json"))
    (tmp_path / "odd.jsonl").write_text('{"text": "hello"}\n')
    assert main(["filter-dataset", str(tmp_path / "odd.jsonl"), str(tmp_path / "o.jsonl")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="JSON array"):
        _run(tmp_path, _write_text(tmp_path / "obj.json", '{"rows": []}'))


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_conversation_parsing() -> None:
    turns = conversation(_sharegpt("bye", 3), "sharegpt", "row")
    assert [t.role for t in turns] == ["system", "user", "assistant", "user", "assistant"]
    assert [e.prompt for e in exchanges(turns)] == [
        "I'm sorry, but I can't sleep. Question?",
        "question 3",
    ]
    alpaca = conversation({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca", "r")
    assert alpaca[0].content == "Sum\n\n1 2"
    with pytest.raises(DatasetError, match="must be text"):
        conversation({"messages": [{"role": "user", "content": 3}]}, "messages", "r")


def test_cli_needs_something_to_judge(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["filter-dataset", "a.jsonl", "b.jsonl", "--markers", "none"]) == 2
    assert "needs a --judge" in capsys.readouterr().err
