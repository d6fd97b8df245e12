"""A safetensors checkpoint as a weight store: an edited copy written tensor by tensor.

:class:`SafetensorsStore` reads a model directory (one ``model.safetensors`` or the shards of
``model.safetensors.index.json``) and writes its edited copy into another directory, with the
memory of about one tensor whatever the model's size:

* :meth:`~SafetensorsStore.writable` reads one tensor from the source, yields it, and writes
  it back into the copy of its file at the same byte range (an edit keeps dtype and shape, so
  the file's header and every other tensor stay as they were). The copy of a file is made when
  a tensor of it is first written, by the operating system (``shutil.copyfile``), without
  passing through this process.
* :meth:`~SafetensorsStore.finish` copies every file no edit touched byte for byte, and the
  index, config, tokenizer, chat template and generation config with them.
* A head tied to the token embedding keeps the original weights when the embedding is edited:
  the original embedding is written as the head's own tensor (appended to the embedding's file,
  and to the index) and ``tie_word_embeddings`` is turned off in the copied config, as the
  in-memory store unties it.

Names are the file's (see :mod:`abliterate.model.checkpoint`); :meth:`~SafetensorsStore.locate`
turns the anatomy's writers into them.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from abliterate.model.anatomy import Anatomy, Writer
from abliterate.model.checkpoint import (
    INDEX_FILE,
    Checkpoint,
    ParameterMap,
    TensorInfo,
    read_header,
)

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz",
)  # fmt: skip
"""Files never copied beside an edited checkpoint: weights in any format (an unedited copy in
another format would be loaded instead of, or beside, the edited one)."""

_COPY_CHUNK = 64 * 2**20  # bytes per read when a file is rewritten with a tensor appended


class SafetensorsStore:
    """The tensors of the safetensors checkpoint in ``source``, edited into a copy in ``out``.

    ``out`` must be an existing, empty directory (commands build it under a temporary name and
    rename it on success, see :func:`abliterate.commands.rundir.run_directory`). Call
    :meth:`finish` once the edit is applied.

    Attributes:
        source: The model directory read.
        out: The directory written.
        checkpoint: The source's tensors and config.
        anatomy: The model's residual anatomy (from its config).
        params: How the model's parameters map to the file's tensors.
    """

    def __init__(self, source: str | Path, out: str | Path) -> None:
        self.source, self.out = Path(source), Path(out)
        self.checkpoint = Checkpoint(self.source)
        skeleton = self.checkpoint.skeleton()
        self.anatomy = Anatomy.from_config(skeleton.config)
        self.params = ParameterMap(self.checkpoint, skeleton)
        self._out_start: dict[str, int] = {}  # per file copied so far: its data section's start
        self._appended: dict[str, TensorInfo] = {}  # new key -> the tensor its bytes copy
        self._untied = False
        self._embedding_key, self._head_key = self._tied_head()

    def _tied_head(self) -> tuple[str | None, str]:
        """(embedding file key or None, head key): the embedding's key when the head shares
        its weight, and the head's key in the file (or the parameter name, if it has none)."""
        embedding = next(w for w in self.anatomy.writers if w.role == "embedding").tensor
        head = f"{self.anatomy.lm_head}.weight"
        params = self.params.params
        head_key = self.params.sources[head][0].key if head in self.params.sources else head
        if head not in params or params[head] is not params.get(embedding):
            return None, head_key
        return self.params.file_key(embedding), head_key

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds a tensor called ``name`` (a file key)."""
        return name in self.checkpoint.tensors

    def locate(self, writer: Writer) -> Writer:
        """``writer`` with the file's tensor names (see :meth:`ParameterMap.locate`)."""
        return self.params.locate(writer)

    def read(self, name: str) -> torch.Tensor:
        """The source checkpoint's tensor ``name`` (edits written so far are not seen)."""
        return self.checkpoint.read(name)

    @contextmanager
    def writable(self, name: str) -> Iterator[torch.Tensor]:
        """Tensor ``name`` read from the source; what is written into it is saved in the copy
        when the block ends without an error."""
        info = self.checkpoint.tensors[name]
        if name == self._embedding_key and not self._untied:
            self._untie_head(info)
        self._prepare(info.file)
        tensor = self.checkpoint.read(name)
        yield tensor
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
        with (self.out / info.file).open("r+b") as f:
            f.seek(self._out_start[info.file] + info.begin)
            f.write(data.data)

    def _prepare(self, file: str) -> None:
        """Copy ``file`` into the output the first time one of its tensors is written."""
        if file not in self._out_start:
            shutil.copyfile(self.source / file, self.out / file)
            self._out_start[file] = self.checkpoint.data_start[file]

    def _untie_head(self, embedding: TensorInfo) -> None:
        """Give the head its own copy of the original embedding, before the embedding changes."""
        head = self._head_key
        self._untied = True
        if head in self.checkpoint.tensors:
            # The file has a head tensor that loading ignored (the weights were tied): it gets
            # the original embedding, which is what the tied model used as its head.
            target = self.checkpoint.tensors[head]
            if (target.dtype, target.shape) != (embedding.dtype, embedding.shape):
                raise ValueError(f"tied tensors {head} and {embedding.key} differ in dtype/shape")
            self._prepare(target.file)
            with self._source_bytes(embedding) as src, (self.out / target.file).open("r+b") as dst:
                dst.seek(self._out_start[target.file] + target.begin)
                _copy_bytes(src, dst, embedding.nbytes)
        else:
            self._append(embedding.file, head, embedding)
        log.info("the head was tied to the embedding: it keeps the original weights as '%s'", head)

    @contextmanager
    def _source_bytes(self, tensor: TensorInfo) -> Iterator[Any]:
        """The source file of ``tensor``, positioned at its first byte."""
        with (self.source / tensor.file).open("rb") as f:
            f.seek(self.checkpoint.data_start[tensor.file] + tensor.begin)
            yield f

    def _append(self, file: str, key: str, tensor: TensorInfo) -> None:
        """Rewrite the output's ``file`` with the source bytes of ``tensor`` appended as ``key``
        (from the output's copy when there is one, so edits written so far are kept)."""
        src = self.out / file if file in self._out_start else self.source / file
        start, header = read_header(src)
        end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"),
                  default=0)  # fmt: skip
        header[key] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [end, end + tensor.nbytes],
        }
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the format aligns the data section on 8 bytes
        tmp = self.out / f".{file}.tmp"
        with src.open("rb") as f, tmp.open("wb") as out:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            f.seek(start)
            _copy_bytes(f, out, end)
            with self._source_bytes(tensor) as original:
                _copy_bytes(original, out, tensor.nbytes)
        tmp.replace(self.out / file)
        self._out_start[file] = 8 + len(text)
        self._appended[key] = replace(tensor, key=key)

    def finish(self) -> list[Path]:
        """Copy the files no edit touched, the index and the config (untied where the head got
        its own weights) and the other files of the model directory (tokenizer, chat template,
        generation config). Returns the weight files written."""
        for file in self.checkpoint.files:
            self._prepare(file)
        self._write_index()
        self._write_config()
        for path in sorted(self.source.iterdir()):
            name = path.name
            if name in (INDEX_FILE, "config.json") or path.suffix in WEIGHT_SUFFIXES:
                continue
            if path.is_file():
                shutil.copyfile(path, self.out / name)
            else:
                log.info("not copied (a directory): %s", path)
        return [self.out / f for f in self.checkpoint.files]

    def _write_index(self) -> None:
        if self.checkpoint.index is None:
            return
        if not self._appended:
            shutil.copyfile(self.source / INDEX_FILE, self.out / INDEX_FILE)
            return
        index: dict[str, Any] = json.loads(json.dumps(self.checkpoint.index))
        meta = index.setdefault("metadata", {})
        for key, info in self._appended.items():
            index["weight_map"][key] = info.file
            if "total_size" in meta:
                meta["total_size"] = int(meta["total_size"]) + info.nbytes
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (self.out / INDEX_FILE).write_text(text, encoding="utf-8")

    def _write_config(self) -> None:
        if not self._untied:
            shutil.copyfile(self.source / "config.json", self.out / "config.json")
            return
        config = dict(self.checkpoint.config)
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (self.out / "config.json").write_text(text, encoding="utf-8")


def _copy_bytes(src: Any, dst: Any, n: int) -> None:
    """Copy ``n`` bytes from the current position of ``src`` to that of ``dst``, in chunks."""
    while n > 0:
        chunk = src.read(min(n, _COPY_CHUNK))
        if not chunk:
            raise OSError("unexpected end of file while copying a tensor")
        dst.write(chunk)
        n -= len(chunk)
