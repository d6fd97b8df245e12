"""Tiny random models of every family in the anatomy table, built from their config classes,
and a probe of every residual state.

Shared by the architecture test matrix (``tests/test_architectures.py``) and the support
table (``scripts/support_table.py``). Each case is a ``model_type`` with the few config keys
it needs to be tiny (2–4 layers, width 32, four experts) and to exercise every kind of layer
the family has (dense and MoE layers, attention and linear-attention/Mamba layers, shared
experts, per-layer inputs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from abliterate.model.anatomy import BoundAnatomy

COMMON: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 256,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 3,
    "tie_word_embeddings": False,
}
MOE: dict[str, Any] = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
MAMBA2: dict[str, Any] = {
    "mamba_n_heads": 8,
    "mamba_d_head": 8,
    "mamba_d_state": 8,
    "mamba_n_groups": 1,
    "mamba_chunk_size": 16,
    "mamba_expand": 2,
    "mamba_d_conv": 4,
}
LINEAR_ATTN: dict[str, Any] = {
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_conv_kernel_dim": 4,
}
DEEPSEEK: dict[str, Any] = {
    **MOE,
    "num_hidden_layers": 3,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "num_key_value_heads": 4,
}


NEMOTRON_H: dict[str, Any] = {
    "mamba_num_heads": 8, "mamba_head_dim": 8, "ssm_state_size": 8, "n_groups": 1,
    "chunk_size": 16, "n_routed_experts": 4, "n_shared_experts": 1, "moe_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "num_experts_per_tok": 2, "n_group": 1,
    "topk_group": 1,
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One tiny model: its ``model_type``, config overrides and what it exercises."""

    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    group: str = "dense"


CASES: dict[str, Case] = {
    # Dense, pre-norm, Llama layout (with biases on llama's writers).
    "llama": Case("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral": Case("mistral"),
    "ministral": Case("ministral"),
    "ministral3": Case("ministral3"),
    "qwen2": Case("qwen2", {"tie_word_embeddings": True}),
    "qwen3": Case("qwen3"),
    "granite": Case("granite", {"residual_multiplier": 0.5, "embedding_multiplier": 3.0}),
    "smollm3": Case("smollm3"),
    "glm": Case("glm"),
    "glm4": Case("glm4", group="post-norm"),
    "ernie4_5": Case("ernie4_5"),
    "exaone4": Case("exaone4", group="post-norm"),
    "seed_oss": Case("seed_oss"),
    "hunyuan_v1_dense": Case("hunyuan_v1_dense"),
    "gemma": Case("gemma", {"tie_word_embeddings": True}),
    "phi3": Case("phi3"),
    "helium": Case("helium"),
    "olmo": Case("olmo"),
    "arcee": Case("arcee"),
    "cwm": Case("cwm"),
    "nemotron": Case("nemotron"),
    "internlm3": Case("internlm3"),
    "starcoder2": Case("starcoder2"),
    "apertus": Case("apertus"),
    "vaultgemma": Case("vaultgemma"),
    # Post-norm: a norm after each writer.
    "gemma2": Case("gemma2", group="post-norm"),
    "gemma3_text": Case("gemma3_text", group="post-norm"),
    "gemma4_text": Case(
        "gemma4_text",
        {
            "num_hidden_layers": 3,
            "hidden_size_per_layer_input": 8,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "global_head_dim": 8,
        },
        group="post-norm",
    ),
    "olmo2": Case("olmo2", group="post-norm"),
    "olmo3": Case("olmo3", group="post-norm"),
    # Parallel blocks.
    "cohere": Case("cohere", group="parallel"),
    "cohere2": Case("cohere2", group="parallel"),
    "phi": Case("phi", group="parallel"),
    "gpt_neox": Case("gpt_neox", {"rotary_pct": 0.5}, group="parallel"),
    "stablelm": Case("stablelm"),  # sequential by default (no "mid" site declared)
    # Mixture of experts.
    "mixtral": Case("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, "moe"),
    "olmoe": Case("olmoe", {"num_experts": 4, "num_experts_per_tok": 2}, "moe"),
    "phimoe": Case("phimoe", {"num_local_experts": 4, "num_experts_per_tok": 2}, "moe"),
    "minimax_m2": Case("minimax_m2", {"num_local_experts": 4, "num_experts_per_tok": 2}, "moe"),
    "flex_olmo": Case("flex_olmo", {"num_experts": 4, "num_experts_per_tok": 2}, "moe"),
    "qwen2_moe": Case(
        "qwen2_moe",
        {
            **MOE,
            "num_hidden_layers": 3,
            "num_experts": 4,
            "shared_expert_intermediate_size": 32,
            "mlp_only_layers": [0],
        },
        "moe",
    ),
    "qwen3_moe": Case(
        "qwen3_moe",
        {**MOE, "num_hidden_layers": 3, "num_experts": 4, "mlp_only_layers": [1]},
        "moe",
    ),
    "granitemoe": Case(
        "granitemoe",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "residual_multiplier": 0.5},
        "moe",
    ),
    "granitemoeshared": Case(
        "granitemoeshared",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "shared_intermediate_size": 32},
        "moe",
    ),
    "deepseek_v2": Case("deepseek_v2", DEEPSEEK, "moe"),
    "deepseek_v3": Case("deepseek_v3", DEEPSEEK, "moe"),
    "glm4_moe": Case(
        "glm4_moe",
        {
            **MOE,
            "num_hidden_layers": 3,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
        },
        "moe",
    ),
    "dots1": Case(
        "dots1",
        {
            **MOE,
            "num_hidden_layers": 3,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
        },
        "moe",
    ),
    "ernie4_5_moe": Case(
        "ernie4_5_moe",
        {
            "num_hidden_layers": 3,
            "moe_num_experts": 4,
            "moe_k": 2,
            "moe_num_shared_experts": 1,
            "moe_intermediate_size": 32,
            "moe_layer_start_index": 1,
            "moe_layer_end_index": 2,
        },
        "moe",
    ),
    "exaone_moe": Case(
        "exaone_moe",
        {
            **MOE,
            "num_hidden_layers": 3,
            "num_experts": 4,
            "num_shared_experts": 1,
            "first_k_dense_replace": 1,
        },
        "moe",
    ),
    "hunyuan_v1_moe": Case(
        "hunyuan_v1_moe", {"num_experts": 4, "moe_topk": 2, "moe_intermediate_size": 32}, "moe"
    ),
    "gpt_oss": Case(
        "gpt_oss",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 32,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        "moe",
    ),
    "llama4_text": Case(
        "llama4_text",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "intermediate_size": 32,
            "intermediate_size_mlp": 64,
            "moe_layers": [1],
            "num_hidden_layers": 2,
        },
        "moe",
    ),
    "gemma4_text+moe": Case(
        "gemma4_text",
        {
            "num_hidden_layers": 2,
            "hidden_size_per_layer_input": 0,
            "enable_moe_block": True,
            "num_experts": 4,
            "top_k_experts": 2,
            "moe_intermediate_size": 32,
            "layer_types": ["sliding_attention", "full_attention"],
            "global_head_dim": 8,
        },
        "moe",
    ),
    # Hybrids: linear attention / state-space mixers next to attention.
    "qwen3_next": Case(
        "qwen3_next",
        {
            **MOE,
            **LINEAR_ATTN,
            "num_hidden_layers": 3,
            "num_experts": 4,
            "shared_expert_intermediate_size": 32,
            "mlp_only_layers": [0],
            "layer_types": ["linear_attention", "full_attention", "linear_attention"],
        },
        "hybrid",
    ),
    "qwen3_5_moe_text": Case(
        "qwen3_5_moe_text",
        {
            **MOE,
            **LINEAR_ATTN,
            "num_experts": 4,
            "shared_expert_intermediate_size": 32,
            "layer_types": ["linear_attention", "full_attention"],
        },
        "hybrid",
    ),
    "qwen3_5_text": Case(
        "qwen3_5_text",
        {**LINEAR_ATTN, "layer_types": ["linear_attention", "full_attention"]},
        "hybrid",
    ),
    "lfm2": Case("lfm2", {"layer_types": ["conv", "full_attention"]}, "hybrid"),
    "falcon_h1": Case(
        "falcon_h1",
        {
            **MAMBA2,
            "mamba_d_ssm": 64,
            "ssm_out_multiplier": 0.5,
            "attention_out_multiplier": 2.0,
            "embedding_multiplier": 3.0,
        },
        "hybrid",
    ),
    "nemotron_h": Case(
        "nemotron_h",
        {**NEMOTRON_H, "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"]},
        "hybrid",
    ),
    "nemotron_h+latent": Case(
        "nemotron_h",
        {**NEMOTRON_H, "layers_block_type": ["moe", "full_attention"], "moe_latent_size": 16},
        "hybrid",
    ),
    "jamba": Case(
        "jamba",
        {
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "mamba_d_state": 8,
            "mamba_dt_rank": 4,
            "mamba_expand": 2,
            "use_mamba_kernels": False,
        },
        "hybrid",
    ),
    "bamba": Case("bamba", {**MAMBA2, "attn_layer_indices": [1]}, "hybrid"),
    "granitemoehybrid": Case(
        "granitemoehybrid",
        {
            **MAMBA2,
            "layer_types": ["linear_attention", "full_attention"],
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "shared_intermediate_size": 32,
        },
        "hybrid",
    ),
    "mamba": Case("mamba", {"state_size": 8, "expand": 2}, "hybrid"),
    "falcon_mamba": Case("falcon_mamba", {"state_size": 8, "expand": 2}, "hybrid"),
}

REFUSED: dict[str, str] = {
    "gemma3n_text": "gemma3n_text",
    "minimax": "minimax",
}
"""Families the table refuses, with the ``model_type`` to build."""


def build_config(case: str, vocab: int) -> Any:
    """The config of ``case`` with a vocabulary of ``vocab`` tokens."""
    from transformers import AutoConfig

    spec = CASES[case]
    return AutoConfig.for_model(spec.model_type, **{**COMMON, "vocab_size": vocab, **spec.config})


def randomize(model: Any, seed: int = 0) -> Any:
    """Weights large enough for differences to show (default init is tiny), and norm gains
    away from 1 so that post-norm gains and their offsets matter; returns the model in eval
    mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "norm" in name and name.endswith("weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def build_model(case: str, vocab: int, seed: int = 0) -> Any:
    """A tiny random causal LM of ``case`` in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(case, vocab))
    return randomize(model, seed)


TEXT_IN_VLM: dict[str, Any] = {**COMMON, "num_hidden_layers": 2}
VISION: dict[str, dict[str, Any]] = {
    "gemma3": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
    "qwen2_5_vl": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                   "out_hidden_size": 32, "patch_size": 4, "window_size": 8,
                   "fullatt_block_indexes": [0]},
    "qwen3_vl": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                 "out_hidden_size": 32, "patch_size": 4, "num_position_embeddings": 16,
                 "deepstack_visual_indexes": [0]},
    "mistral3": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "image_size": 16, "patch_size": 4, "head_dim": 8},
    "gemma4": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
               "patch_size": 4},
    "qwen2_vl": {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2,
                 "mlp_ratio": 2, "patch_size": 4},
    "llama4": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 2, "image_size": 16, "patch_size": 8,
               "vision_output_dim": 32, "projector_input_dim": 32, "projector_output_dim": 32,
               "pixel_shuffle_ratio": 0.5},
}  # fmt: skip
for _qwen in ("qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):
    VISION[_qwen] = VISION["qwen3_vl"]
MROPE: dict[str, Any] = {
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
}
QWEN_VISION_TOKENS: dict[str, Any] = {
    "image_token_id": 10, "video_token_id": 11, "vision_start_token_id": 12,
}  # fmt: skip
MULTIMODAL: dict[str, dict[str, Any]] = {
    "gemma3": {"mm_tokens_per_image": 4, "image_token_index": 10, "boi_token_index": 11,
               "eoi_token_index": 12},
    "qwen2_vl": {**QWEN_VISION_TOKENS, "text": MROPE},
    "qwen2_5_vl": {**QWEN_VISION_TOKENS, "text": MROPE},
    "qwen3_vl": QWEN_VISION_TOKENS,
    "qwen3_vl_moe": {**QWEN_VISION_TOKENS, "text": {**MOE, "num_experts": 4}},
    "qwen3_5": {**QWEN_VISION_TOKENS,
                "text": {**LINEAR_ATTN, "layer_types": ["linear_attention", "full_attention"]}},
    "qwen3_5_moe": {**QWEN_VISION_TOKENS,
                    "text": {**LINEAR_ATTN, **MOE, "num_experts": 4,
                             "shared_expert_intermediate_size": 32,
                             "layer_types": ["linear_attention", "full_attention"]}},
    "llama4": {"image_token_index": 10, "boi_token_index": 11, "eoi_token_index": 12,
               "text": {"num_local_experts": 4, "num_experts_per_tok": 1,
                        "intermediate_size": 32, "intermediate_size_mlp": 64,
                        "moe_layers": [1]}},
    "mistral3": {"image_token_index": 10, "spatial_merge_size": 2},
    "gemma4": {"image_token_id": 10, "audio_config": None,
               "text": {"hidden_size_per_layer_input": 0, "global_head_dim": 8,
                        "layer_types": ["sliding_attention", "full_attention"]}},
}  # fmt: skip
"""Image-text-to-text models: ``model_type`` → top-level config keys (``text``: extra keys
of the language model's config)."""


def build_multimodal(model_type: str, vocab: int, seed: int = 0) -> Any:
    """A tiny random image-text-to-text model (vision tower, projector, language model)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    keys = dict(MULTIMODAL[model_type])
    text = {**TEXT_IN_VLM, "vocab_size": vocab, **keys.pop("text", {})}
    config = AutoConfig.for_model(
        model_type, text_config=text, vision_config=VISION[model_type], **keys
    )
    torch.manual_seed(seed)
    return randomize(AutoModelForImageTextToText.from_config(config), seed)


@contextmanager
def residual_states(arch: BoundAnatomy) -> Iterator[list[torch.Tensor]]:
    """Collects every residual state of a forward pass: each layer's input, its "mid" state
    (where the family has one) and the last layer's output."""
    states: list[torch.Tensor] = []
    handles = []

    def grab(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        states.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def grab_out(_m: Any, _a: Any, out: Any) -> None:
        states.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    for layer, mid in zip(arch.layers, arch.mid_modules, strict=True):
        handles.append(layer.register_forward_pre_hook(grab, with_kwargs=True))
        if mid is not None:
            handles.append(mid.register_forward_pre_hook(grab, with_kwargs=True))
    handles.append(arch.layers[-1].register_forward_hook(grab_out))
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


def along(states: list[torch.Tensor], d: torch.Tensor) -> float:
    """Largest |component along d| relative to the largest state norm."""
    return max(float((s.float() @ d).abs().max() / s.float().norm(dim=-1).max()) for s in states)
