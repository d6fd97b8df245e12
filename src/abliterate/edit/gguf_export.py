"""GGUF out: an (edited) transformers model written as a GGUF file llama.cpp runs.

:func:`export_gguf` writes the architecture, the hyper-parameters llama.cpp reads, the
tokenizer (vocabulary, merges, token types, special ids, chat template) and every tensor under
llama.cpp's names, in F32, F16, BF16 or Q8_0 (``gguf.quants.quantize``), with gguf-py's
``GGUFWriter``. Families: llama and mistral (as llama.cpp's ``llama`` architecture, query and key
rows permuted for its rotary embedding), qwen2 and qwen3; gemma is written too (norm gains stored
as ``1 + w``, as llama.cpp's Gemma expects), but transformers 5 cannot read gemma GGUF files back,
so only its tensors and metadata are checked. Rotary scaling (llama 3.1's ``llama3``, yarn,
linear) is refused: llama.cpp needs factors this writer does not compute.

The tokenizer comes from a source GGUF when the model came from one (its ``tokenizer.*`` fields
are copied exactly), else from the transformers tokenizer: byte-level BPE vocabularies (GPT-2
style: Qwen, Llama 3, SmolLM) are written with gguf-py's ``BpeVocab`` and ``SpecialVocab``;
SentencePiece vocabularies need the model's ``tokenizer.model`` and are refused. llama.cpp picks
its pre-tokenizer by name; it is chosen per family here (``qwen2`` for Qwen, ``llama-bpe`` for
Llama 3, ``default`` otherwise), not by hashing the tokenizer's output as llama.cpp's converter
does.

Tensors whose rows are not a multiple of the type's block (32 for Q8_0) are written in F16, and
one-dimensional tensors (norms, biases) in F32, as llama.cpp's converter does. Tensors are
converted and written one at a time (:func:`write_gguf` reads them through a
:class:`TensorSource`, so a checkpoint can be converted without loading the model), so memory
beyond the model is about one tensor.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from abliterate.errors import ExportError
from abliterate.model.gguf_store import (
    GGUF_ARCH,
    NORM_PLUS_ONE_ARCHES,
    ROPE_PERMUTED_ARCHES,
    field_value,
    gguf_tensor_name,
    permute_rope_rows,
    tensor_name_map,
)
from abliterate.progress import progress

if TYPE_CHECKING:
    import gguf
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_OUT_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's pre-tokenizer names for the byte-level BPE vocabularies of each family.
_PRE_TOKENIZER = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe"}
_FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


@dataclass
class GGUFExport:
    """A written GGUF file.

    Attributes:
        path: The file.
        out_type: The requested type (``q8_0`` …).
        size: Its size in bytes.
        fallback: Tensors written in F16 because their rows do not fit the type's blocks.
        tokenizer_source: ``"gguf"`` (copied) or ``"transformers"``.
    """

    path: Path
    out_type: str
    size: int
    fallback: list[str] = field(default_factory=list)
    tokenizer_source: str = "transformers"


def _qtype(out_type: str) -> gguf.GGMLQuantizationType:
    import gguf

    if out_type not in GGUF_OUT_TYPES:
        raise ExportError(
            f"unknown GGUF type '{out_type}'; choose one of {', '.join(GGUF_OUT_TYPES)}."
        )
    return gguf.GGMLQuantizationType[out_type.upper()]


def _hyperparameters(writer: gguf.GGUFWriter, config: Any, arch: str) -> None:
    """The hyper-parameters llama.cpp reads for the dense families written here."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ExportError(
            f"rotary scaling '{rope['rope_type']}' is not written to GGUF by this tool (llama.cpp "
            "needs its frequency factors); export safetensors and convert with llama.cpp."
        )
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(int(config.vocab_size))
    if head_dim * heads != int(config.hidden_size) or arch in ("gemma", "qwen3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> None:
    """Every ``tokenizer.*`` field of the GGUF ``source``, byte for byte."""
    import gguf

    reader = gguf.GGUFReader(source, "r")
    found = False
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            value, vtype, sub = field_value(f)
            writer.add_key_value(key, value, vtype, sub)
            found = True
    if not found:
        raise ExportError(f"{source} has no tokenizer fields to copy.")


def _hf_tokenizer(
    writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, family: str, n_vocab: int
) -> None:
    """The vocabulary of a byte-level BPE transformers tokenizer, padded to ``n_vocab``."""
    import gguf
    from gguf.vocab import BpeVocab, SpecialVocab

    with tempfile.TemporaryDirectory(prefix="abliterate-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = BpeVocab(Path(tmp))
        except (FileNotFoundError, ValueError) as exc:
            raise ExportError(
                "only byte-level BPE tokenizers (GPT-2 style) are written to GGUF from a "
                f"transformers tokenizer ({exc}); load the model from its GGUF file to copy the "
                "GGUF tokenizer instead."
            ) from exc
        special = SpecialVocab(Path(tmp), load_merges=True, n_vocab=n_vocab)
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens: list[bytes] = []
    types: list[int] = []
    for i, (text, _score, _type) in enumerate(vocab.all_tokens()):
        tokens.append(text)
        if i in added:  # llama.cpp's converter: special added tokens are control tokens
            kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        else:
            kind = gguf.TokenType.NORMAL
        types.append(int(kind))
    if len(tokens) > n_vocab:
        raise ExportError(f"the tokenizer has {len(tokens)} tokens but the model only {n_vocab}.")
    for i in range(len(tokens), n_vocab):  # embedding rows no token uses
        tokens.append(f"[PAD{i}]".encode())
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_PRE_TOKENIZER.get(family, "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None and tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _convert(name: str, values: np.ndarray, arch: str, config: Any) -> np.ndarray:
    """transformers' tensor as llama.cpp stores it (float32)."""
    if arch in NORM_PLUS_ONE_ARCHES and name.endswith("norm.weight"):
        return values + 1.0
    if arch in ROPE_PERMUTED_ARCHES and (".attn_q." in name or ".attn_k." in name):
        heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
        return permute_rope_rows(values, int(heads), inverse=False)
    return values


@dataclass(frozen=True)
class TensorSource:
    """Where GGUF out reads a model's tensors: every name with its shape, and a reader of one
    tensor (an in-memory model's state dict, or a checkpoint read tensor by tensor).

    Attributes:
        shapes: Hugging Face tensor name -> shape, in the order they are written.
        read: The tensor called ``name`` (any float dtype; read once, when it is written).
    """

    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], torch.Tensor]


def model_tensors(model: PreTrainedModel) -> TensorSource:
    """The tensors of an in-memory model (no copy)."""
    state = model.state_dict()
    return TensorSource({k: tuple(v.shape) for k, v in state.items()}, state.__getitem__)


def _plan(config: Any, tensors: TensorSource, arch: str) -> list[tuple[str, str]]:
    """``(hf name, gguf name)`` of every tensor llama.cpp needs (a tied head once)."""
    names = tensor_name_map(arch, int(config.num_hidden_layers))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # llama.cpp uses token_embd as the head when output.weight is absent.
    return [(hf, gguf_tensor_name(hf, names)) for hf in tensors.shapes
            if not (tied and hf == "lm_head.weight")]  # fmt: skip


def export_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    path: Path,
    out_type: str,
    *,
    name: str,
    tokenizer_gguf: Path | None = None,
) -> GGUFExport:
    """Write the in-memory ``model`` as a GGUF file (see :func:`write_gguf`)."""
    return write_gguf(model.config.get_text_config(), model_tensors(model), tokenizer, path,
                      out_type, name=name, tokenizer_gguf=tokenizer_gguf)  # fmt: skip


def write_gguf(
    config: Any,
    tensors: TensorSource,
    tokenizer: PreTrainedTokenizerBase | None,
    path: Path,
    out_type: str,
    *,
    name: str,
    tokenizer_gguf: Path | None = None,
) -> GGUFExport:
    """Write a model of (text) ``config`` whose tensors ``tensors`` reads as a GGUF file of type
    ``out_type`` at ``path``, atomically, one tensor in memory at a time.

    Args:
        tokenizer: The transformers tokenizer to convert (unused with ``tokenizer_gguf``).
        name: ``general.name`` of the file.
        tokenizer_gguf: A GGUF file whose tokenizer fields are copied (the model's source).

    Raises:
        ExportError: the family, the rotary scaling or the tokenizer cannot be written.
    """
    import gguf

    qtype = _qtype(out_type)
    family = str(config.model_type)
    arch = GGUF_ARCH.get(family)
    if arch is None:
        raise ExportError(
            f"'{family}' models are not written to GGUF; families: {', '.join(sorted(GGUF_ARCH))}."
        )
    plan = _plan(config, tensors, arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    result = GGUFExport(path=path, out_type=out_type, size=0)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPE[out_type]]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hyperparameters(writer, config, arch)
        if tokenizer_gguf is not None:
            _copy_tokenizer(writer, tokenizer_gguf)
            result.tokenizer_source = "gguf"
        elif tokenizer is None:
            raise ExportError("GGUF out needs a tokenizer or a GGUF to copy one from.")
        else:
            _hf_tokenizer(writer, tokenizer, family, int(config.vocab_size))
        types = []
        for hf, g in plan:
            shape = tensors.shapes[hf]
            kind = _tensor_type(shape, qtype)
            if kind != qtype and len(shape) > 1:
                result.fallback.append(g)
            types.append(kind)
            writer.add_tensor_info(g, shape, np.dtype(np.float32), _nbytes(shape, kind),
                                   raw_dtype=kind)  # fmt: skip
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (hf, g), kind in progress(list(zip(plan, types, strict=True)), desc="Writing GGUF"):
            values = tensors.read(hf).detach().to("cpu").float().numpy()
            writer.write_tensor_data(gguf.quants.quantize(_convert(g, values, arch, config), kind))
        writer.close()
        tmp.replace(path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    result.size = path.stat().st_size
    return result


def _tensor_type(shape: Any, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The type one tensor is written in (see the module docstring)."""
    import gguf

    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    import gguf

    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return int(np.prod(byte_shape))
