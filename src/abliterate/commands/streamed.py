"""``run --stream``: the pieces of a run whose model does not fit in memory.

With streaming on (``--stream on``, or ``auto`` when the weights need more than
:data:`STREAM_FRACTION` of the memory available), a run

* measures layer by layer: activations, selection scores and search trials come from a
  :class:`~abliterate.model.layerwise.LayerwiseModel` (each decoder layer read once per pass,
  several candidate edits per pass), and the search's confirmations generate layer-streamed;
* writes the edit into ``OUT/model`` by streaming apply (:func:`export_streamed`), tensor by
  tensor, so the exported model is bit for bit the weight form of the edit that was scored;
* evaluates the original and the exported model loaded with accelerate's disk offload
  (:func:`load_offloaded`): each keeps at most :data:`OFFLOAD_FRACTION` of the available memory
  in RAM and reads the rest from disk at every forward pass. Generation then reads the offloaded
  weights once per generated token, which makes evaluating a model much larger than memory
  slow (bounded by disk speed: about size ÷ read speed per token).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from abliterate.commands.apply import edit_checkpoint
from abliterate.config import RunConfig
from abliterate.errors import ConfigError
from abliterate.model.checkpoint import DTYPES, Checkpoint
from abliterate.model.layerwise import LayerwiseModel
from abliterate.model.loading import LoadedModel, load_model, resolve_device, resolve_dtype
from abliterate.model.safetensors_store import SafetensorsStore

if TYPE_CHECKING:
    from abliterate.core.edits import Edit
    from abliterate.edit.weights import EditSummary

log = logging.getLogger(__name__)

STREAM_FRACTION = 0.8
"""``--stream auto`` streams when the weights (in the compute dtype) need more than this share
of the memory available: the activations, caches and Python itself need the rest."""
OFFLOAD_FRACTION = 0.25
"""Share of the available memory each of the two evaluated models keeps in RAM."""


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable``), else physical RAM."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def checkpoint_dir(model: str) -> Path | None:
    """The local safetensors checkpoint ``model`` names (``demo`` or a directory), else None."""
    if model == "demo":
        from abliterate.model.demo import ensure_demo_model

        return ensure_demo_model()
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    return None


def stream_source(config: RunConfig) -> Path | None:
    """The checkpoint a run streams, or None when it loads the model (see the module doc).

    Raises:
        ConfigError: ``--stream on`` for a model that is not a local safetensors checkpoint, or
            with ``--device-map``/``--load-in``.
    """
    if config.stream == "off":
        return None
    placed = config.device_map is not None or config.load_in is not None
    if placed:  # the user placed or quantized the model: it is loaded as asked
        if config.stream == "on":
            raise ConfigError(
                "--stream on measures the model layer by layer from its checkpoint; it cannot "
                "be combined with --device-map or --load-in (drop one of them)."
            )
        return None
    path = checkpoint_dir(config.model)
    if path is None:
        if config.stream == "on":
            raise ConfigError(
                f"--stream on needs a local safetensors checkpoint (a model directory or demo), "
                f"not {config.model!r}; download a hub model first (hf download ORG/NAME "
                "--local-dir DIR)."
            )
        return None
    if config.stream == "on":
        return path
    checkpoint = Checkpoint(path)
    compute = resolve_dtype(config.dtype, resolve_device(config.device)).itemsize
    need = 0
    for t in checkpoint.tensors.values():
        dtype = DTYPES[t.dtype]
        need += (
            t.nbytes // dtype.itemsize * (compute if dtype.is_floating_point else dtype.itemsize)
        )
    available = available_memory()
    if need <= STREAM_FRACTION * available:
        return None
    log.info(
        "the weights need %.1f GB and %.1f GB of memory is available: streaming the model layer "
        "by layer (--stream off to load it anyway)", need / 1e9, available / 1e9,
    )  # fmt: skip
    return path


def open_layerwise(config: RunConfig, path: Path) -> LayerwiseModel:
    """The layer-streamed model a run measures, in the run's device and dtype."""
    device = resolve_device(config.device)
    return LayerwiseModel(path, dtype=resolve_dtype(config.dtype, device), device=device)


def resident_minimum(model: LayerwiseModel) -> int:
    """Bytes an offloaded copy of ``model`` must keep in memory: the embedding, the final norm
    and the head (inputs go where the embedding is, so it cannot be on disk) and room for two
    decoder layers (accelerate loads an offloaded layer next to the resident ones)."""
    params = dict(model.model.named_parameters())  # a tied head is counted once
    a = model.anatomy.anatomy
    ends = (f"{a.decoder}.{a.table.embedding}.", f"{a.decoder}.{a.table.final_norm}.",
            f"{a.lm_head}.")  # fmt: skip
    front = sum(p.numel() for n, p in params.items() if n.startswith(ends))
    layer = max(sum(params[n].numel() for n in model.layer_parameters(i))
                for i in range(model.n_layers))  # fmt: skip
    return int(1.2 * (front + 2 * layer) * model.dtype.itemsize)


def load_offloaded(
    name: str, config: RunConfig, offload_folder: Path, minimum: int = 0
) -> LoadedModel:
    """``name`` loaded with what does not fit in :data:`OFFLOAD_FRACTION` of the available
    memory (but at least ``minimum`` bytes, see :func:`resident_minimum`) offloaded to disk,
    read back at every forward pass."""
    budget = max(int(OFFLOAD_FRACTION * available_memory()), minimum)
    device = resolve_device(config.device)
    memory: dict[int | str, int | str] = {"cpu": budget}
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        memory[index] = memory["cpu"]
    return load_model(
        name,
        device=config.device,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        device_map="auto",
        max_memory=memory,
        offload_folder=offload_folder,
    )


def export_streamed(edit: Edit, source: Path, directory: Path) -> tuple[EditSummary, list[Path]]:
    """Write ``source`` with ``edit`` applied into ``directory`` (created), tensor by tensor."""
    directory.mkdir(parents=True, exist_ok=False)
    return edit_checkpoint(edit, SafetensorsStore(source, directory))
