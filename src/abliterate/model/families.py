"""The family table: where each family of decoders keeps its residual writers (data only).

One :class:`Family` row per group of ``model_type`` values that share a layout. A row names
the decoder's modules (relative to the decoder root, e.g. ``model``), and one
:class:`WriterSlot` per kind of residual writer in a layer: its module, parameter, layout,
bias, the norms applied to its output before the residual add, and, for mixture-of-experts
layers, the config key holding the number of experts and the block module whose output sums
the experts' writes. Layers of different kinds (attention or linear attention, dense MLP or
MoE) are told apart by *layer rules* read from the config (``layer_types``,
``first_k_dense_replace``, ``decoder_sparse_step`` …): each rule gives a layer a label, and a
slot with ``kinds`` exists only in the layers carrying all of those labels.

:mod:`abliterate.model.anatomy` resolves a row against a config into tensor names and binds it
to a live model; nothing here touches a model. A family that cannot be edited exactly has a
row with ``refused`` set to the reason, so the user gets that reason instead of a silent
approximation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from abliterate.core.edits import WriterRole
from abliterate.model.layer_kinds import (
    Flag,
    LayerRule,
    Listed,
    MoeEvery,
    MoeFrom,
    MoeIn,
    MoePeriodic,
)

Layout = Literal["linear", "linear_t", "embedding", "fused", "fused_t"]
"""How a writer's weight is stored, relative to the canonical ``(d_model, d_in)``:
``linear`` is ``nn.Linear``'s ``(out=d_model, in)``; ``linear_t`` its transpose (GPT-2's
``Conv1D``); ``embedding`` is ``(vocab, d_model)``; ``fused`` holds all experts as
``(experts, d_model, d_in)`` and ``fused_t`` as ``(experts, d_in, d_model)``."""

FUSED: tuple[Layout, ...] = ("fused", "fused_t")


# --- the rows -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriterSlot:
    """One kind of residual writer found in the decoder layers of a family.

    Attributes:
        role: What the writer is.
        module: Module path relative to the layer (``self_attn.o_proj``); for fused experts,
            the experts module holding the stacked tensor (``mlp.experts``).
        param: Parameter of that module holding the weight.
        layout: How the weight is stored (:data:`Layout`).
        bias: Parameter of the module holding the bias when it has one.
        post_norms: Norms (module paths relative to the layer) applied, in order, to the
            writer's output before the residual add: Gemma 2/3 and OLMo 2 have one; Gemma 4's
            MoE layers normalise each branch and then their sum (two). Each must be an RMS norm
            without bias; its gain is ``weight + Family.norm_offset``.
        experts: Config key holding the number of experts of a fused layout.
        block: Module (relative to the layer) whose output is the sum of this writer's and its
            siblings' writes (an MoE block: routed experts, shared expert and their gates); the
            load-time verification reads the write there.
        kinds: Layer labels (from the family's layer rules) a layer must carry to have this
            writer; empty: every layer has it.
    """

    role: WriterRole
    module: str
    param: str = "weight"
    layout: Layout = "linear"
    bias: str | None = "bias"
    post_norms: tuple[str, ...] = ()
    experts: str | None = None
    block: str | None = None
    kinds: tuple[str, ...] = ()


@dataclass(frozen=True)
class Logits:
    """What the causal LM does to the head's output (config keys; None: nothing).

    Attributes:
        multiply: Scale the logits by this value (Cohere's ``logit_scale``).
        divide: Divide them by it (Granite's ``logits_scaling``).
        softcap: ``c · tanh(logits / c)`` with this cap (Gemma's ``final_logit_softcapping``).
    """

    multiply: str | None = None
    divide: str | None = None
    softcap: str | None = None


@dataclass(frozen=True)
class Family:
    """How one family of decoder-only models keeps its residual stream.

    Attributes:
        model_types: The (text) configs' ``model_type`` values this entry describes.
        writers: The residual writers of the decoder layers (some only in layers of a kind).
        decoder: Path of the decoder (embedding, layers, final norm) in the causal LM.
        layers, embedding, final_norm: Module paths relative to the decoder.
        lm_head: Module path of the output head in the causal LM.
        mid: Module (relative to a layer) whose *input* is the residual between the token
            mixer and the MLP (site "mid"), or None where there is no such point (parallel
            blocks, one sublayer per layer).
        norm_offset: The norms' effective gain is ``weight + norm_offset`` (Gemma 1–3: 1).
        kinds: Layer rules labelling each layer (see :class:`WriterSlot`).
        logits: What the causal LM does to the head's output.
        refused: Why this family cannot be edited exactly, when it cannot.
    """

    model_types: tuple[str, ...]
    writers: tuple[WriterSlot, ...]
    decoder: str = "model"
    layers: str = "layers"
    embedding: str = "embed_tokens"
    final_norm: str = "norm"
    lm_head: str = "lm_head"
    mid: str | None = "post_attention_layernorm"
    norm_offset: float = 0.0
    kinds: tuple[LayerRule, ...] = ()
    logits: Logits = Logits()
    refused: str | None = None


@dataclass(frozen=True)
class Multimodal:
    """Where an image-text-to-text model keeps its language model.

    Attributes:
        decoder: Path of the text decoder in the model (``model.language_model``).
        lm_head: Path of the output head.
        whole: Whether checkpoints are loaded (and saved) whole, vision tower included; when
            not, :func:`~abliterate.model.loading.load_model` loads the language model alone.
    """

    decoder: str = "model.language_model"
    lm_head: str = "lm_head"
    whole: bool = True


def _attn(module: str = "self_attn.o_proj", **kw: Any) -> WriterSlot:
    return WriterSlot("attention", module, **kw)


def _mlp(module: str = "mlp.down_proj", **kw: Any) -> WriterSlot:
    return WriterSlot("mlp", module, **kw)


def _mixer(module: str, **kw: Any) -> WriterSlot:
    return WriterSlot("mixer", module, **kw)


def _experts(block: str, count: str, **kw: Any) -> WriterSlot:
    """Routed experts stacked in ``<block>.experts.down_proj`` (``(experts, d_model, d_in)``)."""
    kw.setdefault("bias", None)
    kw.setdefault("layout", "fused")
    return WriterSlot("expert", f"{block}.experts", "down_proj", experts=count, block=block, **kw)


def _shared(block: str, module: str, **kw: Any) -> WriterSlot:
    """A shared expert's down projection inside the MoE ``block``, in layers labelled ``moe``."""
    kw.setdefault("kinds", ("moe",))
    return WriterSlot("shared_expert", f"{block}.{module}", block=block, **kw)


# Granite MoE: the shared MLP sits beside the MoE block, not inside it.
GRANITE_SHARED = WriterSlot("shared_expert", "shared_mlp.output_linear", kinds=("shared",))
# Hybrids with Mamba mixers label their layers "linear_attention" / "full_attention".
MAMBA = _mixer("mamba.out_proj", kinds=("linear_attention",))


ATTN = _attn()
MLP = _mlp()
DENSE_MLP = _mlp(kinds=("dense",))
# Post-norm layers (Gemma 2/3/4, OLMo 2/3, EXAONE 4, GLM-4): the norm after each writer.
ATTN_POST = _attn(post_norms=("post_attention_layernorm",))
MLP_POST = _mlp(post_norms=("post_feedforward_layernorm",))
# Qwen3-Next / Qwen3.5: gated DeltaNet (linear attention) layers and full-attention layers.
LINEAR_ATTN = _mixer("linear_attn.out_proj", kinds=("linear_attention",))
FULL_ATTN = _attn(kinds=("full_attention",))
SOFTCAP = Logits(softcap="final_logit_softcapping")
GRANITE_LOGITS = Logits(divide="logits_scaling")
QWEN_SPARSE = MoeEvery("decoder_sparse_step", skip="mlp_only_layers", count="num_experts")

FAMILIES: tuple[Family, ...] = (
    # Pre-norm decoders with the Llama layout: h += o_proj(attn(norm(h))); h += down_proj(…).
    Family(
        model_types=(
            "llama",
            "mistral",
            "ministral",
            "ministral3",
            "qwen2",
            "qwen3",
            "smollm3",
            "glm",
            "ernie4_5",
            "seed_oss",
            "hunyuan_v1_dense",
            "gemma",
            "phi3",
            "helium",
            "olmo",
            "arcee",
            "cwm",
            "nemotron",
            "internlm3",
            # The language models of image-text-to-text checkpoints.
            "qwen2_vl_text",
            "qwen2_5_vl_text",
            "qwen3_vl_text",
        ),
        writers=(ATTN, MLP),
    ),
    Family(model_types=("granite",), writers=(ATTN, MLP), logits=GRANITE_LOGITS),
    Family(model_types=("starcoder2",), writers=(ATTN, _mlp("mlp.c_proj"))),
    Family(model_types=("apertus",), writers=(ATTN, MLP), mid="feedforward_layernorm"),
    Family(
        model_types=("vaultgemma",),
        writers=(ATTN, MLP),
        mid="pre_feedforward_layernorm",
        logits=SOFTCAP,
    ),
    # Sandwich norms: a pre-norm and a post-norm around each writer.
    Family(
        model_types=("glm4",),
        writers=(
            _attn(post_norms=("post_self_attn_layernorm",)),
            _mlp(post_norms=("post_mlp_layernorm",)),
        ),
    ),
    Family(
        model_types=("gemma2", "gemma3_text"),
        writers=(ATTN_POST, MLP_POST),
        mid="pre_feedforward_layernorm",
        norm_offset=1.0,
        logits=SOFTCAP,
    ),
    # Gemma 4: norms with gain ``weight``; MoE layers add normalised dense and expert branches
    # and normalise their sum; the per-layer-input branch (E2B/E4B) writes through its own
    # post-norm after the MLP (strength of the layer's MLP).
    Family(
        model_types=("gemma4_text",),
        writers=(
            ATTN_POST,
            _mlp(post_norms=("post_feedforward_layernorm",), kinds=("dense",)),
            _mlp(
                post_norms=("post_feedforward_layernorm_1", "post_feedforward_layernorm"),
                kinds=("moe",),
            ),
            WriterSlot(
                "expert",
                "experts",
                "down_proj",
                layout="fused",
                bias=None,
                post_norms=("post_feedforward_layernorm_2", "post_feedforward_layernorm"),
                experts="num_experts",
                kinds=("moe",),
            ),
            _mlp(
                "per_layer_projection",
                post_norms=("post_per_layer_input_norm",),
                kinds=("per_layer_input",),
            ),
        ),
        mid="pre_feedforward_layernorm",
        kinds=(
            Flag("enable_moe_block", "moe", "dense"),
            Flag("hidden_size_per_layer_input", "per_layer_input"),
        ),
        logits=SOFTCAP,
    ),
    # No pre-norms: the MLP reads the residual itself, and each write is normalised.
    Family(model_types=("olmo2", "olmo3", "exaone4"), writers=(ATTN_POST, MLP_POST), mid="mlp"),
    # Parallel blocks: attention and MLP both read norm(h); there is no "mid" residual.
    Family(
        model_types=("cohere", "cohere2"),
        writers=(ATTN, MLP),
        mid=None,
        logits=Logits(multiply="logit_scale"),
    ),
    Family(
        model_types=("phi",),
        writers=(_attn("self_attn.dense"), _mlp("mlp.fc2")),
        final_norm="final_layernorm",
        mid=None,
    ),
    # GPT-NeoX (Pythia) and StableLM run attention and MLP in parallel or in sequence by a
    # config switch; declaring no "mid" site keeps the table exact for both.
    Family(
        model_types=("gpt_neox",),
        writers=(_attn("attention.dense"), _mlp("mlp.dense_4h_to_h")),
        decoder="gpt_neox",
        embedding="embed_in",
        final_norm="final_layer_norm",
        mid=None,
    ),
    Family(model_types=("stablelm",), writers=(ATTN, MLP), mid=None),
    # Mixture of experts.
    Family(
        model_types=("mixtral", "olmoe", "phimoe", "minimax_m2"),
        writers=(ATTN, _experts("mlp", "num_local_experts")),
    ),
    Family(
        model_types=("flex_olmo",),
        writers=(
            ATTN_POST,
            _experts("mlp", "num_experts", post_norms=("post_feedforward_layernorm",)),
        ),
        mid="mlp",
    ),
    Family(
        model_types=("qwen3_moe", "qwen3_vl_moe_text"),
        writers=(ATTN, DENSE_MLP, _experts("mlp", "num_experts", kinds=("moe",))),
        kinds=(QWEN_SPARSE,),
    ),
    Family(
        model_types=("qwen2_moe",),
        writers=(
            ATTN,
            DENSE_MLP,
            _experts("mlp", "num_experts", kinds=("moe",)),
            _shared("mlp", "shared_expert.down_proj"),
        ),
        kinds=(QWEN_SPARSE,),
    ),
    Family(
        model_types=("granitemoe", "granitemoeshared"),
        writers=(ATTN, _experts("block_sparse_moe", "num_local_experts"), GRANITE_SHARED),
        kinds=(Flag("shared_intermediate_size", "shared"),),
        logits=GRANITE_LOGITS,
    ),
    Family(
        model_types=("deepseek_v2", "deepseek_v3", "glm4_moe", "dots1"),
        writers=(
            ATTN,
            DENSE_MLP,
            _experts("mlp", "n_routed_experts", kinds=("moe",)),
            _shared("mlp", "shared_experts.down_proj", kinds=("moe", "shared")),
        ),
        kinds=(MoeFrom("first_k_dense_replace"), Flag("n_shared_experts", "shared")),
    ),
    Family(
        model_types=("ernie4_5_moe",),
        writers=(
            ATTN,
            DENSE_MLP,
            _experts("mlp", "moe_num_experts", kinds=("moe",)),
            _shared("mlp", "shared_experts.down_proj", kinds=("moe", "shared")),
        ),
        kinds=(
            MoeEvery(
                "moe_layer_interval", start="moe_layer_start_index", end="moe_layer_end_index"
            ),
            Flag("moe_num_shared_experts", "shared"),
        ),
    ),
    Family(
        model_types=("exaone_moe",),
        writers=(
            ATTN,
            DENSE_MLP,
            _experts("mlp", "num_experts", kinds=("sparse",)),
            _shared("mlp", "shared_experts.down_proj", kinds=("sparse", "shared")),
        ),
        kinds=(Listed("mlp_layer_types"), Flag("num_shared_experts", "shared")),
    ),
    Family(
        model_types=("hunyuan_v1_moe",),
        writers=(
            ATTN,
            _experts("mlp", "num_experts"),
            _shared("mlp", "shared_mlp.down_proj", kinds=()),
        ),
    ),
    # gpt-oss: experts stored transposed, (experts, d_in, d_model), each with its own bias.
    Family(
        model_types=("gpt_oss",),
        writers=(
            _attn(),
            _experts("mlp", "num_local_experts", layout="fused_t", bias="down_proj_bias"),
        ),
    ),
    Family(
        model_types=("llama4_text",),
        writers=(
            ATTN,
            _mlp("feed_forward.down_proj", kinds=("dense",)),
            _experts("feed_forward", "num_local_experts", layout="fused_t", kinds=("moe",)),
            _shared("feed_forward", "shared_expert.down_proj"),
        ),
        mid="post_attention_layernorm",
        kinds=(MoeIn("moe_layers"),),
    ),
    # Hybrids: linear attention or state-space mixers next to attention layers.
    Family(
        model_types=("qwen3_next", "qwen3_5_moe_text"),
        writers=(
            LINEAR_ATTN,
            FULL_ATTN,
            DENSE_MLP,
            _experts("mlp", "num_experts", kinds=("moe",)),
            _shared("mlp", "shared_expert.down_proj"),
        ),
        kinds=(Listed("layer_types"), QWEN_SPARSE),
    ),
    Family(
        model_types=("qwen3_5_text",),
        writers=(LINEAR_ATTN, FULL_ATTN, MLP),
        kinds=(Listed("layer_types"),),
    ),
    Family(
        model_types=("lfm2",),
        writers=(
            _mixer("conv.out_proj", kinds=("conv",)),
            _attn("self_attn.out_proj", kinds=("full_attention",)),
            _mlp("feed_forward.w2"),
        ),
        final_norm="embedding_norm",
        mid="ffn_norm",
        kinds=(Listed("layer_types"),),
    ),
    Family(
        model_types=("falcon_h1",),
        writers=(_mixer("mamba.out_proj"), ATTN, _mlp("feed_forward.down_proj")),
        final_norm="final_layernorm",
        mid="pre_ff_layernorm",
        logits=Logits(multiply="lm_head_multiplier"),
    ),
    Family(
        model_types=("jamba",),
        writers=(
            MAMBA,
            FULL_ATTN,
            _mlp("feed_forward.down_proj", kinds=("dense",)),
            _experts("feed_forward", "num_experts", kinds=("moe",)),
        ),
        final_norm="final_layernorm",
        mid="pre_ff_layernorm",
        kinds=(
            Listed("layer_types"),
            MoePeriodic("expert_layer_period", "expert_layer_offset", "num_experts"),
        ),
    ),
    Family(
        model_types=("bamba",),
        writers=(
            MAMBA,
            FULL_ATTN,
            _mlp("feed_forward.down_proj"),
        ),
        final_norm="final_layernorm",
        mid="pre_ff_layernorm",
        kinds=(Listed("layers_block_type"),),
    ),
    Family(
        model_types=("granitemoehybrid",),
        writers=(
            MAMBA,
            FULL_ATTN,
            _experts("block_sparse_moe", "num_local_experts", kinds=("moe",)),
            WriterSlot("shared_expert", "shared_mlp.output_linear"),
        ),
        kinds=(Listed("layers_block_type"), Flag("num_local_experts", "moe")),
        logits=GRANITE_LOGITS,
    ),
    # Nemotron-H: one sublayer per layer (a Mamba-2 mixer, attention, an MLP or MoE).
    Family(
        model_types=("nemotron_h",),
        writers=(
            _mixer("mixer.out_proj", kinds=("linear_attention",)),
            _attn("mixer.o_proj", kinds=("full_attention",)),
            _mlp("mixer.down_proj", kinds=("mlp",)),
            _experts("mixer", "n_routed_experts", kinds=("moe", "full_width")),
            WriterSlot("expert", "mixer.fc2_latent_proj", block="mixer", kinds=("moe", "latent")),
            _shared("mixer", "shared_experts.down_proj"),
        ),
        embedding="embeddings",
        final_norm="norm_f",
        mid=None,
        kinds=(Listed("layers_block_type"), Flag("moe_latent_size", "latent", "full_width")),
    ),
    Family(
        model_types=("mamba", "falcon_mamba"),
        writers=(_mixer("mixer.out_proj"),),
        decoder="backbone",
        embedding="embeddings",
        final_norm="norm_f",
        mid=None,
    ),
    # Refused, with the reason.
    Family(
        model_types=("gemma3n", "gemma3n_text"),
        writers=(ATTN, MLP),
        refused=(
            "keeps several residual streams mixed by learned AltUp coefficients and adds "
            "per-layer embeddings and LAuReL branches, which the anatomy does not cover"
        ),
    ),
    Family(
        model_types=("minimax",),
        writers=(ATTN, _experts("mlp", "num_local_experts")),
        refused=(
            "replaces its residual stream by the normalised stream inside every layer, so "
            "removing a direction from the writers does not remove it from the stream"
        ),
    ),
)

MULTIMODAL: dict[str, Multimodal] = {
    **{
        t: Multimodal()
        for t in (
            "gemma3",
            "gemma4",
            "mistral3",
            "qwen2_vl",
            "qwen2_5_vl",
            "qwen3_vl",
            "qwen3_vl_moe",
            "qwen3_5",
            "qwen3_5_moe",
        )
    },
    # transformers 5.24's Llama4ForConditionalGeneration fails on text-only prompts (its
    # forward reads image outputs the language model does not return): Llama 4 checkpoints
    # load as Llama4ForCausalLM, the language model alone.
    "llama4": Multimodal(
        decoder="language_model.model", lm_head="language_model.lm_head", whole=False
    ),
}
"""Image-text-to-text ``model_type`` → where its language model lives (the language model's
own family comes from its text config)."""

BY_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
