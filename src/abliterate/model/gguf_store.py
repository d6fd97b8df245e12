"""GGUF files as weight stores: named tensors read, dequantized, edited and requantized in place.

A GGUF file (llama.cpp's format) keeps every tensor in its own type (F32, F16, BF16, the block
quantizations Q4_0 … Q8_0, the K-quants, the I-quants) under llama.cpp's names
(``blk.3.ffn_down.weight``). :class:`GGUFStore` presents such a file as a
:class:`~abliterate.model.stores.WeightStore` under Hugging Face names
(``model.layers.3.mlp.down_proj.weight``, resolved with gguf-py's own tensor-name tables), so the
anatomy and the edit code address it exactly as they address a live model:

* :meth:`GGUFStore.read` dequantizes one tensor (``gguf.quants.dequantize``) to float32, in the
  orientation transformers uses (GGUF's row-major data is ``(out, in)`` like ``nn.Linear``);
* :meth:`GGUFStore.writable` lends a dequantized tensor and, on exit, requantizes what was written
  into it *to the tensor's own type* (``gguf.quants.quantize``); a type the ``gguf`` package
  cannot quantize (K-quants, I-quants) is refused, never silently converted to another type;
* :meth:`GGUFStore.write` writes a new file: every metadata field and every tensor that was not
  written is copied byte for byte, the written ones in their requantized form.

Only the tensors an edit touches are ever dequantized; the rest stay memory-mapped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from abliterate.errors import ExportError, ModelLoadError, UnsupportedArchitectureError
from abliterate.model.anatomy import Anatomy, Writer

if TYPE_CHECKING:
    import gguf
    import torch

# transformers model_type -> llama.cpp architecture. Mistral's dense models are llama models to
# llama.cpp (its converter writes them as "llama"), and so are they here.
GGUF_ARCH: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
}
# llama.cpp architecture -> the anatomy family that edits it.
FAMILY_OF_ARCH: dict[str, str] = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                                  "gemma": "gemma"}  # fmt: skip
# Rows dequantized at a time by GGUFStore.rewrite_rows (a 152k-token embedding of width 896 is
# 545 MB in float32; 16k rows of it are 59 MB).
ROW_CHUNK = 16384
# llama.cpp's Gemma stores RMSNorm gains as 1 + w (transformers keeps w and adds 1 at run time).
NORM_PLUS_ONE_ARCHES = frozenset({"gemma"})
# llama.cpp's llama architecture keeps the rows of the query and key projections permuted for
# its rotary embedding (interleaved pairs instead of two halves).
ROPE_PERMUTED_ARCHES = frozenset({"llama"})


def requantizable_types() -> frozenset[gguf.GGMLQuantizationType]:
    """The types an edited tensor is written back in: those ``gguf.quants`` can quantize.

    gguf-py also quantizes the ternary TQ1_0/TQ2_0 and MXFP4 formats; they are left out on
    purpose (a ternary or 4-bit float model is trained for its grid, and an edited matrix
    rounded back to it loses the edit), so tensors of those types take the LoRA path.
    """
    import gguf

    t = gguf.GGMLQuantizationType
    return frozenset({t.F32, t.F16, t.BF16, t.Q8_0, t.Q4_0, t.Q4_1, t.Q5_0, t.Q5_1})


def tensor_name_map(arch: str, n_layers: int) -> gguf.TensorNameMap:
    """gguf-py's table of Hugging Face -> GGUF tensor names for ``arch``."""
    import gguf

    by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise UnsupportedArchitectureError(f"gguf-py does not know the architecture '{arch}'.")
    return gguf.get_tensor_name_map(by_name[arch], n_layers)


def gguf_tensor_name(hf_name: str, names: gguf.TensorNameMap) -> str:
    """The GGUF name of the Hugging Face tensor ``hf_name`` (``….weight``/``….bias`` kept).

    Raises:
        ExportError: gguf-py's table has no GGUF name for it.
    """
    module, _, suffix = hf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        module, suffix = hf_name, ""
    mapped = names.get_name(module)
    if mapped is None:
        raise ExportError(f"no GGUF tensor name for '{hf_name}' in gguf-py's tables.")
    return f"{mapped}.{suffix}" if suffix else mapped


def permute_rope_rows(rows: np.ndarray, n_head: int, inverse: bool) -> np.ndarray:
    """llama.cpp's row order of a llama query/key projection (``inverse``: back to transformers').

    transformers keeps each head's rotary pairs as two halves; llama.cpp interleaves them. ``rows``
    is ``(n_head * head_dim, …)`` (a weight or a bias).
    """
    half = rows.shape[0] // n_head // 2
    if inverse:
        split = rows.reshape(n_head, half, 2, *rows.shape[1:])
    else:
        split = rows.reshape(n_head, 2, half, *rows.shape[1:])
    return split.swapaxes(1, 2).reshape(rows.shape)


def field_value(field: Any) -> tuple[Any, Any, Any]:
    """``(value, type, sub_type)`` of a ``gguf.ReaderField`` as ``GGUFWriter.add_key_value`` takes
    them. Strings stay bytes, so that a vocabulary is copied exactly even where a token is not
    valid UTF-8."""
    import gguf

    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]), vtype, None
    if vtype != gguf.GGUFValueType.ARRAY:
        return field.contents(), vtype, None
    if len(field.types) != 2:
        raise ExportError(f"GGUF field '{field.name}' is a nested array, which is not copied.")
    sub = field.types[1]
    if sub == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]) for i in field.data], vtype, sub
    return field.contents(), vtype, sub


@dataclass(frozen=True)
class RawTensor:
    """One tensor as a GGUF file stores it.

    Attributes:
        data: The stored data: float arrays for F32/F16 (numpy shape = transformers' shape),
            ``uint8`` blocks ``(rows, bytes per row)`` for every other type.
        qtype: Its ``gguf.GGMLQuantizationType``.
    """

    data: np.ndarray
    qtype: Any


class GGUFStore:
    """A GGUF file as a :class:`~abliterate.model.stores.WeightStore` (see the module docstring).

    Attributes:
        path: The source file (opened read-only, memory-mapped; never modified).
        arch: llama.cpp architecture (``general.architecture``).
        written: GGUF names of the tensors replaced so far, with their (own) type names.
        added: GGUF names of tensors added by :meth:`add_tensor`.
    """

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"GGUF file {self.path} does not exist.")
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, OSError) as exc:
            raise ModelLoadError(f"{self.path} is not a readable GGUF file: {exc}") from exc
        self.arch = str(self.field("general.architecture"))
        if self.arch not in FAMILY_OF_ARCH:
            raise UnsupportedArchitectureError(
                f"{self.path.name} is a '{self.arch}' GGUF; editable GGUF architectures: "
                f"{', '.join(sorted(FAMILY_OF_ARCH))}."
            )
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.n_layers = int(self.field(f"{self.arch}.block_count"))
        self.names = tensor_name_map(self.arch, self.n_layers)
        self._replaced: dict[str, RawTensor] = {}
        self.added: list[str] = []

    # --- metadata --------------------------------------------------------------------------------

    def field(self, key: str, default: Any = None) -> Any:
        """The value of metadata field ``key`` (strings decoded), or ``default``."""
        f = self.reader.fields.get(key)
        if f is None:
            if default is None:
                raise ModelLoadError(f"{self.path.name} has no '{key}' metadata field.")
            return default
        return f.contents()

    def config(self) -> dict[str, Any]:
        """The few ``config.json`` entries the anatomy needs, read from the metadata."""
        a = self.arch
        return {
            "model_type": FAMILY_OF_ARCH[a],
            "num_hidden_layers": self.n_layers,
            "hidden_size": int(self.field(f"{a}.embedding_length")),
            "num_attention_heads": int(self.field(f"{a}.attention.head_count")),
            "num_key_value_heads": int(
                self.field(f"{a}.attention.head_count_kv", self.field(f"{a}.attention.head_count"))
            ),
        }

    def anatomy(self) -> Anatomy:
        """The residual anatomy of the model in the file (resolved from its metadata)."""
        return Anatomy.from_config(self.config())

    # --- WeightStore ----------------------------------------------------------------------------

    def gguf_name(self, name: str) -> str:
        """The GGUF name of the Hugging Face tensor ``name``."""
        return gguf_tensor_name(name, self.names)

    def locate(self, writer: Writer) -> Writer:
        """The writer itself: the store is addressed by Hugging Face tensor names."""
        return writer

    def has(self, name: str) -> bool:
        """Whether the file holds the Hugging Face tensor ``name``."""
        try:
            return self.gguf_name(name) in self.tensors
        except ExportError:
            return False

    def raw(self, gguf_name: str) -> RawTensor:
        """The stored form of ``gguf_name`` (replaced or added data where there is some)."""
        if gguf_name in self._replaced:
            return self._replaced[gguf_name]
        if gguf_name not in self.tensors:
            raise ModelLoadError(f"{self.path.name} has no tensor '{gguf_name}'.")
        t = self.tensors[gguf_name]
        return RawTensor(t.data, t.tensor_type)

    def qtype(self, name: str) -> Any:
        """The stored type of the Hugging Face tensor ``name``."""
        return self.raw(self.gguf_name(name)).qtype

    def can_requantize(self, name: str) -> bool:
        """Whether an edit of ``name`` can be written back in its own type."""
        return self.qtype(name) in requantizable_types()

    def read(self, name: str) -> torch.Tensor:
        """The Hugging Face tensor ``name``, dequantized to float32 (a new tensor)."""
        import gguf
        import torch

        g = self.gguf_name(name)
        raw = self.raw(g)
        values = np.array(gguf.quants.dequantize(raw.data, raw.qtype), dtype=np.float32)
        return torch.from_numpy(self._to_hf(g, values))

    @contextmanager
    def writable(self, name: str) -> Iterator[torch.Tensor]:
        """The dequantized tensor ``name``; what is written into it is requantized to its type.

        Raises:
            ExportError: the tensor's type cannot be requantized by the ``gguf`` package.
        """
        g = self.gguf_name(name)
        raw = self.raw(g)
        if raw.qtype not in requantizable_types():
            raise ExportError(
                f"'{g}' is {raw.qtype.name}, which the gguf package cannot requantize; write the "
                "edit of this tensor as a LoRA adapter instead."
            )
        tensor = self.read(name)
        yield tensor
        self._replaced[g] = RawTensor(self._quantize(g, tensor.numpy(), raw.qtype), raw.qtype)

    def rewrite_rows(
        self,
        name: str,
        edit_rows: Callable[[torch.Tensor, int], torch.Tensor],
        chunk: int = ROW_CHUNK,
    ) -> None:
        """Rewrite the stored rows of ``name`` ``chunk`` rows at a time, each chunk dequantized,
        passed to ``edit_rows(rows, first_row)`` (float32 ``(chunk, row length)``, returns the
        edited rows) and requantized to the tensor's own type.

        For a tensor whose rows are edited independently (a token embedding: one row per token)
        this is :meth:`writable` without ever holding the whole tensor in float32.

        Raises:
            ExportError: the tensor's type cannot be requantized by the ``gguf`` package.
        """
        import gguf
        import torch

        g = self.gguf_name(name)
        raw = self.raw(g)
        if raw.qtype not in requantizable_types() or raw.data.ndim != 2:
            raise ExportError(f"'{g}' ({raw.qtype.name}) cannot be requantized row by row.")
        if self.arch in NORM_PLUS_ONE_ARCHES | ROPE_PERMUTED_ARCHES and g != "token_embd.weight":
            raise ExportError(f"'{g}' is stored in llama.cpp's own convention; use writable().")
        out = np.empty_like(raw.data)
        for start in range(0, raw.data.shape[0], chunk):
            rows = np.array(gguf.quants.dequantize(raw.data[start : start + chunk], raw.qtype),
                            dtype=np.float32)  # fmt: skip
            edited = edit_rows(torch.from_numpy(rows), start).detach().float().numpy()
            out[start : start + chunk] = gguf.quants.quantize(edited, raw.qtype)
        self._replaced[g] = RawTensor(out, raw.qtype)

    def _quantize(self, gguf_name: str, values: np.ndarray, qtype: Any) -> np.ndarray:
        import gguf

        return gguf.quants.quantize(self._from_hf(gguf_name, values.astype(np.float32)), qtype)

    def _to_hf(self, gguf_name: str, values: np.ndarray) -> np.ndarray:
        """transformers' conventions for a stored tensor (inverse of :meth:`_from_hf`)."""
        if self.arch in NORM_PLUS_ONE_ARCHES and gguf_name.endswith("norm.weight"):
            return values - 1.0
        if self.arch in ROPE_PERMUTED_ARCHES and _is_rope_permuted(gguf_name):
            return permute_rope_rows(values, self._heads(gguf_name), inverse=True)
        return values

    def _from_hf(self, gguf_name: str, values: np.ndarray) -> np.ndarray:
        if self.arch in NORM_PLUS_ONE_ARCHES and gguf_name.endswith("norm.weight"):
            return values + 1.0
        if self.arch in ROPE_PERMUTED_ARCHES and _is_rope_permuted(gguf_name):
            return permute_rope_rows(values, self._heads(gguf_name), inverse=False)
        return values

    def _heads(self, gguf_name: str) -> int:
        key = "head_count" if ".attn_q." in gguf_name else "head_count_kv"
        return int(self.field(f"{self.arch}.attention.{key}"))

    # --- new file --------------------------------------------------------------------------------

    def add_tensor(self, gguf_name: str, tensor: RawTensor) -> None:
        """Add a tensor the source does not have (written after the source's tensors)."""
        if gguf_name in self.tensors or gguf_name in self._replaced:
            raise ValueError(f"{self.path.name} already has a tensor '{gguf_name}'")
        self._replaced[gguf_name] = tensor
        self.added.append(gguf_name)

    @property
    def written(self) -> dict[str, str]:
        """GGUF name -> type name of every tensor replaced (not added) so far."""
        return {n: t.qtype.name for n, t in self._replaced.items() if n not in self.added}

    def write(self, out: Path) -> None:
        """Write the file with its replacements and additions to ``out``, atomically.

        Every metadata field and every tensor not replaced is copied byte for byte; the
        tensors keep the source's order, added ones follow.
        """
        import gguf

        if out.resolve() == self.path.resolve():
            raise ExportError(f"refusing to overwrite the input {self.path}; choose another --out.")
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
        writer = gguf.GGUFWriter(tmp, self.arch)
        alignment = self.reader.fields.get("general.alignment")
        if alignment is not None:
            writer.data_alignment = int(alignment.contents())
        for key, f in self.reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue  # the header, and the architecture GGUFWriter writes itself
            value, vtype, sub = field_value(f)
            writer.add_key_value(key, value, vtype, sub)
        for name in [*self.tensors, *self.added]:
            raw = self.raw(name)
            writer.add_tensor(name, raw.data, raw_dtype=raw.qtype)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
            writer.close()
            tmp.replace(out)
        finally:
            writer.close()
            tmp.unlink(missing_ok=True)


def _is_rope_permuted(gguf_name: str) -> bool:
    return ".attn_q." in gguf_name or ".attn_k." in gguf_name
