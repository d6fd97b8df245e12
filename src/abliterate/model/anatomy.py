"""The anatomy of a decoder: where a model keeps its residual stream and its writers.

The anatomy is data: :mod:`abliterate.model.families` declares, per family, the module paths
of the decoder, its layers, embedding, final norm and head, and one
:class:`~abliterate.model.families.WriterSlot` per kind of residual writer (attention output,
token mixer output, MLP output, routed experts, shared expert, …) with its parameter names,
layout, bias and the norms applied to its output. Nothing else in the package looks for model
internals.

* :meth:`Anatomy.from_config` resolves a family's table against a model config
  (``config.json`` alone, no weights): the number of layers, the width, which layers are of
  which kind, and every writer with its tensor names (each expert of a fused expert tensor is
  its own writer). Streaming and GGUF edits address tensors through it. Image-text-to-text
  configs resolve their language model (its text config and its module prefix).
* :meth:`Anatomy.bind` attaches it to a live model (:class:`BoundAnatomy`): the modules to hook
  and the parameters to edit. A missing module or a weight of the wrong shape raises
  :class:`UnsupportedArchitectureError` naming it, never a silent skip.
* :func:`abliterate.model.verify.verify_anatomy` checks on a real forward pass that the
  residual stream is exactly the sum of the writes the anatomy names.

The residual stream of a pre-norm decoder (Llama, Qwen2, Mistral) is::

    h_0     = embed(tokens)                        # "pre" of layer 0
    m_i     = h_i + o_proj_i(attn_i(norm(h_i)))    # "mid" of layer i
    h_{i+1} = m_i + down_proj_i(mlp_i(norm(m_i)))  # "post" of layer i == "pre" of layer i+1

so the stream is the sum of the embedding and every writer's output, and removing a direction
from every writer removes it from the whole stream. Post-norm families (Gemma 2/3/4, OLMo 2)
add ``g ⊙ y / rms(y)`` instead of ``y``; the edit then removes the normalised ``g ⊙ v``
(:attr:`~abliterate.core.edits.WriterInfo.norm_gain`). An MoE layer adds the routed sum
``Σ_e r_e(x) W_e a_e(x)`` (plus shared experts): every ``W_e`` is a writer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from abliterate.core.edits import WriterInfo, WriterRole
from abliterate.errors import UnsupportedArchitectureError
from abliterate.model.families import (
    BY_TYPE,
    FAMILIES,
    FUSED,
    MULTIMODAL,
    Family,
    Layout,
    Multimodal,
    WriterSlot,
)
from abliterate.model.layer_kinds import config_value

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "FAMILIES",
    "Anatomy",
    "BoundAnatomy",
    "BoundWriter",
    "Family",
    "Layout",
    "Writer",
    "WriterSlot",
    "anatomy_of",
    "canonical",
    "is_multimodal",
    "supported_model_types",
]


def supported_model_types() -> list[str]:
    """Every (text) ``model_type`` the table can edit exactly."""
    return sorted(t for t, f in BY_TYPE.items() if f.refused is None)


def is_multimodal(config: Any) -> bool:
    """Whether ``config`` is an image-text-to-text model loaded whole (vision tower included)
    whose language model is edited."""
    where = MULTIMODAL.get(str(config_value(config, "model_type", "")))
    return where is not None and where.whole


@dataclass(frozen=True)
class Writer:
    """One residual writer of one model, resolved from the config.

    Attributes:
        role, layer: What it is and where (layer None for the embedding).
        module: Module path from the model's root (for fused experts: the experts module).
        tensor: Tensor name of the weight (``module.param``).
        bias: Tensor name of the bias, when the slot declares one.
        layout: How the weight is stored.
        expert: Index of the expert inside a fused tensor, or None.
        post_norms: Tensor names of the weights of the norms applied to the output, in order.
        block: Module path of the block whose output sums this writer's write with its
            siblings' (an MoE block), or None.
    """

    role: WriterRole
    layer: int | None
    module: str
    tensor: str
    bias: str | None
    layout: Layout
    expert: int | None = None
    post_norms: tuple[str, ...] = ()
    block: str | None = None

    @property
    def name(self) -> str:
        """Stable identifier: the tensor name, with ``[expert]`` for a fused expert."""
        return self.tensor if self.expert is None else f"{self.tensor}[{self.expert}]"


@dataclass(frozen=True)
class Anatomy:
    """A model's residual anatomy resolved from its config (no weights needed).

    Attributes:
        family: The language model config's ``model_type``.
        n_layers, d_model: Decoder layers and residual width.
        table: The family entry it was resolved from.
        writers: Every residual writer, embedding first, then layer by layer.
        decoder: Path of the language model's decoder (``model``; ``model.language_model`` in
            an image-text-to-text model).
        lm_head: Path of the output head.
        layer_kinds: The labels of each layer (``moe``, ``linear_attention`` …).
        logit_scale: Factor the causal LM applies to the head's output (Cohere, Granite).
        logit_softcap: Cap ``c`` of ``c · tanh(logits / c)`` applied after it (Gemma 2), or None.
    """

    family: str
    n_layers: int
    d_model: int
    table: Family
    writers: tuple[Writer, ...]
    decoder: str = "model"
    lm_head: str = "lm_head"
    layer_kinds: tuple[frozenset[str], ...] = ()
    logit_scale: float = 1.0
    logit_softcap: float | None = None

    @classmethod
    def from_config(cls, config: Any, *, multimodal: bool | None = None) -> Anatomy:
        """Resolve the table for a transformers config (or a ``config.json`` mapping).

        Args:
            multimodal: Whether the model is the image-text-to-text model of a multimodal
                config (default: as :func:`~abliterate.model.loading.load_model` loads it).

        Raises:
            UnsupportedArchitectureError: the family is not in the table, or is refused, or
                the config lacks what the table needs.
        """
        config = _as_config(config)
        text = _text_config(config)
        family = str(config_value(text, "model_type", "unknown"))
        table = _table(family)
        where = Multimodal(table.decoder, table.lm_head)
        top = str(config_value(config, "model_type"))
        if top in MULTIMODAL and (is_multimodal(config) if multimodal is None else multimodal):
            where = MULTIMODAL[top]
        n_layers = int(config_value(text, "num_hidden_layers", 0) or 0)
        if n_layers < 1:
            raise UnsupportedArchitectureError(f"the '{family}' config declares no decoder layers.")
        d_model = int(config_value(text, "hidden_size", 0) or 0)
        decoder = where.decoder
        embed = f"{decoder}.{table.embedding}"
        writers = [Writer("embedding", None, embed, f"{embed}.weight", None, "embedding")]
        kinds = tuple(_labels(table, text, i) for i in range(n_layers))
        for i in range(n_layers):
            base = f"{decoder}.{table.layers}.{i}"
            for slot in table.writers:
                if set(slot.kinds) <= kinds[i]:
                    writers.extend(_resolve(slot, base, i, text))
        scale, softcap = _logit_transform(table, text)
        return cls(
            family, n_layers, d_model, table, tuple(writers), decoder, where.lm_head, kinds,
            scale, softcap,
        )  # fmt: skip

    @property
    def recurrent(self) -> bool:
        """Whether some layers mix tokens by a recurrence (linear attention, state-space or
        convolution mixers) rather than attention: their caches hold states, not keys and
        values."""
        return any(w.role == "mixer" for w in self.writers)

    def layer_path(self, layer: int) -> str:
        """Module path of decoder layer ``layer``."""
        return f"{self.decoder}.{self.table.layers}.{layer}"

    def norm_gain(self, writer: Writer, read: Callable[[str], torch.Tensor]) -> torch.Tensor | None:
        """``(d_model,)`` float32 gain of the norms after ``writer`` (their product), or None.

        ``read`` returns a tensor by name (a weight store's ``read``).
        """
        gain = None
        for name in writer.post_norms:
            g = read(name).detach().float().cpu() + self.table.norm_offset
            gain = g if gain is None else gain * g
        return gain

    def writer_info(self, writer: Writer, read: Callable[[str], torch.Tensor]) -> WriterInfo:
        """What an edit needs to know about ``writer`` (post-norm gains read with ``read``)."""
        return WriterInfo(
            name=writer.name,
            role=writer.role,
            layer=writer.layer,
            norm_gain=self.norm_gain(writer, read),
        )

    def counts(self) -> dict[str, int]:
        """Writers per role (each expert of a fused tensor counts once)."""
        counts: dict[str, int] = {}
        for w in self.writers:
            counts[w.role] = counts.get(w.role, 0) + 1
        return counts

    def describe(self) -> str:
        """One line naming what was found, for logs and reports."""
        parts = [f"{n} {role}" for role, n in self.counts().items()]
        fused = {w.tensor for w in self.writers if w.expert is not None}
        experts = ""
        if fused:
            n = sum(1 for w in self.writers if w.expert is not None)
            experts = f" ({n} experts in {len(fused)} fused expert tensors)"
        return (
            f"{self.family}: {self.n_layers} layers, d_model={self.d_model}, "
            f"residual writers = {' + '.join(parts)}{experts}"
        )

    def bind(self, model: nn.Module) -> BoundAnatomy:
        """Attach to a live model: find every module the table names and check its shape.

        Raises:
            UnsupportedArchitectureError: a module is missing or has the wrong shape.
        """
        from torch import nn

        t = self.table
        layers = tuple(
            _module(model, self.layer_path(i), self.family) for i in range(self.n_layers)
        )
        embedding = _module(model, f"{self.decoder}.{t.embedding}", self.family)
        if not isinstance(embedding, nn.Embedding):
            raise UnsupportedArchitectureError(
                f"'{self.decoder}.{t.embedding}' of the '{self.family}' model is a "
                f"{type(embedding).__name__}, not an Embedding."
            )
        bound = tuple(BoundWriter(w, _module(model, w.module, self.family)) for w in self.writers)
        for b in bound:
            _check_shape(b, self.d_model, self.family)
        mids = tuple(
            None if t.mid is None else _module(layer, t.mid, self.family) for layer in layers
        )
        return BoundAnatomy(
            anatomy=self,
            model=model,
            body=_module(model, self.decoder, self.family),
            embedding=embedding,
            layers=layers,
            mid_modules=mids,
            lm_head=_module(model, self.lm_head, self.family),
            writers=bound,
        )


@dataclass(frozen=True, eq=False)
class BoundWriter:
    """A :class:`Writer` with its live module."""

    writer: Writer
    module: nn.Module

    def parameter(self) -> nn.Parameter:
        """The parameter holding the weight (the whole stacked tensor of a fused expert)."""
        return self.module.get_parameter(self.writer.tensor.rsplit(".", 1)[-1])

    def weight(self) -> torch.Tensor:
        """The canonical ``(d_model, d_in)`` view of the weight (writes go to the model)."""
        return canonical(self.parameter().data, self.writer.layout, self.writer.expert)


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

    @property
    def has_mid(self) -> bool:
        """Whether the layers have a "mid" site (parallel blocks have none)."""
        return self.anatomy.table.mid is not None

    def modules(self, role: WriterRole) -> list[nn.Module]:
        """The modules of every writer of ``role``, in layer order (fused experts once)."""
        out: list[nn.Module] = []
        for w in self.writers:
            if w.writer.role == role and not any(m is w.module for m in out):
                out.append(w.module)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The causal LM's logits for final hidden states ``(…, d_model)`` (after the final
        norm): the head, then the family's scale and soft cap."""
        import torch

        a = self.anatomy
        logits = self.lm_head(hidden)  # (…, vocab)
        if a.logit_scale != 1.0:
            logits = logits * a.logit_scale
        if a.logit_softcap is not None:
            logits = torch.tanh(logits / a.logit_softcap) * a.logit_softcap
        return logits

    def writer_info(self, bound: BoundWriter) -> WriterInfo:
        """What an edit needs to know about ``bound`` (its post-norm gains read live)."""
        return self.anatomy.writer_info(bound.writer, lambda n: self.model.get_parameter(n))


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
    # A multimodal config may also be loaded as a text-only causal LM (transformers maps
    # e.g. qwen3_5 to Qwen3_5ForCausalLM); the class says which of the two layouts it has.
    multimodal = str(getattr(config, "model_type", "")) in MULTIMODAL and _is_image_text_to_text(
        model
    )
    return Anatomy.from_config(config, multimodal=multimodal).bind(model)


def _is_image_text_to_text(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = str(getattr(model.config, "model_type", ""))
    return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type) == type(model).__name__


def _table(family: str) -> Family:
    table = BY_TYPE.get(family)
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
    return table


def _logit_transform(table: Family, config: Any) -> tuple[float, float | None]:
    """``(scale, softcap)`` of the family's logits for this config."""
    rule = table.logits
    scale = 1.0
    if rule.multiply is not None:
        scale *= float(config_value(config, rule.multiply, 1.0))
    if rule.divide is not None:
        scale /= float(config_value(config, rule.divide, 1.0))
    cap = None if rule.softcap is None else config_value(config, rule.softcap)
    return scale, None if cap is None else float(cap)


def _labels(table: Family, config: Any, layer: int) -> frozenset[str]:
    labels = set()
    for rule in table.kinds:
        try:
            label = rule.label(config, layer)
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsupportedArchitectureError(
                f"the '{table.model_types[0]}' config cannot say what layer {layer} is: {exc}"
            ) from exc
        if label is not None:
            labels.add(label)
    return frozenset(labels)


def _resolve(slot: WriterSlot, base: str, layer: int, config: Any) -> list[Writer]:
    """The writers of ``slot`` in the layer at path ``base`` (one per expert when fused)."""
    module = f"{base}.{slot.module}"
    kw: dict[str, Any] = {
        "role": slot.role,
        "layer": layer,
        "module": module,
        "tensor": f"{module}.{slot.param}",
        "bias": f"{module}.{slot.bias}" if slot.bias else None,
        "layout": slot.layout,
        "post_norms": tuple(f"{base}.{n}.weight" for n in slot.post_norms),
        "block": f"{base}.{slot.block}" if slot.block else None,
    }
    if slot.layout not in FUSED:
        return [Writer(**kw)]
    assert slot.experts is not None, f"fused slot {slot.module} names no expert count"
    count = config_value(config, slot.experts)
    if isinstance(count, (list, tuple)):  # per-layer expert counts (Hunyuan MoE)
        count = count[layer]
    if not count or int(count) < 1:
        raise UnsupportedArchitectureError(
            f"layer {layer} has mixture-of-experts writers but the config's "
            f"'{slot.experts}' gives no expert count."
        )
    return [Writer(**kw, expert=e) for e in range(int(count))]


def _check_shape(bound: BoundWriter, d_model: int, family: str) -> None:
    """Refuse a writer whose weight is not what its layout says (quantized, other width)."""
    from torch import nn

    w, module = bound.writer, bound.module
    if w.layout == "linear" and not isinstance(module, nn.Linear):
        raise UnsupportedArchitectureError(
            f"'{w.module}' of the '{family}' model is a {type(module).__name__}, not a Linear "
            "layer (quantized weights cannot be edited; load the model unquantized)."
        )
    if w.layout in FUSED:
        try:
            stacked = bound.parameter()
        except AttributeError as exc:
            raise UnsupportedArchitectureError(
                f"'{w.tensor}' of the '{family}' model is not a parameter: {exc}"
            ) from exc
        if stacked.ndim != 3 or w.expert is None or w.expert >= stacked.shape[0]:
            raise UnsupportedArchitectureError(
                f"'{w.tensor}' of the '{family}' model has shape {tuple(stacked.shape)}, not "
                f"(experts, …) with expert {w.expert}: the config's expert count does not "
                "match the checkpoint."
            )
    if w.layout == "embedding":
        return
    # A Linear's declared width, not its weight's shape: quantized Linears pack their weights.
    width = module.out_features if isinstance(module, nn.Linear) else bound.weight().shape[0]
    if width != d_model:
        raise UnsupportedArchitectureError(
            f"'{w.name}' of the '{family}' model writes {width} features, not the residual "
            f"width {d_model}: the anatomy does not match this checkpoint."
        )


def _as_config(config: Any) -> Any:
    """A ``config.json`` mapping as its transformers config class (defaults and aliases
    filled in), when transformers knows its ``model_type``; anything else unchanged."""
    if not isinstance(config, Mapping):
        return config
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = str(config.get("model_type"))
    if model_type not in CONFIG_MAPPING:
        return config
    cls = CONFIG_MAPPING[model_type]
    try:
        # config.json encodes infinities as {"__float__": "Infinity"}; decode as transformers does.
        return cls.from_dict(cls._decode_special_floats(dict(config)))
    except (TypeError, ValueError) as exc:
        raise UnsupportedArchitectureError(
            f"the '{model_type}' config is not valid for transformers: {exc}"
        ) from exc


def _text_config(config: Any) -> Any:
    """The language model's config of a (possibly multimodal) config."""
    if isinstance(config, Mapping):
        return config.get("text_config", config)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _module(root: nn.Module, path: str, family: str) -> nn.Module:
    """``root.get_submodule(path)`` or an error naming the missing piece."""
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"cannot find '{path}' in the '{family}' model ({type(root).__name__}): {exc}. "
            "The checkpoint does not match the anatomy table for its family."
        ) from exc
