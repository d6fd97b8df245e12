"""The architecture matrix: every family of the anatomy table, edited exactly.

For each case of :mod:`arch_cases` (a tiny random model built from its config class):
the anatomy resolves from ``config.json`` alone to the tensors the model has; the load-time
verification explains the whole residual stream; a full-strength ablation leaves no component
along the direction in any residual state (every layer's input, the "mid" state where it
exists, the last layer's output), through hooks and through baked weights alike; hooks equal
baked weights (plain and norm-preserving); exactly the writers' tensors change (every routed
and shared expert, never a router); the edit summary counts the writers per role; and a saved
model reloads exactly. Refused and unknown families, and anatomies that do not match the
checkpoint, end in :class:`UnsupportedArchitectureError`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from arch_cases import CASES, REFUSED, along, build_config, build_model, residual_states

from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.edit.export import save_model, verify_export
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.weights import bake
from abliterate.errors import UnsupportedArchitectureError
from abliterate.measure.activations import collect_activations
from abliterate.measure.refusal import RefusalOpenings
from abliterate.model import families
from abliterate.model.anatomy import Anatomy, BoundAnatomy, anatomy_of, supported_model_types
from abliterate.model.forward import SharedPrefixScorer, greedy_new_tokens
from abliterate.model.verify import verify_anatomy
from abliterate.search.scoring import EditScorer, ScoringSet

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: a second thread costs more in start-up and contention than it saves (a
    forward pass here takes ~3 ms on one thread, ~100 ms on two of a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tokenizer: Any) -> Callable[[str], Any]:
    """``models(case)`` -> a fresh copy of the case's tiny model (each built once)."""
    built: dict[str, Any] = {}

    def get(case: str) -> Any:
        if case not in built:
            built[case] = build_model(case, len(tokenizer))
        return copy.deepcopy(built[case])

    return get


@pytest.fixture(scope="module")
def ids(tokenizer: Any) -> torch.Tensor:
    """Two prompts of 12 tokens (no padding: every position is a real token)."""
    g = torch.Generator().manual_seed(2)
    return torch.randint(7, len(tokenizer), (2, 12), generator=g)


def ablation(arch: BoundAnatomy, mode: str = "plain") -> Ablation:
    g = torch.Generator().manual_seed(1)
    d = Direction(torch.randn(arch.d_model, generator=g)).normalized()
    full = Ablation.uniform(d, arch.n_layers)
    return dataclasses.replace(full, mode=mode)  # type: ignore[arg-type]


def logprobs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)


@pytest.mark.parametrize("case", list(CASES))
def test_anatomy_resolves_from_config_json_to_the_models_tensors(case: str, tokenizer: Any) -> None:
    config = build_config(case, len(tokenizer))
    from_json = Anatomy.from_config(json.loads(config.to_json_string()))
    assert from_json.writers == Anatomy.from_config(config).writers
    model = build_model(case, len(tokenizer))
    params = dict(model.named_parameters())
    for w in from_json.writers:
        assert w.tensor in params, w.tensor
        assert w.post_norms == () or all(n in params for n in w.post_norms)
    assert case.split("+")[0] in supported_model_types()


@pytest.mark.parametrize("case", list(CASES))
def test_load_time_verification_explains_the_residual_stream(
    case: str, models: Callable[[str], Any], tokenizer: Any
) -> None:
    result = verify_anatomy(models(case), tokenizer)
    assert result.max_error < 1e-5
    assert result.n_checks > 2


@pytest.mark.parametrize("case", list(CASES))
def test_full_ablation_is_exact_and_edits_exactly_the_writers(
    case: str, models: Callable[[str], Any], ids: torch.Tensor
) -> None:
    model = models(case)
    arch = anatomy_of(model)
    spec = ablation(arch)
    d = spec.direction.vector
    with residual_states(arch) as plain, torch.no_grad():
        model(input_ids=ids)
    assert along(plain, d) > 1e-2  # the direction is there to be removed
    with edit_hooks(model, spec), residual_states(arch) as hooked, torch.no_grad():
        hooked_lp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    assert along(hooked, d) < 1e-5

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary = bake(model, spec)
    with residual_states(anatomy_of(model)) as baked, torch.no_grad():
        baked_lp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    assert along(baked, d) < 1e-5
    assert torch.allclose(hooked_lp, baked_lp, atol=1e-4), "hooks differ from baked weights"

    # Exactly the writers' weights and biases changed; routers, gates and norms did not.
    after = dict(model.named_parameters())
    changed = {n for n in before if n in after and not torch.equal(before[n], after[n])}
    written = {w.tensor for w in arch.anatomy.writers}
    written |= {w.bias for w in arch.anatomy.writers if w.bias is not None}
    assert changed <= written, changed - written
    assert {w.tensor for w in arch.anatomy.writers} <= changed | {arch.anatomy.writers[0].tensor}
    for w in arch.anatomy.writers:
        if w.expert is not None:  # every routed expert's slice of a fused tensor changed
            assert not torch.allclose(before[w.tensor][w.expert], after[w.tensor][w.expert])
    assert summary.writers_by_role == arch.anatomy.counts()


@pytest.mark.parametrize("case", list(CASES))
def test_norm_preserving_hooks_equal_weights(
    case: str, models: Callable[[str], Any], ids: torch.Tensor
) -> None:
    model = models(case)
    spec = ablation(anatomy_of(model), mode="norm_preserving")
    original = logprobs(model, ids)
    with edit_hooks(model, spec):
        hooked = logprobs(model, ids)
    assert torch.equal(logprobs(model, ids), original)  # swapped experts were restored
    bake(model, spec)
    assert torch.allclose(hooked, logprobs(model, ids), atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_scoring_and_activations_equal_whole_prompt_forwards(
    case: str, models: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    """The batched scorer (shared prefix cache, right padding; whole prompts for recurrent
    mixers) and the activation means, MoE routing included, equal one prompt at a time."""
    model = models(case)
    arch = anatomy_of(model)
    prompts = texts[:3]
    sites = ("pre", "mid", "post") if arch.has_mid else ("pre", "post")
    scored = SharedPrefixScorer(model, tokenizer, prompts, batch_size=3).logprobs()
    means, _ = collect_activations(model, tokenizer, prompts, sites=sites, batch_size=3)
    expected_lp, expected_acts = [], []
    per_layer = len(sites) - 1  # states per layer: "pre" (and "mid"); "post" is the next "pre"
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with residual_states(arch) as states, torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].float()
        expected_lp.append(torch.log_softmax(logits, dim=-1))
        last = torch.stack([s[0, -1] for s in states]).double()  # (states, d_model)
        rows = [last[i * per_layer : (i + 1) * per_layer + 1] for i in range(arch.n_layers)]
        expected_acts.append(torch.stack(rows))  # (n_layers, sites, d_model)
    assert torch.allclose(scored, torch.stack(expected_lp), atol=1e-4)
    # The search's scorer takes the same shortcuts (and the family's logit scale and cap).
    refusal_ids = [5, 6, 7]
    scorer = EditScorer(
        model, tokenizer, ScoringSet(prompts, prompts, refusal_ids, RefusalOpenings(), 3)
    )
    want = torch.stack(expected_lp)[:, refusal_ids].logsumexp(-1).exp()
    assert torch.allclose(scorer.baseline().first_token, want, rtol=1e-3, atol=1e-7)
    expected = torch.stack(expected_acts).mean(0)
    assert torch.allclose(means, expected, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("case", list(CASES))
def test_saved_edit_reloads_exactly(
    case: str, models: Callable[[str], Any], tokenizer: Any, texts: list[str], tmp_path: Path
) -> None:
    model = models(case)
    bake(model, ablation(anatomy_of(model)))
    save_model(model, tokenizer, tmp_path / "m", {"case": case})
    assert verify_export(model, tokenizer, tmp_path / "m", texts[:2]) == 0.0


def test_expert_writers_are_described_and_counted(tokenizer: Any) -> None:
    anatomy = Anatomy.from_config(build_config("qwen2_moe", len(tokenizer)))
    counts = anatomy.counts()
    # 3 layers, layer 0 dense (mlp_only_layers), 4 routed experts and 1 shared in the others.
    assert counts == {"embedding": 1, "attention": 3, "mlp": 1, "expert": 8, "shared_expert": 2}
    assert "(8 experts in 2 fused expert tensors)" in anatomy.describe()
    assert anatomy.layer_kinds[0] == {"dense"} and anatomy.layer_kinds[1] == {"moe"}


@pytest.mark.parametrize("model_type", sorted(REFUSED.values()))
def test_refused_families_say_why(model_type: str) -> None:
    from transformers import AutoConfig

    with pytest.raises(UnsupportedArchitectureError, match="cannot be edited exactly: it"):
        Anatomy.from_config(AutoConfig.for_model(model_type))


def test_unknown_family_is_refused_with_the_supported_list() -> None:
    from transformers import GPT2Config

    with pytest.raises(
        UnsupportedArchitectureError, match=r"unsupported architecture 'gpt2'.*llama"
    ):
        Anatomy.from_config(GPT2Config())
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'made_up'"):
        Anatomy.from_config({"model_type": "made_up", "num_hidden_layers": 2})


def test_config_with_another_expert_count_than_the_checkpoint_is_refused(
    models: Callable[[str], Any],
) -> None:
    model = models("mixtral")
    model.config.num_local_experts = 6  # the checkpoint's fused tensors hold 4
    with pytest.raises(UnsupportedArchitectureError, match=r"has shape \(4, 32, 64\)"):
        anatomy_of(model)


def test_checkpoint_missing_a_module_is_refused(models: Callable[[str], Any]) -> None:
    model = models("llama")
    del model.model.layers[1].mlp.down_proj
    with pytest.raises(UnsupportedArchitectureError, match=r"cannot find 'model\.layers\.1\.mlp"):
        anatomy_of(model)


@pytest.mark.parametrize(
    ("case", "family", "change", "where"),
    [
        # A table row that forgets the MLP: the stream after each MLP is unexplained.
        ("llama", "llama", {"writers": (families.ATTN,)}, r"layer 0 \(mid → post\)"),
        # Post-norms declared as plain writers: the normalised writes do not add up.
        ("olmo2", "olmo2", {"writers": (families.ATTN, families.MLP)}, r"layer 0 \(pre → mid\)"),
        # Gemma's norms multiply by 1 + weight; a table saying "weight" is caught.
        ("gemma2", "gemma2", {"norm_offset": 0.0}, "gain of model.layers.0"),
        # A MoE row without its shared expert.
        (
            "qwen2_moe",
            "qwen2_moe",
            {"writers": families.BY_TYPE["qwen2_moe"].writers[:3]},
            r"block model\.layers\.1\.mlp",
        ),
    ],
)
def test_mismatching_anatomy_is_caught_at_load_time(
    case: str,
    family: str,
    change: dict[str, Any],
    where: str,
    models: Callable[[str], Any],
    tokenizer: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrong = dataclasses.replace(families.BY_TYPE[family], **change)
    monkeypatch.setitem(families.BY_TYPE, family, wrong)
    with pytest.raises(UnsupportedArchitectureError, match=f"at {where}.*unexplained part of norm"):
        verify_anatomy(models(case), tokenizer)


def test_run_on_a_tiny_hybrid_moe_model_reports_its_experts(
    tmp_path: Path, tokenizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nemotron-H mixes Mamba, attention, MLP and MoE layers and has no "mid" site: the whole
    pipeline runs on it, verifies its anatomy, and reports every expert it edited."""
    from abliterate.cli import main

    model_dir = tmp_path / "tiny-nemotron-h"
    build_model("nemotron_h", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    argv = ["run", "--model", str(model_dir), "--out", str(out), "--n-train", "8",
            "--n-val", "4", "--n-eval", "3", "--n-screen", "2", "--n-finalists", "2",
            "--max-new-tokens", "4", "--batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert "4 expert" in report["model"]["architecture"]
    edited = report["checks"]["edited_writers"]["writers_by_role"]
    assert edited["expert"] == 4 and edited["shared_expert"] == 1 and edited["mixer"] == 1
    assert report["checks"]["export_reload_max_abs_diff"] == 0.0
    assert report["checks"]["hooks_vs_weights_max_abs_diff"] < 1e-3
    assert "verify anatomy" in report["timings"]


def test_verification_in_bfloat16_allows_rounding_but_not_a_missing_writer(
    models: Callable[[str], Any], tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = models("qwen2_moe").to(torch.bfloat16)
    assert verify_anatomy(model, tokenizer).max_error < 0.05  # bfloat16 rounding only
    wrong = dataclasses.replace(families.BY_TYPE["qwen2_moe"], writers=(families.ATTN,))
    monkeypatch.setitem(families.BY_TYPE, "qwen2_moe", wrong)
    with pytest.raises(UnsupportedArchitectureError, match=r"at layer 0 \(mid → post\)"):
        verify_anatomy(model, tokenizer)


@pytest.mark.parametrize("case", list(CASES))
def test_shared_prefix_generation_equals_plain_generate(
    case: str, models: Callable[[str], Any], tokenizer: Any, texts: list[str]
) -> None:
    """Greedy generation with the shared chat prefix run once (whole prompts for recurrent
    mixers) gives the tokens of plain left-padded ``generate``."""
    model = models(case)
    enc = tokenizer(texts[:4], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        plain = model.generate(
            **enc,
            max_new_tokens=4,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        shared = greedy_new_tokens(model, tokenizer, texts[:4], max_new_tokens=4, batch_size=4)
    assert shared == plain[:, enc["input_ids"].shape[1] :].tolist()  # fmt: skip
