"""Steering as a llama.cpp control vector: a small GGUF file for ``--control-vector``.

llama.cpp adds a control vector's tensor ``direction.N`` to the output of its decoder layer
``N`` (0-based), for every token, prompt included (``llama_adapter_cvec::apply_to``, called on
each layer's ``l_out``); tensor indices start at 1 because nothing can be added after layer 0's
place in its buffer. So a :class:`~abliterate.core.steering.Steering` edit at site ``post`` of
layer ``L`` is ``direction.L``, and at site ``pre`` of layer ``L`` (the output of layer
``L - 1``) it is ``direction.(L - 1)``. Additions llama.cpp cannot express (site ``mid``, or the
output of layer 0) are refused with the reason; hooks apply them in this tool.

The file holds the vectors already multiplied by the edit's strength, so ``--control-vector
FILE`` reproduces the steering that was measured, and ``--control-vector-scaled FILE S`` scales
it by ``S``. Metadata: ``general.architecture = controlvector``, ``controlvector.model_hint``
(the model's ``model_type``) and ``controlvector.layer_count`` (the number of tensors), as
llama.cpp's own ``cvector-generator`` writes them. The GGUF format is written with the ``gguf``
library (llama.cpp's own Python package); this module only chooses names and values.
"""

from __future__ import annotations

from pathlib import Path

import torch

from abliterate.core.steering import Steering
from abliterate.errors import EditError

ARCH = "controlvector"


def control_vector_layers(steering: Steering) -> dict[int, torch.Tensor]:
    """llama.cpp layer index ``N`` → the ``(d_model,)`` float32 vector of ``direction.N``.

    Raises:
        EditError: the steering adds at a place llama.cpp cannot add at.
    """
    if steering.site == "mid":
        raise EditError(
            "llama.cpp control vectors add to each layer's output only; steering at site 'mid' "
            "(between attention and MLP) cannot be exported as one (use hooks, or a direction "
            "set read at 'pre' or 'post')."
        )
    offset = 1 if steering.site == "pre" else 0  # pre of L is the output of layer L - 1
    out: dict[int, torch.Tensor] = {}
    for layer in steering.steered_layers:
        index = layer - offset
        if index < 1:
            where = "the token embedding" if index < 0 else "layer 0's output"
            raise EditError(
                f"llama.cpp control vectors cannot add at {where} (layer {layer}, site "
                f"{steering.site}); drop that layer with --layers."
            )
        out[index] = steering.vector_at(layer).float().contiguous()
    return out


def write_control_vector(steering: Steering, path: Path, model_hint: str) -> Path:
    """Write ``steering`` as a llama.cpp control vector GGUF at ``path`` (atomically).

    Raises:
        EditError: see :func:`control_vector_layers`.
    """
    import gguf

    layers = control_vector_layers(steering)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    try:
        # GGUFWriter records general.architecture itself (as ``ARCH``).
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_int32(f"{ARCH}.layer_count", len(layers))
        for index, vector in sorted(layers.items()):
            writer.add_tensor(f"direction.{index}", vector.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(path)
    return path


def read_control_vector(path: Path) -> tuple[str, dict[int, torch.Tensor]]:
    """``(model_hint, {N: vector})`` of a control vector GGUF (for checks and tests)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.get_field(f"{ARCH}.model_hint")
    hint = "" if field is None else str(field.contents())
    vectors = {
        int(t.name.split(".", 1)[1]): torch.from_numpy(t.data.copy()).float()
        for t in reader.tensors
        if t.name.startswith("direction.")
    }
    return hint, vectors
