"""The anatomy of a decoder: where each family keeps its residual stream and its writers.

The anatomy is data. :data:`FAMILIES` declares, per family, the module paths of the decoder
layers, the embedding, the final norm and the head, and one :class:`WriterSlot` per kind of
residual writer in a layer (attention output, MLP output, experts, …) with its parameter
names, its layout and any norm applied to its output before the residual add. Nothing else in
the package looks for model internals.

* :meth:`Anatomy.from_config` resolves a family's table against a model config (``config.json``
  alone, no weights): the number of layers, the width and every writer with its tensor names.
  Streaming and GGUF edits address tensors through it.
* :meth:`Anatomy.bind` attaches it to a live model (:class:`BoundAnatomy`): the modules to hook
  and the parameters to edit. A missing module raises :class:`UnsupportedArchitectureError`
  naming the path, never a silent skip.

The residual stream of a pre-norm decoder (Llama, Qwen2, Mistral, Gemma) is::

    h_0     = embed(tokens)                        # "pre" of layer 0
    m_i     = h_i + o_proj_i(attn_i(norm(h_i)))    # "mid" of layer i
    h_{i+1} = m_i + down_proj_i(mlp_i(norm(m_i)))  # "post" of layer i == "pre" of layer i+1

so the stream is exactly the sum of the embedding and every writer's output, and removing a
direction from every writer removes it from the whole stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from abliterate.core.edits import WriterInfo, WriterRole
from abliterate.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    import torch
    from torch import nn

Layout = Literal["linear", "linear_t", "embedding", "fused", "fused_t"]
"""How a writer's weight is stored, relative to the canonical ``(d_model, d_in)``:
``linear`` is ``nn.Linear``'s ``(out=d_model, in)``; ``linear_t`` its transpose (GPT-2's
``Conv1D``); ``embedding`` is ``(vocab, d_model)``; ``fused`` holds all experts as
``(experts, d_model, d_in)`` and ``fused_t`` as ``(experts, d_in, d_model)``."""


@dataclass(frozen=True)
class WriterSlot:
    """One kind of residual writer found in the decoder layers of a family.

    Attributes:
        role: What the writer is.
        module: Module path relative to the layer (``self_attn.o_proj``).
        param: Parameter of that module holding the weight.
        layout: How the weight is stored (:data:`Layout`).
        bias: Parameter holding the bias when the module has one.
        post_norm: Module path (relative to the layer) of a norm applied to the writer's output
            before the residual add (Gemma 2/3, OLMo 2), or None.
    """

    role: WriterRole
    module: str
    param: str = "weight"
    layout: Layout = "linear"
    bias: str | None = "bias"
    post_norm: str | None = None


@dataclass(frozen=True)
class Family:
    """How one family of decoder-only models keeps its residual stream.

    Attributes:
        model_types: The configs' ``model_type`` values this entry describes.
        writers: The residual writers of every decoder layer.
        layers, embedding, final_norm, lm_head: Module paths from the model's root.
        mid: Module (relative to a layer) whose *input* is the residual between the token
            mixer and the MLP (site "mid"), or None where there is no such point.
        norm_offset: The norms' effective gain is ``weight + norm_offset`` (Gemma: 1).
        refused: Why this family cannot be edited exactly, when it cannot.
    """

    model_types: tuple[str, ...]
    writers: tuple[WriterSlot, ...]
    layers: str = "model.layers"
    embedding: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    mid: str | None = "post_attention_layernorm"
    norm_offset: float = 0.0
    refused: str | None = None


ATTN_OUT = WriterSlot("attention", "self_attn.o_proj")
MLP_OUT = WriterSlot("mlp", "mlp.down_proj")

FAMILIES: tuple[Family, ...] = (
    Family(
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma"),
        writers=(ATTN_OUT, MLP_OUT),
    ),
    Family(
        model_types=("gemma2", "gemma3", "gemma3_text", "olmo2"),
        writers=(ATTN_OUT, MLP_OUT),
        refused=(
            "normalises each attention/MLP output before adding it to the residual stream; "
            "the exact post-norm edit is not enabled for it yet"
        ),
    ),
)

_BY_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


def supported_model_types() -> list[str]:
    """Every ``model_type`` the table can edit exactly."""
    return sorted(t for t, f in _BY_TYPE.items() if f.refused is None)


@dataclass(frozen=True)
class Writer:
    """One residual writer of one model, resolved from the config.

    Attributes:
        role, layer: What it is and where (layer None for the embedding).
        module: Module path from the model's root.
        tensor: Tensor name of the weight (``module.param``).
        bias: Tensor name of the bias, when the slot declares one.
        layout: How the weight is stored.
        expert: Index of the expert inside a fused tensor, or None.
        post_norm: Tensor name of the weight of the norm applied to the output, or None.
    """

    role: WriterRole
    layer: int | None
    module: str
    tensor: str
    bias: str | None
    layout: Layout
    expert: int | None = None
    post_norm: str | None = None

    @property
    def name(self) -> str:
        """Stable identifier: the tensor name, with ``[expert]`` for a fused expert."""
        return self.tensor if self.expert is None else f"{self.tensor}[{self.expert}]"


@dataclass(frozen=True)
class Anatomy:
    """A model's residual anatomy resolved from its config (no weights needed).

    Attributes:
        family: The config's ``model_type``.
        n_layers, d_model: Decoder layers and residual width.
        prefix: Path prefix of the language model inside the checkpoint (``""`` for a plain
            causal LM; e.g. ``model.language_model.`` style prefixes for multimodal models).
        table: The family entry it was resolved from.
        writers: Every residual writer, embedding first, then layer by layer.
    """

    family: str
    n_layers: int
    d_model: int
    table: Family
    writers: tuple[Writer, ...]
    prefix: str = ""

    @classmethod
    def from_config(cls, config: Any) -> Anatomy:
        """Resolve the table for a transformers config (or a ``config.json`` mapping).

        Raises:
            UnsupportedArchitectureError: the family is not in the table, or is refused.
        """
        text = _text_config(config)
        family = str(_get(text, "model_type", "unknown"))
        table = _BY_TYPE.get(family)
        if table is None:
            raise UnsupportedArchitectureError(
                f"unsupported architecture '{family}'; supported families: "
                f"{', '.join(supported_model_types())}."
            )
        if table.refused is not None:
            raise UnsupportedArchitectureError(
                f"'{family}' models cannot be edited exactly: it {table.refused}. Supported "
                f"families: {', '.join(supported_model_types())}."
            )
        n_layers = int(_get(text, "num_hidden_layers", 0))
        if n_layers < 1:
            raise UnsupportedArchitectureError(f"the '{family}' config declares no decoder layers.")
        d_model = int(_get(text, "hidden_size", 0))
        writers = [Writer("embedding", None, table.embedding, f"{table.embedding}.weight", None,
                          "embedding")]  # fmt: skip
        for i in range(n_layers):
            base = f"{table.layers}.{i}"
            for slot in table.writers:
                module = f"{base}.{slot.module}"
                writers.append(
                    Writer(
                        role=slot.role,
                        layer=i,
                        module=module,
                        tensor=f"{module}.{slot.param}",
                        bias=f"{module}.{slot.bias}" if slot.bias else None,
                        layout=slot.layout,
                        post_norm=f"{base}.{slot.post_norm}.weight" if slot.post_norm else None,
                    )
                )
        return cls(family, n_layers, d_model, table, tuple(writers))

    def describe(self) -> str:
        """One line naming what was found, for logs and reports."""
        counts: dict[str, int] = {}
        for w in self.writers:
            counts[w.role] = counts.get(w.role, 0) + 1
        parts = [f"{n} {role}" for role, n in counts.items()]
        return (
            f"{self.family}: {self.n_layers} layers, d_model={self.d_model}, "
            f"residual writers = {' + '.join(parts)}"
        )

    def bind(self, model: nn.Module) -> BoundAnatomy:
        """Attach to a live model: find every module the table names.

        Raises:
            UnsupportedArchitectureError: a module is missing or has the wrong shape.
        """
        from torch import nn

        t = self.table
        layers = tuple(_module(model, f"{t.layers}.{i}", self.family) for i in range(self.n_layers))
        embedding = _module(model, t.embedding, self.family)
        if not isinstance(embedding, nn.Embedding):
            raise UnsupportedArchitectureError(
                f"'{t.embedding}' of the '{self.family}' model is a {type(embedding).__name__}, "
                "not an Embedding."
            )
        bound = []
        for w in self.writers:
            module = _module(model, w.module, self.family)
            if w.layout == "linear" and not isinstance(module, nn.Linear):
                raise UnsupportedArchitectureError(
                    f"'{w.module}' of the '{self.family}' model is a {type(module).__name__}, "
                    "not a Linear layer (quantized weights cannot be edited; load the model "
                    "unquantized)."
                )
            bound.append(BoundWriter(w, module))
        mids = tuple(
            None if t.mid is None else _module(layer, t.mid, self.family) for layer in layers
        )
        body = _module(model, t.layers.rsplit(".", 1)[0], self.family)
        return BoundAnatomy(
            anatomy=self,
            model=model,
            body=body,
            embedding=embedding,
            layers=layers,
            mid_modules=mids,
            lm_head=_module(model, t.lm_head, self.family),
            writers=tuple(bound),
        )


@dataclass(frozen=True, eq=False)
class BoundWriter:
    """A :class:`Writer` with its live module."""

    writer: Writer
    module: nn.Module

    def weight(self) -> torch.Tensor:
        """The canonical ``(d_model, d_in)`` view of the weight (writes go to the model)."""
        param = self.module.get_parameter(self.writer.tensor.rsplit(".", 1)[-1])
        return canonical(param.data, self.writer.layout, self.writer.expert)


@dataclass(frozen=True, eq=False)
class BoundAnatomy:
    """An :class:`Anatomy` attached to a live model.

    Attributes:
        body: The decoder stack without the vocabulary head (running it alone skips the costly
            projection onto the vocabulary when only hidden states matter).
        embedding: Token embedding module.
        layers: Decoder blocks; a block's input is site "pre", its output site "post".
        mid_modules: Per layer, the module whose input is site "mid" (None where absent).
        lm_head: Output projection to the vocabulary.
        writers: Every residual writer with its module.
    """

    anatomy: Anatomy
    model: nn.Module
    body: nn.Module
    embedding: nn.Module
    layers: tuple[nn.Module, ...]
    mid_modules: tuple[nn.Module | None, ...]
    lm_head: nn.Module
    writers: tuple[BoundWriter, ...] = field(default_factory=tuple)

    @property
    def n_layers(self) -> int:
        """Number of decoder layers."""
        return self.anatomy.n_layers

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return self.anatomy.d_model

    def modules(self, role: WriterRole) -> list[nn.Module]:
        """The modules of every writer of ``role``, in layer order."""
        return [w.module for w in self.writers if w.writer.role == role]

    def writer_info(self, bound: BoundWriter) -> WriterInfo:
        """What an edit needs to know about ``bound`` (its post-norm gain read live)."""
        w = bound.writer
        gain = None
        if w.post_norm is not None:
            norm = self.model.get_parameter(w.post_norm)
            gain = norm.detach().float().cpu() + self.anatomy.table.norm_offset
        return WriterInfo(name=w.name, role=w.role, layer=w.layer, norm_gain=gain)


def canonical(tensor: torch.Tensor, layout: Layout, expert: int | None = None) -> torch.Tensor:
    """The ``(d_model, d_in)`` view of a writer's stored weight (a view: writes go through)."""
    if layout == "linear":
        return tensor
    if layout in ("linear_t", "embedding"):
        return tensor.T
    if expert is None:
        raise ValueError(f"a '{layout}' weight needs an expert index")
    return tensor[expert] if layout == "fused" else tensor[expert].T


def anatomy_of(model: nn.Module) -> BoundAnatomy:
    """The bound anatomy of a live transformers model (from its ``config``)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no transformers config to read its anatomy from."
        )
    return Anatomy.from_config(config).bind(model)


def _text_config(config: Any) -> Any:
    """The language model's config of a (possibly multimodal) config."""
    if isinstance(config, Mapping):
        return config.get("text_config", config)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _get(config: Any, key: str, default: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _module(root: nn.Module, path: str, family: str) -> nn.Module:
    """``root.get_submodule(path)`` or an error naming the missing piece."""
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"cannot find '{path}' in the '{family}' model ({type(root).__name__}): {exc}. "
            "The checkpoint does not match the anatomy table for its family."
        ) from exc
