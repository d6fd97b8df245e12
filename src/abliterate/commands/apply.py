"""``abliterate apply --model FILE --direction EDIT --out OUT``: apply a saved edit to a model file.

This module holds the GGUF case: the file is edited in place in its own tensor types, and the
tensors whose type the ``gguf`` package cannot requantize get their edit as a GGUF LoRA adapter
beside ``OUT`` (:func:`abliterate.edit.gguf.apply_gguf`). The edit comes from a run directory or
a directory with ``edit_spec.json``, a saved direction (``direction.safetensors`` + ``.json``), or
a plain ``.npy`` vector of the hidden size.
"""

from __future__ import annotations

from pathlib import Path

from abliterate.config import ApplyConfig
from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.core.edits import EDIT_FILE, Edit, load_edit
from abliterate.edit.gguf import GGUFEdit, adapter_path, apply_gguf
from abliterate.errors import ConfigError, OutputDirError
from abliterate.model.gguf_store import GGUFStore


def load_edit_file(path: Path, n_layers: int, d_model: int, strength: float) -> Edit:
    """The edit ``path`` names, for a model of ``n_layers`` layers and width ``d_model``.

    Raises:
        ConfigError: the file is none of the accepted forms, or does not fit the model.
    """
    import numpy as np
    import torch

    if path.is_dir() and (path / EDIT_FILE).is_file():
        try:
            edit = load_edit(path)
        except ValueError as exc:
            raise ConfigError(f"--direction {path}: {exc}") from exc
    elif path.suffix == ".npy" and path.is_file():
        vector = np.load(path, allow_pickle=False)
        if vector.ndim != 1:
            raise ConfigError(f"--direction {path} holds shape {vector.shape}, not a vector.")
        direction = Direction(torch.from_numpy(vector.astype(np.float32)), model=path.name)
        edit = Ablation.uniform(direction.normalized(), n_layers, strength)
    elif path.with_suffix(".json").is_file() and path.with_suffix(".safetensors").is_file():
        edit = Ablation.uniform(Direction.load(path.with_suffix("")), n_layers, strength)
    else:
        raise ConfigError(
            f"--direction {path} is not a run directory, an edit directory (edit_spec.json), a "
            "saved direction (.safetensors with its .json) or a .npy vector."
        )
    try:
        edit.check(d_model, n_layers)
    except ValueError as exc:
        raise ConfigError(f"--direction {path} does not fit the model: {exc}") from exc
    return edit


def apply_to_gguf(config: ApplyConfig) -> GGUFEdit:
    """The GGUF case of ``abliterate apply``."""
    src, out = Path(config.model), config.out
    if out.suffix != ".gguf":
        raise ConfigError(f"--out {out} must be a .gguf file for a GGUF model.")
    for target in (out, adapter_path(out)):
        if target.exists() and not config.overwrite:
            raise OutputDirError(f"{target} exists; pass --overwrite to replace it.")
    if out.exists() and out.resolve() == src.resolve():
        raise OutputDirError(f"--out {out} is the input; the input is never overwritten.")
    anatomy = GGUFStore(src).anatomy()
    edit = load_edit_file(config.direction, anatomy.n_layers, anatomy.d_model, config.strength)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = apply_gguf(edit, src, out)
    if result.adapter is None:
        adapter_path(out).unlink(missing_ok=True)  # an old adapter must not pass for this edit's
    print(result.describe())
    return result


def apply(config: ApplyConfig) -> GGUFEdit:
    """``abliterate apply``: dispatch on the model's format."""
    if Path(config.model).suffix == ".gguf":
        return apply_to_gguf(config)
    raise ConfigError(
        f"--model {config.model}: apply edits .gguf files here; safetensors checkpoints are "
        "edited by the streaming apply."
    )
