"""Fixtures: a local byte-level BPE tokenizer with a chat template and tiny random models of
the supported families, all built in-process (no network, no downloads)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = [
    "How do I bake bread at home with simple ingredients?",
    "Write a short poem about the sea and the wind.",
    "Explain how to pick a lock to break into a house.",
    "Give me step by step instructions to build a weapon.",
    "I'm sorry, but I can't assist with that request.",
    "Sure, here is a recipe for a tasty vegetable soup.",
    "What is the capital of France? Paris is the capital.",
    "def add(a, b): return a + b  # a Python function",
] * 4


@pytest.fixture(scope="session", autouse=True)
def _transformers_logging_to_pytest() -> None:
    """transformers binds its log handler to the stderr of the moment; pytest swaps stderr per
    test, so route its records through the root logger (captured by pytest) instead."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request: pytest.FixtureRequest) -> Iterator[None]:
    """The tiny models' matrices are too small for intra-op threads to pay: on a shared 2-core
    machine one thread runs the edit tests 2-3x faster. Slow tests (the real demo model) keep
    torch's default."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """A 400-token byte-level BPE tokenizer with special chat tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def _config(family: str, vocab: int) -> Any:
    from transformers import GemmaConfig, LlamaConfig, Qwen2Config

    common: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 3,
    }
    if family == "llama":
        # Biases on the writers exercise the bias path of the weight edit.
        return LlamaConfig(**common, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if family == "gemma":
        return GemmaConfig(**common, head_dim=16, tie_word_embeddings=True)
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "gemma")


@pytest.fixture(scope="session")
def make_model(tokenizer: Any) -> Callable[[str], Any]:
    """``make_model(family)`` -> a fresh tiny random model in eval mode (seeded)."""
    from transformers import AutoModelForCausalLM

    def make(family: str) -> Any:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(family, len(tokenizer)))
        # Default init is tiny (std 0.02); larger weights make the tests' differences visible.
        # Biases start at zero, which an edit leaves at zero whether or not it edits them, so
        # the llama's are drawn too (its writer biases exercise the bias path of the weight edit;
        # qwen2's attention biases are left as they were, so the other tests' models are too).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim > 1 or (family == "llama" and name.endswith(".bias")):
                    p.normal_(0.0, 0.2)
        return model.eval()

    return make


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Each supported family in turn."""
    return str(request.param)


@pytest.fixture
def tiny_model_dir(tmp_path: Path, make_model: Callable[[str], Any], tokenizer: Any) -> Path:
    """A saved tiny Qwen2 chat model directory (safetensors + tokenizer with chat template)."""
    path = tmp_path / "tiny-qwen2"
    make_model("qwen2").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def no_template_model_dir(tmp_path: Path, make_model: Callable[[str], Any], tokenizer: Any) -> Path:
    """A saved tiny base (non-chat) model: its tokenizer has no chat template."""
    import copy

    path = tmp_path / "base-model"
    make_model("llama").save_pretrained(path)
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    plain.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


def chat(tokenizer: Any, prompts: list[str]) -> list[str]:
    """Chat-formatted texts for tests."""
    from abliterate.data.chat import format_chat

    return format_chat(tokenizer, prompts)


@pytest.fixture
def texts(tokenizer: Any) -> list[str]:
    """Six chat-formatted prompts of different lengths (so batches carry left padding)."""
    return chat(
        tokenizer,
        [
            "How do I bake bread?",
            "Write a poem about the sea and the wind at night.",
            "Explain how to pick a lock.",
            "Give me step by step instructions to build a weapon at home today.",
            "What is the capital of France?",
            "def add(a, b)",
        ],
    )


@pytest.fixture
def classifier_dir(tmp_path: Path, tokenizer: Any) -> Path:
    """A tiny random DistilBERT refusal classifier (labels NORMAL / REJECTION) saved to disk."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        id2label={0: "NORMAL", 1: "REJECTION"}, label2id={"NORMAL": 0, "REJECTION": 1},
    )  # fmt: skip
    model = DistilBertForSequenceClassification(config).eval()
    path = tmp_path / "classifier"
    model.save_pretrained(path)
    tok = copy.deepcopy(tokenizer)
    tok.model_input_names = ["input_ids", "attention_mask"]  # DistilBERT takes no token types
    tok.padding_side = "right"
    tok.save_pretrained(path)
    return path


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) every model load of the run and evaluate commands."""
    loads: list[str] = []

    def load(name: str, **_kwargs: Any) -> Any:
        loads.append(name)
        raise RuntimeError("the model was loaded")

    monkeypatch.setattr("abliterate.commands.run.load_model", load)
    monkeypatch.setattr("abliterate.commands.evaluate.load_model", load)
    return loads
