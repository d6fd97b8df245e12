"""Prompt sets: built-in splits, file loaders, column detection and chat formatting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from abliterate.data.chat import batches, format_chat
from abliterate.data.prompts import builtin, load_prompts
from abliterate.errors import ChatTemplateError, PromptSetError


def test_builtin_sets_have_disjoint_fixed_splits() -> None:
    for kind in ("harmful", "harmless"):
        splits = {s: builtin(kind, s) for s in ("train", "val", "eval")}  # type: ignore[arg-type]
        assert sum(len(s) for s in splits.values()) >= 256
        assert len(splits["val"]) >= 64 and len(splits["eval"]) >= 64
        seen = [set(s.prompts) for s in splits.values()]
        assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
        # Fixed splits: the content hash of the eval split is part of every run's record.
        assert builtin(kind, "eval").sha256 == splits["eval"].sha256
    assert len(builtin("over_refusal")) >= 100
    assert len(set(builtin("harmful").categories or ())) >= 10


def test_loaders_read_every_format(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first prompt\n\n  second prompt  \n")
    rows = [{"instruction": "first prompt", "output": "x"}, {"instruction": "second prompt"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "a.csv").write_text("id,Goal\n1,first prompt\n2,second prompt\n")
    (tmp_path / "a.json").write_text(json.dumps(["first prompt", "second prompt"]))
    pq.write_table(pa.table({"text": ["first prompt", "second prompt"]}), tmp_path / "a.parquet")
    for name in ("a.txt", "a.jsonl", "a.csv", "a.json", "a.parquet"):
        ps = load_prompts(str(tmp_path / name))
        assert ps.prompts == ("first prompt", "second prompt"), name


def test_explicit_and_unknown_columns(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("q,other\nwhat is up,zzz\n")
    assert load_prompts(str(tmp_path / "a.csv"), column="other").prompts == ("zzz",)
    with pytest.raises(PromptSetError, match=r"no column 'nope'.*q, other"):
        load_prompts(str(tmp_path / "a.csv"), column="nope")
    with pytest.raises(PromptSetError, match="--prompt-column"):
        load_prompts(str(tmp_path / "a.csv"))


def test_bad_prompt_files(tmp_path: Path) -> None:
    with pytest.raises(PromptSetError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PromptSetError, match="empty"):
        load_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "a.xml").write_text("<x/>")
    with pytest.raises(PromptSetError, match="unsupported prompt file type"):
        load_prompts(str(tmp_path / "a.xml"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(PromptSetError, match="cannot parse"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(PromptSetError, match="ORG/NAME"):
        load_prompts("hf:noslash")


def test_chat_formatting_and_left_padding(tokenizer: Any) -> None:
    texts = format_chat(tokenizer, ["hi", "a much longer prompt here"], system_prompt="Be brief.")
    assert texts[0] == "<|system|>Be brief.</s><|user|>hi</s><|assistant|>"
    ((idx_a, enc_a),) = list(batches(tokenizer, texts, batch_size=2))
    assert sorted(idx_a) == [0, 1]
    # Left padding: every row ends with its last real token, padding sits at the start.
    assert bool(enc_a["attention_mask"][:, -1].all())
    assert not bool(enc_a["attention_mask"][:, 0].all())


def test_missing_chat_template(tokenizer: Any) -> None:
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        format_chat(plain, ["hi"])


def test_builtin_prefixes_are_stratified_by_category() -> None:
    from importlib import resources

    for kind in ("harmful", "harmless"):
        path = resources.files("abliterate.data") / "prompt_data" / f"{kind}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        for split in ("train", "val", "eval"):
            full = builtin(kind, split)  # type: ignore[arg-type]
            n_categories = len(set(full.categories or ()))
            assert n_categories == 12
            # The first n_categories prompts hold one of each category.
            assert len(set(full.head(n_categories).categories or ())) == n_categories
            # Interleaving only reorders the file's split.
            assert sorted(full.prompts) == sorted(r["prompt"] for r in rows if r["split"] == split)


def test_harmless_validation_and_evaluation_cover_real_instruction_styles() -> None:
    styles = {
        "advice", "multi_part", "code_write", "code_fix", "code_explain", "formatting",
        "rewriting", "creative_writing", "roleplay", "summarize_extract",
        "non_english_european", "non_english_asian",
    }  # fmt: skip
    val, evaluation = builtin("harmless", "val"), builtin("harmless", "eval")
    assert set(val.categories or ()) == set(evaluation.categories or ()) == styles
    # Validation costs stay those of the short questions: the same 32 prompts a trial.
    assert len(val) == 72 and len(evaluation) == 96
    # Code to fix and passages to summarise come inside the prompt, as users paste them.
    pasted = [p for p, c in zip(val.prompts, val.categories or (), strict=True) if c == "code_fix"]
    assert all("\n" in p for p in pasted)
    # Scripts of the non-English requests: Latin with accents, Cyrillic, CJK, Hangul, Devanagari.
    text = "".join(evaluation.prompts + val.prompts)
    for lo, hi in [(0x400, 0x4FF), (0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7AF),
                   (0x900, 0x97F)]:  # fmt: skip
        assert any(lo <= ord(ch) <= hi for ch in text), hex(lo)
    assert all(w in text for w in ("Kannst du", "Peux-tu", "¿Cuáles", "Puoi", "Como posso"))


def test_harmless_training_prompts_are_the_short_questions() -> None:
    # The direction's harmless side stays in the style of the harmful prompts (short English
    # requests on 12 topics): a style on one side only would enter the difference of means.
    # The first 128 (the default --n-train) are exactly those of earlier releases.
    train = builtin("harmless", "train")
    assert len(set(train.categories or ())) == 12 and "coding" in (train.categories or ())
    assert (
        train.head(128).sha256 == "477620a0ff15169a3f84f17175148ff947688e21aff3edca91f2b8e14e1523fe"
    )
