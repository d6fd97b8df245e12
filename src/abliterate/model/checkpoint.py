"""A safetensors checkpoint on disk, read one tensor at a time, and how its tensors make up a
model's parameters.

:class:`Checkpoint` reads only the headers when it is opened (``model.safetensors`` or the
shards of ``model.safetensors.index.json``): every tensor's file, dtype, shape and byte range.
:meth:`Checkpoint.read` then loads one tensor with a plain positioned read (no memory map, so
the memory a tensor takes is its own bytes and nothing else, which is what streaming is for).
The safetensors library reads and writes whole files; it gives neither byte offsets nor
in-place writes, which a streamed edit needs. The format itself is small and documented (an
8-byte little-endian header length, a JSON header, then the raw little-endian data), so the
header is parsed here.

File names are not always parameter names. transformers 5 converts some checkpoints while it
loads them: Mixtral's ``block_sparse_moe.experts.{e}.w2.weight`` and Qwen-MoE's
``mlp.experts.{e}.down_proj.weight`` become one fused ``mlp.experts.down_proj`` parameter of
shape ``(experts, d_model, d_in)``, and some keys are renamed. :class:`ParameterMap` resolves
every parameter of a model to the file tensors it is made of, with transformers' own conversion
list (:func:`transformers.conversion_mapping.get_model_conversion_mapping`, the list
``from_pretrained`` applies; also used by PEFT) and its renaming rules
(:func:`transformers.core_model_loading.rename_source_key`). The model it needs is a
*skeleton*: built from the config on the meta device, it holds shapes and names, no weights.
A residual writer of the anatomy is then located in the file (:meth:`ParameterMap.locate`):
the same fused tensor, or the one per-expert tensor of its expert. A writer that cannot be
located is an error, never a skip.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from abliterate.errors import ModelLoadError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.core_model_loading import WeightConverter

    from abliterate.model.anatomy import Layout, Writer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype codes and their torch dtypes."""

EDITABLE_DTYPES = ("F64", "F32", "F16", "BF16")
"""Dtypes a weight edit can rewrite exactly; 8-bit floats carry block scales elsewhere."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lies.

    Attributes:
        key: Its name in the file.
        file: The file holding it (a name inside the checkpoint directory).
        dtype: safetensors dtype code (``BF16``, ``F32``, …).
        shape: Its shape.
        begin, end: Byte range inside the file's data section.
    """

    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data."""
        return self.end - self.begin


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """``(data_start, header)`` of a safetensors file: the byte where the data section begins,
    and the parsed JSON header (tensor entries and ``__metadata__``).

    Raises:
        ModelLoadError: the file is not a safetensors file.
    """
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                raise ValueError(f"implausible header length {size}")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} has a malformed safetensors header")
    return 8 + size, header


class Checkpoint:
    """The safetensors weights and config of a model directory, read lazily.

    Attributes:
        directory: The model directory.
        config: ``config.json`` as a dict.
        files: Weight files, in index order.
        tensors: Every tensor by its name in the files.
        data_start: Per file, the byte where its data section begins.
        index: ``model.safetensors.index.json`` as a dict, or None for a single-file model.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{config_path} is not a readable model config: {exc}") from exc
        if not isinstance(config, dict) or "model_type" not in config:
            raise ModelLoadError(f"{config_path} is not a transformers model config")
        self.config: dict[str, Any] = config
        self.index: dict[str, Any] | None = None
        index_path = self.directory / INDEX_FILE
        if index_path.is_file():
            self.index = json.loads(index_path.read_text(encoding="utf-8"))
            self.files = list(dict.fromkeys(self.index["weight_map"].values()))
        elif (self.directory / SINGLE_FILE).is_file():
            self.files = [SINGLE_FILE]
        else:
            raise ModelLoadError(
                f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; streaming works "
                "on safetensors checkpoints."
            )
        self.tensors: dict[str, TensorInfo] = {}
        self.data_start: dict[str, int] = {}
        for file in self.files:
            start, header = read_header(self.directory / file)
            self.data_start[file] = start
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                self.tensors[key] = TensorInfo(
                    key, file, entry["dtype"], tuple(entry["shape"]), int(begin), int(end)
                )

    @property
    def nbytes(self) -> int:
        """Total size of the tensors' data."""
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, key: str) -> torch.Tensor:
        """Load the tensor ``key`` (a fresh, writable tensor in the file's dtype).

        Raises:
            KeyError: the checkpoint has no such tensor.
        """
        info = self.tensors[key]
        buffer = bytearray(info.nbytes)
        view = memoryview(buffer)
        with (self.directory / info.file).open("rb", buffering=0) as f:
            f.seek(self.data_start[info.file] + info.begin)
            done = 0
            while done < info.nbytes:  # a raw read may return fewer bytes than asked
                n = f.readinto(view[done:])
                if not n:
                    raise ModelLoadError(f"{info.file} ends inside tensor {key}")
                done += n
        dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).view(info.shape)

    def skeleton(self, dtype: torch.dtype | None = None) -> PreTrainedModel:
        """The model this checkpoint is for, built from its config on the meta device (names
        and shapes, no weights; parameters in ``dtype``, default the config's); buffers computed
        from the config (rotary frequencies) are real, as a loaded model's are."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.directory)
        kwargs = {} if dtype is None else {"dtype": dtype}
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        model.tie_weights()  # accelerate's empty parameters come untied
        return model.eval()


@dataclass(frozen=True)
class Source:
    """One file tensor that goes into a parameter.

    Attributes:
        key: The tensor's name in the file.
        pattern: The conversion's source pattern it matched (None for a plain copy).
        expert: Its expert index, for a per-expert tensor stacked into a fused parameter.
    """

    key: str
    pattern: str | None = None
    expert: int | None = None


class ParameterMap:
    """Which file tensors make up each parameter of ``model`` (a skeleton of the checkpoint's
    architecture); see the module docstring.

    Attributes:
        sources: Per parameter name, its file tensors (one for a plain tensor; one per expert,
            in expert order, for a fused expert parameter stored per expert).
        converters: Per converted parameter, the transformers conversion that builds it.
        tied: Per parameter without a file tensor of its own, the parameter it shares its
            weight with (a head tied to the token embedding).
    """

    def __init__(self, checkpoint: Checkpoint, model: PreTrainedModel) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            apply_renamings,
            rename_source_key,
        )

        self.checkpoint, self.model = checkpoint, model
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        params = dict(model.named_parameters(remove_duplicate=False))
        self.params = params
        meta_state = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        self.sources: dict[str, list[Source]] = {}
        self.converters: dict[str, WeightConverter] = {}
        for key in checkpoint.tensors:
            name, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
            if name not in params:
                continue  # a tensor the causal LM does not use (e.g. a vision tower's)
            source = Source(key)
            if pattern is not None:
                renamed = apply_renamings(key, renamings)
                converter = next(c for c in converters if c.rename_source_key(renamed)[1])
                self.converters[name] = converter
                source = Source(key, pattern, _expert_index(pattern, renamed))
            self.sources.setdefault(name, []).append(source)
        for group in self.sources.values():
            group.sort(key=lambda s: -1 if s.expert is None else s.expert)
        self.tied: dict[str, str] = {}
        by_id: dict[int, list[str]] = {}
        for name, param in params.items():
            by_id.setdefault(id(param), []).append(name)
        for names in by_id.values():
            stored = [n for n in names if n in self.sources]
            for n in names:
                if n not in self.sources and stored:
                    self.tied[n] = stored[0]

    def file_key(self, name: str) -> str:
        """The file tensor that holds parameter ``name`` as it is (no conversion).

        Raises:
            UnsupportedArchitectureError: the parameter is missing or converted.
        """
        sources = self.sources.get(name)
        if not sources:
            raise UnsupportedArchitectureError(
                f"the checkpoint in {self.checkpoint.directory} has no tensor for '{name}'."
            )
        if name in self.converters:
            raise UnsupportedArchitectureError(
                f"'{name}' is converted from {len(sources)} checkpoint tensors, not stored as is."
            )
        return sources[0].key

    def locate(self, writer: Writer) -> Writer:
        """``writer`` as the checkpoint stores it: tensor names in the file, and the layout and
        expert index of the file tensor (a fused expert stored per expert is the expert's own
        ``linear`` tensor, or ``linear_t`` for a transposed fused layout).

        Raises:
            UnsupportedArchitectureError: a tensor of the writer is not in the checkpoint, is
                built by a conversion other than stacking experts, or is not a float tensor.
        """
        key, layout, expert = self._weight(writer)
        bias = None
        if writer.bias is not None and writer.bias in self.params:
            bias, _, bias_expert = self._weight(replace(writer, tensor=writer.bias))
            if (bias_expert is None) != (expert is None):
                raise UnsupportedArchitectureError(
                    f"'{writer.name}': its weight and bias are stored differently per expert."
                )
        post_norms = tuple(self.file_key(n) for n in writer.post_norms)
        return replace(
            writer, tensor=key, layout=layout, expert=expert, bias=bias, post_norms=post_norms
        )

    def _weight(self, writer: Writer) -> tuple[str, Layout, int | None]:
        """File key, layout and expert index of the tensor ``writer.tensor``."""
        from transformers.core_model_loading import MergeModulelist

        name = writer.tensor
        sources = self.sources.get(name)
        if not sources:
            raise UnsupportedArchitectureError(
                f"residual writer '{writer.name}' has no tensor in the checkpoint in "
                f"{self.checkpoint.directory}; it cannot be edited there."
            )
        param_shape = tuple(self.params[name].shape)
        converter = self.converters.get(name)
        if converter is None:
            key, layout, expert = sources[0].key, writer.layout, writer.expert
            expected = param_shape
        else:
            ops = converter.operations
            if not (len(ops) == 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0):
                raise UnsupportedArchitectureError(
                    f"residual writer '{writer.name}' is built from the checkpoint by "
                    f"{[type(op).__name__ for op in ops]}; only experts stacked along the "
                    "first dimension can be edited in a stored checkpoint."
                )
            match = [s for s in sources if s.expert == writer.expert]
            if len(match) != 1 or len(sources) != param_shape[0]:
                raise UnsupportedArchitectureError(
                    f"residual writer '{writer.name}': the checkpoint stores {len(sources)} "
                    f"expert tensors for a parameter of {param_shape[0]} experts."
                )
            key, expert = match[0].key, None
            per_expert: dict[str, Layout] = {"fused": "linear", "fused_t": "linear_t"}
            if writer.layout not in per_expert:
                raise UnsupportedArchitectureError(
                    f"'{writer.name}' is stored per expert but declared '{writer.layout}'."
                )
            layout = per_expert[writer.layout]
            expected = param_shape[1:]
        info = self.checkpoint.tensors[key]
        if info.shape != expected:
            raise UnsupportedArchitectureError(
                f"checkpoint tensor '{key}' has shape {info.shape}, but the model's "
                f"'{writer.name}' needs {expected}."
            )
        if info.dtype not in EDITABLE_DTYPES:
            raise UnsupportedArchitectureError(
                f"checkpoint tensor '{key}' is {info.dtype}; only {', '.join(EDITABLE_DTYPES)} "
                "weights can be edited (dequantize the checkpoint first)."
            )
        return key, layout, expert

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Parameter ``name`` built from its file tensors, as ``from_pretrained`` builds it.

        Raises:
            UnsupportedArchitectureError: the checkpoint has no tensor for it.
        """
        if name in self.tied:
            return self.load(self.tied[name], dtype)
        sources = self.sources.get(name)
        if not sources:
            raise UnsupportedArchitectureError(
                f"the checkpoint in {self.checkpoint.directory} has no tensor for '{name}'."
            )
        converter = self.converters.get(name)
        if converter is None:
            tensor = self.checkpoint.read(sources[0].key)
        else:
            collected: dict[str, Any] = {}
            for s in sources:  # in expert order, as the stacking expects
                assert s.pattern is not None
                collected.setdefault(s.pattern, []).append(self.checkpoint.read(s.key))
            for op in converter.operations:
                collected = op.convert(
                    collected,
                    source_patterns=converter.source_patterns,
                    target_patterns=converter.target_patterns,
                    full_layer_name=name,
                    model=self.model,
                    config=getattr(self.model, "config", None),
                )
            (tensor,) = collected.values()
        return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def _expert_index(pattern: str, key: str) -> int | None:
    """The number a conversion pattern's ``*`` stands for in ``key`` (the expert index)."""
    if "*" not in pattern:
        return None
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    match = re.search(regex, key)
    return None if match is None else int(match.group(1))
