"""Architecture resolution: the one place that knows where a model keeps its residual writers.

Abliteration needs, for every decoder layer, the modules whose outputs are *added* to the residual
stream (the attention output projection and the MLP output projection) plus the token embedding
that starts the stream. :func:`resolve_architecture` finds them by explicit attribute paths per
model family and raises :class:`UnsupportedArchitectureError` naming what it could not find;
nothing else in the package guesses at model internals.

The residual stream of a pre-norm decoder (Llama, Qwen2, Mistral, Gemma) is::

    h_0     = embed(tokens)                        # "pre" of layer 0
    m_i     = h_i + o_proj_i(attn_i(norm(h_i)))    # "mid" of layer i
    h_{i+1} = m_i + down_proj_i(mlp_i(norm(m_i)))  # "post" of layer i == "pre" of layer i+1

so the stream is exactly the sum of the embedding and every writer's output. Removing a direction
from every writer therefore removes it from the whole stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from abliterate.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from torch import nn

# Families whose decoder layers follow the Llama layout: `model.model.layers[i]` with
# `self_attn.o_proj`, `mlp.down_proj` and `post_attention_layernorm` (whose *input* is the
# residual between attention and MLP), and the embedding at `model.model.embed_tokens`.
LLAMA_LAYOUT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")

# Families that add a normalisation *after* each writer (`post_attention_layernorm` is applied
# to the attention output before the residual add). Orthogonalizing the projection weights
# would not remove the direction from the stream there, so they are refused with the reason.
POST_NORM_FAMILIES = ("gemma2", "gemma3", "gemma3_text", "olmo2")


@dataclass(frozen=True)
class Architecture:
    """The residual-stream anatomy of a decoder-only model.

    Attributes:
        family: The config's ``model_type`` (e.g. ``"qwen2"``).
        n_layers: Number of decoder layers.
        d_model: Width of the residual stream.
        body: The decoder stack without the vocabulary head (``model.model``); running it alone
            skips the costly projection onto the vocabulary when only activations matter.
        embedding: Token embedding module (writes the stream's first term).
        layers: Decoder blocks; a block's input is site "pre" and its output site "post".
        mid_modules: Per layer, the module whose input is the residual between attention and MLP.
        attn_out: Per layer, the attention output projection (a residual writer).
        mlp_out: Per layer, the MLP output projection (a residual writer).
        lm_head: Output projection to the vocabulary.
    """

    family: str
    n_layers: int
    d_model: int
    body: nn.Module
    embedding: nn.Embedding
    layers: tuple[nn.Module, ...]
    mid_modules: tuple[nn.Module, ...]
    attn_out: tuple[nn.Linear, ...]
    mlp_out: tuple[nn.Linear, ...]
    lm_head: nn.Linear

    def describe(self) -> str:
        """One line naming what was found, for logs and reports."""
        return (
            f"{self.family}: {self.n_layers} layers, d_model={self.d_model}, writers = embedding"
            f" + {len(self.attn_out)} attention outputs + {len(self.mlp_out)} MLP outputs"
        )


def _get(root: nn.Module, path: str, family: str) -> nn.Module:
    """Follow a dotted attribute path or raise an error naming the missing piece."""
    node: object = root
    for part in path.split("."):
        if part.isdigit():
            node = node[int(part)]  # type: ignore[index]
        elif hasattr(node, part):
            node = getattr(node, part)
        else:
            raise UnsupportedArchitectureError(
                f"cannot resolve '{path}' in a '{family}' model ({type(root).__name__}): "
                f"'{part}' is missing. Supported families: {', '.join(LLAMA_LAYOUT_FAMILIES)}."
            )
    return node  # type: ignore[return-value]


def resolve_architecture(model: nn.Module) -> Architecture:
    """Find the layers and residual writers of ``model``.

    Raises:
        UnsupportedArchitectureError: the family is known to be incompatible, or a required
            module is missing; the message names the family and the missing attribute path.
    """
    from torch import nn

    config = getattr(model, "config", None)
    family = str(getattr(config, "model_type", type(model).__name__))
    if family in POST_NORM_FAMILIES:
        raise UnsupportedArchitectureError(
            f"'{family}' models normalise each attention/MLP output before adding it to the "
            "residual stream, so weight orthogonalization cannot remove a direction exactly; "
            f"supported families: {', '.join(LLAMA_LAYOUT_FAMILIES)}."
        )
    if family not in LLAMA_LAYOUT_FAMILIES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{family}' ({type(model).__name__}); supported families: "
            f"{', '.join(LLAMA_LAYOUT_FAMILIES)}."
        )
    layers_module = _get(model, "model.layers", family)
    layers: tuple[nn.Module, ...] = tuple(layers_module)  # type: ignore[arg-type]
    if not layers:
        raise UnsupportedArchitectureError(f"the '{family}' model has no decoder layers.")
    embedding = _get(model, "model.embed_tokens", family)
    lm_head = _get(model, "lm_head", family)
    attn_out = tuple(_get(layer, "self_attn.o_proj", family) for layer in layers)
    mlp_out = tuple(_get(layer, "mlp.down_proj", family) for layer in layers)
    mids = tuple(_get(layer, "post_attention_layernorm", family) for layer in layers)
    for name, modules in (("self_attn.o_proj", attn_out), ("mlp.down_proj", mlp_out)):
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Linear):
                raise UnsupportedArchitectureError(
                    f"layer {i} '{name}' of the '{family}' model is a {type(m).__name__}, not a "
                    "Linear layer (quantized or fused weights cannot be edited; load the model "
                    "unquantized)."
                )
    if not isinstance(embedding, nn.Embedding):
        raise UnsupportedArchitectureError(
            f"'model.embed_tokens' of the '{family}' model is a {type(embedding).__name__}, "
            "not an Embedding."
        )
    return Architecture(
        family=family,
        n_layers=len(layers),
        d_model=int(embedding.weight.shape[1]),
        body=_get(model, "model", family),
        embedding=embedding,
        layers=layers,
        mid_modules=mids,
        attn_out=attn_out,  # type: ignore[arg-type]
        mlp_out=mlp_out,  # type: ignore[arg-type]
        lm_head=lm_head,  # type: ignore[arg-type]
    )
