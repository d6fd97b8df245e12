"""Models spread over several devices (``device_map``) or quantized with bitsandbytes.

accelerate places a model with a device map: each module's weights sit on a GPU or on the
CPU, or are *offloaded* (kept on the CPU or on disk and brought to the module's execution
device for each forward pass; the module's parameters are then ``meta`` tensors). Every
forward pass of abliterate feeds its inputs to :func:`input_device` and lets accelerate's hooks
carry activations between devices; edits move their tensors to each writer's output's device
(:mod:`abliterate.core.linalg`), so hooks run wherever the writer runs.

What needs a writer's *weight* (the input rescaling of norm-preserving edits) reads it through
:func:`dense_weight`: onloaded by accelerate when the writer is offloaded, dequantized by
transformers' bitsandbytes helper when it is quantized. A permanent edit needs every weight in
memory, unquantized: :func:`bake_blockers` names what stands in the way, and ``run`` then bakes
into a full-precision copy of the model instead (:mod:`abliterate.commands.run`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn

    from abliterate.model.anatomy import BoundWriter

# Parameter classes of bitsandbytes' quantized linear layers (Linear4bit, Linear8bitLt).
_QUANTIZED = ("Params4bit", "Int8Params")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its input embedding's device.

    An offloaded embedding (``meta`` parameters) runs on accelerate's main device: as
    accelerate's ``dispatch_model`` chooses it, the first device of the map that is neither
    the CPU nor the disk, else the CPU.
    """
    weight = model.get_input_embeddings().weight  # type: ignore[operator]
    if weight.device.type != "meta":
        return torch.device(weight.device)
    placed = getattr(model, "hf_device_map", None) or {}
    main = [d for d in placed.values() if d not in ("cpu", "disk")]
    if not main:
        return torch.device("cpu")
    # A GPU index in a device map is a CUDA device.
    return torch.device("cuda", main[0]) if isinstance(main[0], int) else torch.device(main[0])


def is_quantized(param: torch.Tensor) -> bool:
    """Whether ``param`` is a bitsandbytes-quantized weight (4-bit or 8-bit)."""
    return type(param).__name__ in _QUANTIZED


def offloaded(model: nn.Module) -> list[str]:
    """Names of the parameters accelerate keeps offloaded (``meta`` in the module)."""
    return [n for n, p in model.named_parameters() if p.device.type == "meta"]


def bake_blockers(model: nn.Module) -> str | None:
    """Why the weights of ``model`` cannot be edited in place, or None when they can."""
    quantized = [n for n, p in model.named_parameters() if is_quantized(p)]
    if quantized:
        return f"{len(quantized)} weights are quantized (e.g. {quantized[0]})"
    away = offloaded(model)
    if away:
        return f"{len(away)} weights are offloaded by the device map (e.g. {away[0]})"
    return None


@contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """The module's own parameters in place for the block (accelerate's
    ``align_module_device``; a module that is not offloaded is left as it is)."""
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield


def in_place(bound: BoundWriter) -> bool:
    """Whether the writer's weight is in memory and unquantized (editable in place)."""
    param = bound.module.get_parameter(bound.writer.tensor.rsplit(".", 1)[-1])
    return param.device.type != "meta" and not is_quantized(param)


def dense_weight(bound: BoundWriter) -> torch.Tensor:
    """The canonical ``(d_model, d_in)`` weight of a writer as a plain tensor: the live view
    for an ordinary writer (no copy, as :meth:`BoundWriter.weight`), else a float copy,
    onloaded from an offload and dequantized from bitsandbytes' storage as needed."""
    from abliterate.model.anatomy import canonical

    if in_place(bound):
        return bound.weight()
    name = bound.writer.tensor.rsplit(".", 1)[-1]
    with onloaded(bound.module):
        param = bound.module.get_parameter(name)
        if is_quantized(param):
            from transformers.integrations.bitsandbytes import dequantize_bnb_weight

            # An 8-bit layer (Linear8bitLt) keeps the weight's scales in its ``state``.
            state = bound.module.state if type(param).__name__ == "Int8Params" else None
            dense = dequantize_bnb_weight(param, state)
        else:
            dense = param.detach()
        dense = dense.float().clone()
    return canonical(dense, bound.writer.layout, bound.writer.expert)
