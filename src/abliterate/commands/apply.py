"""``abliterate apply``: edit a checkpoint on disk, streamed tensor by tensor.

The edit comes from ``--direction`` (:func:`read_edit_source`): a direction saved by the tool,
an edit saved by a run (``edit_spec.json`` or the run directory), or a ``.npy`` vector. The model
is opened as a checkpoint store (:func:`open_store`: a safetensors directory; each further
format is one store class and one line there) and edited through the same
:func:`~abliterate.edit.weights.apply_edit` as a model in memory, so the written model equals
the model edited in memory (tests check it bit for bit). Only the tensors the edit touches are
read; files without one are copied byte for byte; memory stays near one tensor.

The output directory is built under a temporary name and renamed on success. It holds the
edited weights with the source's index, config, tokenizer, chat template and generation config,
and ``abliteration.json``: the edit, where it came from, what was edited, and the SHA-256 of
every weight file written.

A ``.gguf`` model is edited in place in its own tensor types instead, and the tensors whose type
the ``gguf`` package cannot requantize get their edit as a GGUF LoRA adapter beside ``--out``
(:func:`abliterate.edit.gguf.apply_gguf`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from abliterate import __version__
from abliterate.commands.rundir import run_directory
from abliterate.config import ApplyConfig
from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.core.edits import EDIT_FILE, TENSORS_FILE, Edit, load_edit
from abliterate.edit.gguf import GGUFEdit, adapter_path, apply_gguf
from abliterate.edit.weights import EditSummary, apply_edit
from abliterate.errors import ConfigError, ModelLoadError, OutputDirError
from abliterate.files import file_sha256, write_json
from abliterate.model.gguf_store import GGUFStore
from abliterate.model.safetensors_store import SafetensorsStore
from abliterate.progress import Stages

if TYPE_CHECKING:
    from abliterate.model.stores import CheckpointStore

log = logging.getLogger(__name__)

SourceKind = Literal["direction", "edit", "vector"]


@dataclass(frozen=True)
class EditSource:
    """What ``--direction`` named: an edit, or a direction still to be made one.

    Attributes:
        value: The edit saved by a run, or the (unit) direction.
        kind: ``edit``, ``direction`` (saved by the tool) or ``vector`` (a ``.npy`` file).
        files: The files it was read from.
    """

    value: Edit | Direction
    kind: SourceKind
    files: tuple[Path, ...]

    def record(self) -> dict[str, Any]:
        """``abliteration.json``'s description of the source, with each file's SHA-256."""
        return {"kind": self.kind, "files": {str(f): file_sha256(f) for f in self.files}}


def read_edit_source(path: Path) -> EditSource:
    """The edit or direction in ``path`` (see :class:`~abliterate.config.ApplyConfig`).

    Raises:
        ConfigError: nothing usable is there.
    """
    if path.is_dir() or path.name == EDIT_FILE:
        directory = path if path.is_dir() else path.parent
        if (directory / EDIT_FILE).is_file():
            try:
                edit = load_edit(directory)
            except ValueError as exc:
                raise ConfigError(f"--direction {path}: {exc}") from exc
            names = (EDIT_FILE, TENSORS_FILE)
            found = tuple(directory / n for n in names if (directory / n).is_file())
            return EditSource(edit, "edit", found)
        if not (directory / "direction.safetensors").is_file():
            raise ConfigError(
                f"--direction {path} holds neither {EDIT_FILE} nor direction.safetensors."
            )
        path = directory / "direction.safetensors"
    if path.suffix == ".npy":
        return EditSource(_vector(path), "vector", (path,))
    base = path.with_suffix("")
    files = (Path(f"{base}.safetensors"), Path(f"{base}.json"))
    if path.suffix not in (".safetensors", ".json", "") or not all(f.is_file() for f in files):
        raise ConfigError(
            f"--direction {path}: expected a direction saved by the tool (NAME.safetensors with "
            f"NAME.json beside it), a run directory or {EDIT_FILE}, or a .npy vector."
        )
    try:
        direction = Direction.load(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--direction {path} is not a readable direction: {exc}") from exc
    return EditSource(direction, "direction", files)


def _vector(path: Path) -> Direction:
    """A ``.npy`` vector as a unit direction."""
    import numpy as np
    import torch

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--direction {path} is not a readable .npy array: {exc}") from exc
    if array.ndim != 1 or array.dtype.kind not in "fiu":
        raise ConfigError(
            f"--direction {path} must hold one numeric vector of the model's hidden size, got "
            f"shape {array.shape} of {array.dtype}."
        )
    vector = torch.from_numpy(array.astype(np.float32))
    if not bool(torch.isfinite(vector).all()) or float(vector.norm()) == 0.0:
        raise ConfigError(f"--direction {path} must be a finite, non-zero vector.")
    return Direction(vector).normalized()


def build_edit(source: EditSource, n_layers: int, config: ApplyConfig) -> Edit:
    """The edit to apply: a run's edit as saved, or the direction removed at ``--strength``
    from the ``--writers`` of every layer."""
    if isinstance(source.value, Edit):
        given = sorted({"strength", "writers"} & config.model_fields_set)
        if given:
            raise ConfigError(
                f"--{given[0]} applies to a direction or a .npy vector; {config.direction} is an "
                "edit saved by a run, which carries its own strengths and writers."
            )
        return source.value
    s = config.strength

    def strength(kind: str) -> float:
        return s if kind in config.writers else 0.0

    return Ablation(
        direction=source.value,
        embedding=strength("embedding"),
        attention=(strength("attention"),) * n_layers,
        mlp=(strength("mlp"),) * n_layers,
    )


def open_store(model: str, out: Path) -> CheckpointStore:
    """The store that reads ``model`` and writes its edited copy into ``out``.

    Raises:
        ModelLoadError: ``model`` is not a checkpoint a store can edit.
    """
    if model == "demo":
        from abliterate.model.demo import ensure_demo_model

        path = ensure_demo_model()
    else:
        path = Path(model).expanduser()
    if path.is_dir():
        return SafetensorsStore(path, out)
    if not path.exists():
        raise ModelLoadError(
            f"--model {model} does not exist. apply edits a local checkpoint; download a hub "
            "model first (e.g. hf download ORG/NAME --local-dir DIR)."
        )
    raise ModelLoadError(f"--model {model} is not a model directory with safetensors weights.")


def edit_checkpoint(edit: Edit, store: CheckpointStore) -> tuple[EditSummary, list[Path]]:
    """Apply ``edit`` through ``store`` and write the rest of the copy.

    Returns what was edited and the weight files written.

    Raises:
        ConfigError: the edit was made for a model of another shape.
    """
    anatomy = store.anatomy
    try:
        edit.check(anatomy.d_model, anatomy.n_layers)
    except ValueError as exc:
        raise ConfigError(f"the edit does not fit {store.source}: {exc}") from exc
    log.info("model: %s", anatomy.describe())
    summary = apply_edit(edit, store, anatomy)
    return summary, store.finish()


def apply_to_gguf(config: ApplyConfig, source: EditSource) -> GGUFEdit:
    """The GGUF case of ``abliterate apply``: ``--out`` is the edited ``.gguf`` file.

    Raises:
        ConfigError: ``--out`` is not a ``.gguf`` path, or the edit does not fit the model.
        OutputDirError: ``--out`` or its adapter exists without ``--overwrite``, or ``--out``
            is the input.
    """
    src, out = Path(config.model), config.out
    if out.suffix != ".gguf":
        raise ConfigError(f"--out {out} must be a .gguf file for a GGUF model.")
    if out.exists() and out.resolve() == src.resolve():
        raise OutputDirError(f"--out {out} is the input; the input is never overwritten.")
    for target in (out, adapter_path(out)):
        if target.exists() and not config.overwrite:
            raise OutputDirError(f"{target} exists; pass --overwrite to replace it.")
    anatomy = GGUFStore(src).anatomy()
    edit = build_edit(source, anatomy.n_layers, config)
    try:
        edit.check(anatomy.d_model, anatomy.n_layers)
    except ValueError as exc:
        raise ConfigError(f"the edit does not fit {src}: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    result = apply_gguf(edit, src, out)
    if result.adapter is None:
        adapter_path(out).unlink(missing_ok=True)  # an old adapter must not pass for this edit's
    print(result.describe())
    return result


def apply(config: ApplyConfig) -> dict[str, Any] | GGUFEdit:
    """Apply ``config.direction`` to ``config.model`` into ``config.out``; returns the record
    written to ``abliteration.json`` (for a ``.gguf`` model, what was edited)."""
    source = read_edit_source(config.direction)
    if config.model.endswith(".gguf"):
        return apply_to_gguf(config, source)
    stages = Stages()
    with run_directory(config.out, config.overwrite, "apply") as tmp:
        with stages.stage("apply"):
            store = open_store(config.model, tmp)
            edit = build_edit(source, store.anatomy.n_layers, config)
            summary, files = edit_checkpoint(edit, store)
        with stages.stage("checksums"):
            hashes = {f.name: file_sha256(f) for f in files}
        previous = store.source / "abliteration.json"
        record = {
            "abliterate_version": __version__,
            "command": "apply",
            "base_model": {"name": config.model, "source": str(store.source)},
            "edit": edit.to_dict(),
            "edit_source": source.record(),
            "edited": {**summary.to_dict(), "tensors": summary.tensors},
            "weight_files": hashes,
            "timings": stages.to_dict(),
            "previous": _previous_record(previous),
        }
        write_json(tmp / "abliteration.json", record)
    apply_stage = stages.stages[0]
    print(
        f"Edited {len(summary.tensors)} tensors "
        f"({', '.join(f'{n} {r}' for r, n in summary.writers_by_role.items())}) in "
        f"{apply_stage.seconds:.1f} s, peak memory {apply_stage.peak_rss_mb:.0f} MB.\n"
        f"Edited model: {config.out}"
    )
    return record


def _previous_record(path: Path) -> Any:
    """The source model's own ``abliteration.json`` (an earlier edit), kept in the new one."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from exc
