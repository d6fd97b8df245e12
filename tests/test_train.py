"""``sft`` and ``heal`` on tiny random models on the CPU: the loss goes down, the merged model is
saved and loads, a run interrupted after a few steps resumes from its last checkpoint and ends
where an uninterrupted run ends, and the self-built preference pairs have the right sides."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from abliterate.cli import main
from abliterate.commands.heal import heal
from abliterate.commands.sft import sft
from abliterate.config import HealConfig, SftConfig
from abliterate.data.prompts import PromptSet
from abliterate.errors import DatasetError, TrainingError
from abliterate.eval.evaluator import Evaluator
from abliterate.eval.judges import MarkerJudge
from abliterate.report.schema import load_report
from abliterate.train import preferences
from abliterate.train.dpo import CutAnswerCollator, end_of_turn_length
from abliterate.train.preferences import Answer, build_pairs, normalize_pair
from abliterate.train.sft import sft_examples
from abliterate.train.trainer import Checkpoints, TrainingProgress, checkpoint_dir

FAST = {
    "device": "cpu",
    "n_eval": 3,
    "max_new_tokens": 6,
    "kl_tokens": 3,
    "batch_size": 8,
    "logging_steps": 1,
    "save_steps": 2,
    "n_heldout": 4,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> dict[str, Path]:
    """A tiny random Qwen2 chat model ("original") and a perturbed copy ("abliterated")."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    root = tmp_path_factory.mktemp("models")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=1, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    paths = {"original": root / "original", "abliterated": root / "abliterated"}
    model.save_pretrained(paths["original"])
    tokenizer.save_pretrained(paths["original"])
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(paths["abliterated"])
    tokenizer.save_pretrained(paths["abliterated"])
    return paths


@pytest.fixture
def sft_data(tmp_path: Path) -> Path:
    rows = [
        {
            "instruction": f"Write a poem about the sea {i}",
            "output": "Sure, here is a recipe for soup.",
        }
        for i in range(24)
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class Interrupt(Exception):
    """Stands for a kill: raised by the progress callback after a given step."""


@pytest.fixture
def interrupt_after(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    def arm(step: int) -> None:
        original = TrainingProgress.on_step_end

        def on_step_end(self: TrainingProgress, args: Any, state: Any, *a: Any, **kw: Any) -> None:
            original(self, args, state, *a, **kw)
            if state.global_step == step:
                monkeypatch.setattr(TrainingProgress, "on_step_end", original)
                raise Interrupt(f"killed after step {step}")

        monkeypatch.setattr(TrainingProgress, "on_step_end", on_step_end)

    return arm


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_sft_lowers_the_loss_and_saves_a_loadable_merged_model(
    tmp_path: Path, models: dict[str, Path], sft_data: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    config = SftConfig(
        model=str(models["original"]), data=str(sft_data), out=out, max_steps=8,
        learning_rate=1e-2, **FAST,
    )  # fmt: skip
    sft(config)
    report = load_report(out / "report.json")
    training = report.training
    assert report.command == "sft" and training is not None
    assert training.steps == 8 and training.n_examples == 20 and training.n_heldout == 4
    assert training.losses[-1].loss < training.losses[0].loss
    assert training.heldout_loss_after < training.heldout_loss_before  # type: ignore[operator]
    assert report.baseline is not None and report.edited.kl_divergence_multi_token is not None
    assert report.edited.kl_divergence_multi_token > 0
    assert report.checks is not None and report.checks.export_reload_max_abs_diff < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (out / "adapter" / "adapter_config.json").is_file()
    record = json.loads((out / "model" / "abliteration.json").read_text())
    assert record["base_model"]["name"] == str(models["original"])
    assert "Fine-tuning report" in (out / "report.md").read_text()
    assert "Training loss" in (out / "report.html").read_text()
    assert not checkpoint_dir(out).exists()  # removed once the run directory is in place


def test_sft_resumes_after_a_kill_and_ends_like_an_uninterrupted_run(
    tmp_path: Path,
    models: dict[str, Path],
    sft_data: Path,
    interrupt_after: Callable[[int], None],
) -> None:
    options = {"model": str(models["original"]), "data": str(sft_data), "max_steps": 6,
               "learning_rate": 1e-2, **FAST}  # fmt: skip
    sft(SftConfig(out=tmp_path / "straight", **options))
    out = tmp_path / "killed"
    interrupt_after(3)
    with pytest.raises(Interrupt):
        sft(SftConfig(out=out, **options))
    assert not out.exists()  # no half-written run directory
    assert (checkpoint_dir(out) / "checkpoint-2").is_dir()
    with pytest.raises(TrainingError, match="learning_rate"):
        sft(SftConfig(out=out, **{**options, "learning_rate": 5e-3}))
    sft(SftConfig(out=out, **options))
    training = load_report(out / "report.json").training
    assert training is not None and training.resumed_from_step == 2 and training.steps == 6
    assert [p.step for p in training.losses] == [1, 2, 3, 4, 5, 6]
    straight, resumed = _adapter(tmp_path / "straight"), _adapter(out)
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-4, atol=1e-5)


def test_full_fine_tuning_has_no_adapter(
    tmp_path: Path, models: dict[str, Path], sft_data: Path
) -> None:
    out = tmp_path / "full"
    sft(SftConfig(model=str(models["original"]), data=str(sft_data), out=out, adapter="full",
                  max_steps=3, learning_rate=1e-3, **FAST))  # fmt: skip
    report = load_report(out / "report.json")
    assert report.training is not None and report.training.adapter == "full"
    assert not (out / "adapter").exists() and (out / "model" / "config.json").is_file()


def test_sft_examples_train_every_assistant_turn(tmp_path: Path) -> None:
    row = {
        "conversations": [
            {"from": "gpt", "value": "An opening with nothing to answer."},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "how are you?"},
            {"from": "gpt", "value": "well"},
        ]
    }
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(row) + "\n")
    examples = list(sft_examples(str(path), None, None, "Be brief."))
    assert [e["completion"][0]["content"] for e in examples] == ["hello", "well"]
    assert examples[1]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert [m["content"] for m in examples[1]["prompt"][1:]] == [
        "An opening with nothing to answer.", "hi", "hello", "how are you?"
    ]  # fmt: skip
    path.write_text(json.dumps({"messages": [{"role": "tool", "content": "x"}]}) + "\n")
    with pytest.raises(DatasetError, match="'tool' turn"):
        list(sft_examples(str(path), None, None, None))


# --- heal ---------------------------------------------------------------------------------


def test_self_built_pairs_have_the_right_sides(
    monkeypatch: pytest.MonkeyPatch, tokenizer: Any
) -> None:
    original, abliterated = object(), object()
    said = {
        # harmless: an answer, the same answer, and a refusal of the original (over-refusal)
        ("original", "harmless"): ["Bread needs flour.", "Paris.", "I can't help with that."],
        ("abliterated", "harmless"): ["Bread needs sand.", "Paris.", "Sure, here it is."],
        # harmful: refused then complied; refused by both; answered by the original already
        ("original", "harmful"): ["I cannot assist with that.", "I can't help.", "Here is how."],
        ("abliterated", "harmful"): ["Step 1: pick the lock.", "I cannot assist.", "Here, how."],
    }

    def fake_answers(model: Any, tok: Any, texts: Any, **kw: Any) -> list[Answer]:
        who = "original" if model is original else "abliterated"
        kind = "harmless" if "harmless" in kw["desc"] else "harmful"
        return [Answer(t, finished=i != 0) for i, t in enumerate(said[who, kind])]

    monkeypatch.setattr(preferences, "answers", fake_answers)
    harmful = PromptSet("h", ("open a lock", "make a weapon", "cook meth"))
    harmless = PromptSet("b", ("bake bread", "capital of France", "a poem"))
    pairs, counts = build_pairs(
        original, abliterated, tokenizer, harmful, harmless, MarkerJudge(),  # type: ignore[arg-type]
        max_new_tokens=8, batch_size=2, system_prompt=None,
    )  # fmt: skip
    assert counts == {
        "harmless": 1, "harmful": 1, "skipped_identical": 1, "skipped_original_refused": 1,
        "skipped_original_complied": 1, "skipped_abliterated_refused": 1,
    }  # fmt: skip
    harmless_pair, harmful_pair = pairs
    assert harmless_pair["prompt"] == [{"role": "user", "content": "bake bread"}]
    assert harmless_pair["chosen"][0]["content"] == "Bread needs flour."  # the original's
    assert harmless_pair["rejected"][0]["content"] == "Bread needs sand."
    assert harmful_pair["chosen"][0]["content"] == "Step 1: pick the lock."  # the compliance
    assert harmful_pair["rejected"][0]["content"] == "I cannot assist with that."
    assert harmless_pair["chosen_truncated"] and harmful_pair["rejected_truncated"]


def test_preference_rows_of_every_shape() -> None:
    implicit = {
        "prompt": "ignored: the conversations carry it",
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
    }
    row = normalize_pair(implicit, "r", "sys")
    assert row["prompt"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}]
    assert row["chosen"] == [{"role": "assistant", "content": "good"}]
    text = normalize_pair({"prompt": "q", "chosen": "good", "rejected": "bad"}, "r", None)
    assert text["prompt"] == [{"role": "user", "content": "q"}]
    assert text["rejected"] == [{"role": "assistant", "content": "bad"}]
    assert not text["chosen_truncated"]
    with pytest.raises(DatasetError, match="no prompt"):
        normalize_pair({"chosen": "a", "rejected": "b"}, "r", None)
    with pytest.raises(DatasetError, match="chosen/rejected"):
        normalize_pair({"prompt": "q", "chosen": "a"}, "r", None)


def test_cut_answers_keep_their_end_of_turn_out_of_the_loss(tokenizer: Any) -> None:
    assert end_of_turn_length(tokenizer) == 1  # "</s>"
    collator = CutAnswerCollator(pad_token_id=1, end_tokens=1)
    examples = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 3], "rejected_ids": [9, 3],
         "chosen_truncated": True, "rejected_truncated": False},
        {"prompt_ids": [5], "chosen_ids": [7, 3], "rejected_ids": [9, 9, 3],
         "chosen_truncated": False, "rejected_truncated": True},
    ]  # fmt: skip
    mask = collator(examples)["completion_mask"].tolist()
    assert mask == [
        [0, 0, 1, 1, 0],  # chosen 0, cut: its end token is not trained
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 1, 1, 0, 0],  # rejected 1, cut
    ]


def test_heal_lowers_its_loss_reports_kl_to_the_original_and_resumes(
    tmp_path: Path, models: dict[str, Path], interrupt_after: Callable[[int], None]
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "heal"
    options = {
        "model": str(models["abliterated"]), "original": str(models["original"]), "out": out,
        "loss": "dpo+sft", "max_steps": 6, "n_pairs": 12, "pair_tokens": 6, "learning_rate": 1e-2,
        **FAST,
    }  # fmt: skip
    interrupt_after(3)
    with pytest.raises(Interrupt):
        heal(HealConfig(**options))
    assert (checkpoint_dir(out) / "preferences.jsonl").is_file()
    heal(HealConfig(**options))
    report = load_report(out / "report.json")
    training = report.training
    assert report.command == "heal" and training is not None and training.method == "dpo"
    assert training.resumed_from_step == 2 and training.steps == 6
    assert "build pairs" not in report.timings  # the resumed run reused the pairs
    assert training.pairs is not None and training.pairs["harmless"] > 0
    assert training.heldout_loss_after < training.heldout_loss_before  # type: ignore[operator]
    assert report.original_model is not None
    assert report.original_model.name == str(models["original"])
    for side in (report.baseline, report.edited):
        assert side is not None and side.kl_divergence is not None and side.kl_divergence > 0
        assert side.kl_by_category  # the built-in harmless prompts have categories
    lines = (out / "preferences.jsonl").read_text().splitlines()
    assert len(lines) == sum(training.pairs[k] for k in ("harmless", "harmful"))
    record = json.loads((out / "model" / "abliteration.json").read_text())
    assert record["base_model"]["name"] == str(models["original"])
    AutoModelForCausalLM.from_pretrained(out / "model")
    assert "Healing report" in (out / "report.md").read_text()


def test_heal_from_a_preference_file(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [
        {"prompt": f"poem {i}", "chosen": "Sure, here is a recipe for soup.", "rejected": "no"}
        for i in range(12)
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "heal"
    generated: list[int] = []
    continuations = Evaluator.continuations

    def counted(self: Evaluator, model: Any) -> list[list[int]]:
        generated.append(1)
        return continuations(self, model)

    monkeypatch.setattr(Evaluator, "continuations", counted)
    heal(HealConfig(model=str(models["abliterated"]), original=str(models["original"]),
                    preferences=str(data), out=out, max_steps=2, loss="dpo", **FAST))  # fmt: skip
    # The original's continuations are generated once, for the KL before and after healing.
    assert len(generated) == 1
    training = load_report(out / "report.json").training
    assert training is not None and training.pairs is None and training.data == str(data)
    assert training.loss_type == ["sigmoid"] and not (out / "preferences.jsonl").exists()


def test_heal_needs_an_original_and_qlora_needs_cuda(
    tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["heal", "--model", str(models["abliterated"]), "--out", str(tmp_path / "o")]) == 2
    assert "records no original model" in capsys.readouterr().err
    args = ["heal", "--model", str(models["abliterated"]), "--original", str(models["original"]),
            "--adapter", "qlora", "--device", "cpu", "--out", str(tmp_path / "q")]  # fmt: skip
    assert main(args) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_checkpoints_refuse_another_run_unless_restarted(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert Checkpoints(out, {"lr": 1}, restart=False).prepare() is None
    (checkpoint_dir(out) / "checkpoint-4").mkdir()
    assert (
        Checkpoints(out, {"lr": 1}, restart=False).prepare() == checkpoint_dir(out) / "checkpoint-4"
    )
    with pytest.raises(TrainingError, match=r"other settings \(lr\)"):
        Checkpoints(out, {"lr": 2}, restart=False).prepare()
    assert Checkpoints(out, {"lr": 2}, restart=True).prepare() is None


def test_a_run_directory_names_the_model_and_its_original(tmp_path: Path) -> None:
    from abliterate.commands.heal import resolve_target
    from abliterate.errors import ConfigError

    original = tmp_path / "original"
    original.mkdir()
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    record = {"base_model": {"name": "org/base", "source": str(original), "revision": None}}
    (model / "abliteration.json").write_text(json.dumps(record))
    target = resolve_target(HealConfig(model=str(tmp_path / "run")))
    assert (target.model, target.original) == (str(model), str(original))
    given = resolve_target(HealConfig(model=str(model), original="demo"))
    assert (given.model, given.original) == (str(model), "demo")
    with pytest.raises(ConfigError, match="--harmful/--harmless"):
        HealConfig(model="m", preferences="p.jsonl", harmful="h.txt")


# --- heal --loss distill ------------------------------------------------------------------


def _distill(models: dict[str, Path], original: str, tmp_path: Path) -> Any:
    """A DistillTrainer on the abliterated model (LoRA at init) with ``original`` as teacher."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abliterate.train.distill import distill_trainer
    from abliterate.train.trainer import lora_config

    student = AutoModelForCausalLM.from_pretrained(models["abliterated"])
    teacher = AutoModelForCausalLM.from_pretrained(models[original])
    tok = AutoTokenizer.from_pretrained(models["abliterated"])
    arguments = {
        "output_dir": str(tmp_path / "ckpt"), "use_cpu": True, "report_to": "none",
        "remove_unused_columns": False, "learning_rate": 1e-2, "max_steps": 6,
        "per_device_train_batch_size": 2, "disable_tqdm": True, "save_strategy": "no",
    }  # fmt: skip
    options = HealConfig(model="m", adapter="lora", lora_r=4, lora_alpha=8)
    return distill_trainer(
        student, teacher, tok, None, None, arguments, max_length=64,  # type: ignore[arg-type]
        peft_config=lora_config(options),
    )  # fmt: skip


def _rows(kind: str | None, n: int = 2) -> list[dict[str, Any]]:
    return [
        {"prompt": [{"role": "user", "content": f"bake bread {i}"}],
         "chosen": [{"role": "assistant", "content": f"Sure, flour and water {i}."}],
         "chosen_truncated": i == 0, "kind": kind}
        for i in range(n)
    ]  # fmt: skip


def test_distill_uses_the_original_on_harmless_rows_and_itself_on_harmful_ones(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    trainer = _distill(models, "original", tmp_path)
    model, collate = trainer.model, trainer.data_collator
    harmful, harmless = collate(_rows("harmful")), collate(_rows("harmless"))
    assert collate(_rows(None))["from_original"].all()  # no kind: the original teaches
    # LoRA at init (B = 0): the student is its own teacher exactly on harmful rows.
    assert trainer.compute_loss(model, harmful).item() == 0.0
    loss = trainer.compute_loss(model, harmless)
    assert loss.item() > 0
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # With the abliterated model as "original", harmless rows have nothing to learn either.
    same = _distill(models, "abliterated", tmp_path)
    assert same.compute_loss(same.model, harmless).item() < 1e-6


def test_distill_answer_mask_leaves_a_cut_answers_end_of_turn_out(
    tmp_path: Path, models: dict[str, Path], tokenizer: Any
) -> None:
    from abliterate.train.distill import DistillCollator

    collate = DistillCollator(tokenizer, max_length=64, end_tokens=end_of_turn_length(tokenizer))
    cut, whole = _rows("harmless")
    ids, mask, original = collate.encode(cut)
    _, full_mask, _ = collate.encode(whole)
    assert original and len(ids) == len(mask) and mask[-1] == 0  # "</s>" of the cut answer
    assert full_mask[-1] == 1 and sum(full_mask) == sum(mask) + 1
    with pytest.raises(DatasetError, match="kind 'other'"):
        collate.encode({**cut, "kind": "other"})


def test_distill_steps_lower_the_loss(tmp_path: Path, models: dict[str, Path]) -> None:
    trainer = _distill(models, "original", tmp_path)
    batch = trainer.data_collator(_rows("harmless", 4) + _rows("harmful", 2))
    before = trainer.compute_loss(trainer.model, batch).item()
    optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], 1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        trainer.compute_loss(trainer.model, batch).backward()
        optimizer.step()
    assert trainer.compute_loss(trainer.model, batch).item() < before


def test_heal_distill_writes_a_healed_model_and_resumes(
    tmp_path: Path, models: dict[str, Path], interrupt_after: Callable[[int], None]
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "heal"
    options = {
        "model": str(models["abliterated"]), "original": str(models["original"]), "out": out,
        "loss": "distill", "max_steps": 6, "n_pairs": 12, "pair_tokens": 6,
        "learning_rate": 1e-2, **FAST,
    }  # fmt: skip
    interrupt_after(3)
    with pytest.raises(Interrupt):
        heal(HealConfig(**options))
    heal(HealConfig(**options))
    report = load_report(out / "report.json")
    training = report.training
    assert training is not None and training.method == "distill" and training.beta is None
    assert training.loss_type == ["forward_kl"] and len(training.losses) == 6
    assert training.resumed_from_step == 2 and training.steps == 6
    assert training.heldout_loss_after < training.heldout_loss_before  # type: ignore[operator]
    for side in (report.baseline, report.edited):
        assert side is not None and side.kl_divergence is not None
    AutoModelForCausalLM.from_pretrained(out / "model")
    with pytest.raises(ValueError, match="needs --adapter lora"):
        HealConfig(**{**options, "adapter": "full"})
