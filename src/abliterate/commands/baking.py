"""Edits baked into the in-memory model by the composing commands (``steer``, ``detox``): an
earlier edit applied first (``--edit``), and a new edit baked with the check that the weights
compute what its hooks computed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate import __version__
from abliterate.core.edits import Edit, load_edit
from abliterate.edit.export import save_model, verify_export
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.weights import bake
from abliterate.errors import ConfigError
from abliterate.model.forward import next_token_logprobs

if TYPE_CHECKING:
    from abliterate.model.loading import LoadedModel

log = logging.getLogger(__name__)


def apply_prior_edit(path: Path | None, loaded: LoadedModel) -> Edit | None:
    """Read the edit in ``path`` (a run directory) and bake it into the in-memory model.

    Raises:
        ConfigError: the directory holds no edit, or one that does not fit the model.
    """
    if path is None:
        return None
    try:
        prior = load_edit(path)
        bake(loaded.model, prior)
    except ValueError as exc:
        raise ConfigError(f"cannot apply --edit {path}: {exc}") from exc
    log.info("applied the %s edit of %s", prior.kind, path)
    return prior


def bake_checked(loaded: LoadedModel, edit: Edit, probe: list[str]) -> dict[str, Any]:
    """Bake ``edit`` into the in-memory model; the report's ``checks``: the largest difference
    of next-token log-probabilities on ``probe`` between its hooks and the baked weights, and the
    writers edited (``export_reload_max_abs_diff`` is filled in by an export)."""
    model, tok = loaded.model, loaded.tokenizer
    with edit_hooks(model, edit):
        hooked = next_token_logprobs(model, tok, probe)
    summary = bake(model, edit)
    baked = next_token_logprobs(model, tok, probe)
    return {
        "hooks_vs_weights_max_abs_diff": float((hooked - baked).abs().max()),
        "export_reload_max_abs_diff": None,
        "edited_writers": summary.to_dict(),
    }


def save_edited(loaded: LoadedModel, edit: Edit, directory: Path, probe: list[str]) -> float:
    """Write the (baked) model with an ``abliteration.json`` naming its base model and
    ``edit`` (the whole edit from the base model); returns the reload check's largest logit
    difference (:func:`~abliterate.edit.export.verify_export`)."""
    record = {
        "abliterate_version": __version__,
        "base_model": {"name": loaded.name, "source": loaded.source, "revision": loaded.revision},
        "edit": edit.to_dict(),
    }
    save_model(loaded.model, loaded.tokenizer, directory, record)
    return verify_export(loaded.model, loaded.tokenizer, directory, probe)
