"""Checkpoints on disk for the streaming tests: tiny mixture-of-experts models, sharded saves
(per-expert as transformers writes them, or fused), and random
checkpoints written shard by shard without ever holding the model in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

MOE_TYPES = ("qwen2_moe", "mixtral")


def moe_config(model_type: str, vocab: int, n_layers: int = 3) -> Any:
    """A tiny config of a mixture-of-experts family (4 experts, 2 per token)."""
    from transformers import AutoConfig

    common: dict[str, Any] = {
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": n_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 3,
        "tie_word_embeddings": False,
    }  # fmt: skip
    if model_type == "qwen2_moe":
        return AutoConfig.for_model(
            "qwen2_moe", **common, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=48, shared_expert_intermediate_size=80, decoder_sparse_step=1,
        )  # fmt: skip
    if model_type == "mixtral":
        return AutoConfig.for_model("mixtral", **common, num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(model_type)


def make_moe(model_type: str, vocab: int) -> Any:
    """A tiny random mixture-of-experts model in eval mode, weights large enough to matter."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(model_type, vocab))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


def save_fused(model: Any, directory: Path) -> None:
    """Save ``model`` with its parameters' own names (fused experts as one tensor each), as
    some checkpoints store them, in two shards."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())},
             "weight_map": weight_map}  # fmt: skip
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_random_checkpoint(
    config: Any, directory: Path, *, dtype: torch.dtype, shard_bytes: int, std: float = 0.02
) -> int:
    """Write a random checkpoint of a dense ``config`` shard by shard (each shard is the only
    thing in memory), with ``model.safetensors.index.json``; returns the bytes written.

    Parameter names and shapes come from the model built on the meta device; norms are 1. One
    random tensor is drawn per distinct shape and reused (so every layer has the same weights):
    drawing gigabytes of normal numbers would take minutes, and what is measured on such a
    checkpoint (memory, time, agreement with the in-memory path) does not depend on it."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    params = list(skeleton.named_parameters())  # tied duplicates are listed once
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, p in params:
        nbytes = p.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(p.shape)))
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    drawn: dict[tuple[int, ...], torch.Tensor] = {}
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=dtype)
            else:
                if shape not in drawn:
                    t = torch.empty(shape, dtype=torch.float32)
                    drawn[shape] = t.normal_(0.0, std, generator=generator).to(dtype)
                tensors[name] = drawn[shape].clone()
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total
