"""The further exports of ``run``/``optimize`` (``--export``): GGUF files and LoRA adapters.

* ``gguf:TYPE`` writes ``OUT/gguf/model-TYPE.gguf`` from the evaluated (edited) model and loads
  it back with transformers to measure its logits against the evaluated model (max ``|Δ logit|``
  and mean KL over every position of a few held-out prompts). The tokenizer is copied from the
  source GGUF when the model came from one (``--model x.gguf``, and the demo model, whose
  shipped GGUF is assembled for it), else converted from the transformers tokenizer.
* ``lora`` writes ``OUT/adapter`` (PEFT); its factors are taken from the *unedited* weights, so
  :func:`lora_before_bake` runs before the edit is baked. ``lora-gguf`` also converts it to a
  llama.cpp adapter, ``OUT/adapter/adapter.gguf``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate.config import RunConfig
from abliterate.core.edits import Edit
from abliterate.edit.checks import load_gguf_model, logit_difference
from abliterate.edit.gguf import TIED_HEAD_LORA, peft_to_gguf_lora
from abliterate.edit.gguf_export import export_gguf
from abliterate.edit.lora import LoraAdapter, lora_from_edit, save_peft
from abliterate.errors import ConfigError
from abliterate.files import file_sha256
from abliterate.model.anatomy import anatomy_of
from abliterate.model.stores import ModuleStore

if TYPE_CHECKING:
    from abliterate.model.loading import LoadedModel


def wants_lora(config: RunConfig) -> bool:
    """Whether the run exports a LoRA adapter (which must be computed before baking)."""
    return any(f in ("lora", "lora-gguf") for f in config.export)


def lora_before_bake(config: RunConfig, loaded: LoadedModel, edit: Edit) -> LoraAdapter | None:
    """The edit's adapter, from the still unedited model, when ``--export`` asks for one."""
    if not wants_lora(config):
        return None
    adapter = lora_from_edit(edit, ModuleStore(loaded.model), anatomy_of(loaded.model).anatomy,
                             base_model=loaded.name, revision=loaded.revision)  # fmt: skip
    adapter.tied_head = tied_head(loaded)
    embedding = any(w.role == "embedding" for w, _ in adapter.deltas.values())
    if "lora-gguf" in config.export and adapter.tied_head and embedding:
        raise ConfigError(f"--export lora-gguf: {TIED_HEAD_LORA}")
    return adapter


def tied_head(loaded: LoadedModel) -> bool:
    """Whether the (still unedited) model uses its token embedding as output head."""
    return bool(getattr(loaded.model.config.get_text_config(), "tie_word_embeddings", False))


def _source_gguf(model: str, workdir: Path) -> Path | None:
    """The GGUF the model was loaded from (its tokenizer is copied), if any."""
    if model.endswith(".gguf"):
        return Path(model).expanduser()
    if model == "demo":
        from abliterate.model.demo import assemble_gguf

        return assemble_gguf(workdir / "demo.gguf")
    return None


def _check(fmt: str, path: Path, run: Path, diff: Any = None, note: str | None = None) -> dict:
    entry: dict[str, Any] = {
        "format": fmt,
        "path": path.relative_to(run).as_posix(),
        "size_bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }
    if diff is not None:
        entry.update(max_abs_logit=diff.max_abs_logit, mean_kl=diff.mean_kl)
    if note:
        entry["note"] = note
    return entry


def write_exports(
    config: RunConfig,
    loaded: LoadedModel,
    adapter: LoraAdapter | None,
    run: Path,
    probe: Sequence[str],
) -> list[dict[str, Any]]:
    """Write every ``--export`` format of the edited ``loaded.model`` into the run directory
    ``run``; returns the ``checks.exports`` entries of the report."""
    entries: list[dict[str, Any]] = []
    gguf_types = [f.split(":", 1)[1] for f in config.export if f.startswith("gguf:")]
    if gguf_types:
        with tempfile.TemporaryDirectory(prefix="abliterate-gguf-") as tmp:
            source = _source_gguf(config.model, Path(tmp))
            for t in gguf_types:
                path = run / "gguf" / f"model-{t.upper()}.gguf"
                result = export_gguf(
                    loaded.model, loaded.tokenizer, path, t,
                    name=f"{loaded.name} abliterated", tokenizer_gguf=source,
                )  # fmt: skip
                reloaded = load_gguf_model(path)
                diff = logit_difference(loaded.model, reloaded, loaded.tokenizer, probe)
                del reloaded
                note = f"{len(result.fallback)} tensors in F16" if result.fallback else None
                entries.append(_check(f"gguf:{t}", path, run, diff, note))
    if adapter is not None:
        save_peft(adapter, run / "adapter")
        entries.append(_check("lora", run / "adapter" / "adapter_model.safetensors", run,
                              note=f"rank {adapter.rank}"))  # fmt: skip
        if "lora-gguf" in config.export:
            path = run / "adapter" / "adapter.gguf"
            family = anatomy_of(loaded.model).anatomy.family
            rank = peft_to_gguf_lora(run / "adapter", anatomy_of(loaded.model).anatomy, family,
                                     path, tied_head=adapter.tied_head)  # fmt: skip
            entries.append(_check("lora-gguf", path, run, note=f"rank {rank}"))
    return entries


def weight_files(run: Path) -> dict[str, str]:
    """SHA-256 of every weight file of a run directory (model, GGUF, adapter), by path."""
    files = [p for p in sorted(run.rglob("*")) if p.is_file() and p.suffix in (".safetensors",
             ".gguf") and p.parent != run]  # fmt: skip
    return {p.relative_to(run).as_posix(): file_sha256(p) for p in files}
