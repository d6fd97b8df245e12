"""How a run chooses its edit: a saved direction, a given layer's direction, automatic
selection among the candidate directions, or the ``--optimize`` search (:func:`choose_edit`).
Activations, selection scores and trials are measured on the loaded model, or on a
layer-streamed one with ``--stream``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate.commands.runsets import SCORED, TRAIN_SETS, VAL_SETS
from abliterate.config import RunConfig
from abliterate.core.ablation import Ablation
from abliterate.core.directions import Direction
from abliterate.data.chat import ChatSet
from abliterate.errors import ConfigError
from abliterate.files import write_json
from abliterate.measure.activations import collect_activations
from abliterate.measure.candidates import Candidates
from abliterate.measure.refusal import refusal_token_ids
from abliterate.measure.streamed import collect_activations_streamed
from abliterate.model.anatomy import anatomy_of
from abliterate.model.layerwise import LayerwiseModel
from abliterate.progress import Stages
from abliterate.search.objective import (
    REFUSED_ABOVE,
    objective_openings,
    refusal_probabilities,
    refused_prompts,
    search_model,
)
from abliterate.search.optimize import optimize_edit
from abliterate.search.selection import select_direction
from abliterate.search.study import default_storage

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from abliterate.eval.judges import Judge
    from abliterate.model.loading import LoadedModel
    from abliterate.search.optimize import SearchResult
    from abliterate.search.selection import Selection

log = logging.getLogger(__name__)


@dataclass
class EditChoice:
    """The edit a run applies and how it was chosen (selection or search, when either ran)."""

    edit: Ablation
    selection: Selection | None = None
    search: SearchResult | None = None


def _saved_direction(config: RunConfig, d_model: int) -> Direction:
    assert config.direction is not None
    if not config.direction.with_suffix(".json").is_file():
        raise ConfigError(
            f"direction {config.direction} not found (both {config.direction.stem}"
            ".safetensors and .json are needed)."
        )
    direction = Direction.load(config.direction)
    if direction.d_model != d_model:
        raise ConfigError(
            f"direction {config.direction} has d_model={direction.d_model} but the model has "
            f"{d_model}: it was computed for another model."
        )
    return direction


def compute_candidates(
    config: RunConfig,
    loaded: LoadedModel,
    chats: dict[str, ChatSet],
    data: dict[str, Any],
    measured: PreTrainedModel | LayerwiseModel | None = None,
) -> Candidates:
    """Mean activations of the training sets at every layer and site, measured on
    ``measured`` (default: the loaded model; a layer-streamed model with ``--stream``)."""

    model, tok = measured or loaded.model, loaded.tokenizer
    # Per-prompt activations are kept only when the search may use extra directions.
    keep = config.site if config.optimize and config.max_directions > 1 else None
    means = {}
    acts = None
    texts = {key: list(chats[key].texts) for key in TRAIN_SETS}
    if config.refusal_filter:
        texts["train_harmful"] = _refused_texts(config, model, tok, texts["train_harmful"], data)
    # Parallel blocks (Cohere) and one-sublayer layers (Nemotron-H) have no "mid" residual.
    sites = tuple(s for s in config.sites if s != "mid" or anatomy_of(loaded.model).has_mid)
    for key, label in (("train_harmful", "harmful"), ("train_harmless", "harmless")):
        collect = (
            collect_activations_streamed if isinstance(model, LayerwiseModel)
            else collect_activations
        )  # fmt: skip
        means[key], kept = collect(
            model, tok, texts[key], sites=sites,  # type: ignore[arg-type]
            keep_site=keep if key == "train_harmful" else None,
            batch_size=config.batch_size, desc=f"Activations ({label})",
        )  # fmt: skip
        acts = acts if kept is None else kept
    candidates = Candidates(
        harmful_mean=means["train_harmful"],
        harmless_mean=means["train_harmless"],
        sites=sites,
        model=loaded.name,
        revision=loaded.revision,
        dataset_hashes={k: str(data[k]["sha256"]) for k in TRAIN_SETS},
        harmful_acts=acts,
        acts_site=keep,
    )
    if not candidates.has_direction():
        raise ConfigError(
            "the harmful and harmless training prompts give identical activations at every "
            "layer, so there is no direction to find; are the two prompt sets the same?"
        )
    return candidates


def _refused_texts(
    config: RunConfig,
    model: PreTrainedModel | LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    data: dict[str, Any],
) -> list[str]:
    """``--refusal-filter``: the harmful training texts the unedited model refuses (at least
    ``--min-refused``, :func:`~abliterate.search.objective.refused_prompts`); how many were
    used goes into the report's ``data`` record of the set (``n_used``)."""
    probs = refusal_probabilities(
        model, tokenizer, texts, refusal_token_ids(tokenizer), batch_size=config.batch_size
    )
    kept = refused_prompts(probs, config.min_refused)
    refused = int((probs > REFUSED_ABOVE).sum())
    log.info(
        "directions from %d of %d harmful training prompts (%d refused by the next-token "
        "proxy; --min-refused %d)", len(kept), len(texts), refused, config.min_refused,
    )  # fmt: skip
    data["train_harmful"]["n_used"] = len(kept)
    return [texts[i] for i in kept]


def _given_layer(config: RunConfig, candidates: Candidates) -> Direction:
    assert config.layer is not None
    if config.layer >= candidates.n_layers:
        raise ConfigError(
            f"layer {config.layer} is out of range: the model has {candidates.n_layers} layers."
        )
    if candidates.is_degenerate(config.layer, config.site):
        raise ConfigError(
            f"layer {config.layer}, site {config.site!r} has no direction: harmful and harmless "
            "means are identical there; choose another --layer/--site."
        )
    return candidates.direction(config.layer, config.site)


def choose_edit(
    config: RunConfig,
    loaded: LoadedModel,
    chats: dict[str, ChatSet],
    data: dict[str, Any],
    judge: Judge,
    stages: Stages,
    tmp: Path,
    measured: PreTrainedModel | LayerwiseModel | None = None,
) -> EditChoice:
    """The edit to apply: a saved direction's, a given layer's, the automatically selected
    candidate's, or (``--optimize``) the searched one. Activations, scores and trials are
    measured on ``measured`` (default: the loaded model; a layer-streamed one with
    ``--stream``).

    Writes ``candidates.safetensors`` (and ``scores.json`` when selecting,
    ``optimization.json`` when searching) into ``tmp``.
    """

    model, tok = measured or loaded.model, loaded.tokenizer
    n_layers, d_model = anatomy_of(loaded.model).n_layers, anatomy_of(loaded.model).d_model
    if config.direction is not None:
        return EditChoice(Ablation.uniform(_saved_direction(config, d_model), n_layers,
                                           config.strength))  # fmt: skip
    with stages.stage("activations"):
        candidates = compute_candidates(config, loaded, chats, data, model)
        candidates.save(tmp / "candidates.safetensors")
    if config.layer is not None:
        direction = _given_layer(config, candidates)
        return EditChoice(Ablation.uniform(direction, n_layers, config.strength))
    refusal_ids = refusal_token_ids(tok)
    if config.optimize:
        with stages.stage("search"):
            search = _optimize(config, loaded, model, candidates, chats, data, judge, refusal_ids)
        write_json(tmp / "optimization.json", search.to_dict())
        return EditChoice(search.edit, search=search)
    with stages.stage("selection"):
        harmful = chats[SCORED["val_harmful"]]
        openings = objective_openings(
            model, tok, harmful.texts, chats["val_harmful"].prompts.prompts, judge, config
        )
        # Screening in another precision only when the user names one ('auto' would make the
        # screened candidates depend on the CPU); a layer-streamed model keeps the compute
        # dtype it was opened with.
        screening = None
        if config.search_dtype != "auto" and not isinstance(model, LayerwiseModel):
            screening = search_model(model, config.search_dtype)
        selection = select_direction(
            model, tok, candidates, harmful.texts, chats[SCORED["val_harmless"]].texts,
            refusal_ids, openings, config, screening,
        )  # fmt: skip
    write_json(tmp / "scores.json", selection.to_dict())
    return EditChoice(selection.edit, selection=selection)


def _optimize(
    config: RunConfig,
    loaded: LoadedModel,
    model: PreTrainedModel | LayerwiseModel,
    candidates: Candidates,
    chats: dict[str, ChatSet],
    data: dict[str, Any],
    judge: Judge,
    refusal_ids: list[int],
) -> SearchResult:
    """The ``--optimize`` search: validation prompts only; the eval split is never passed in."""

    fingerprint = {
        "model": candidates.model,
        "revision": candidates.revision,
        "data": {k: data[k]["sha256"] for k in (*TRAIN_SETS, *VAL_SETS)},
        # The directions differ with the filter: a study made without it is not this one.
        "refusal_filter": [config.refusal_filter, config.min_refused],
    }
    return optimize_edit(
        model,
        loaded.tokenizer,
        candidates,
        chats["val_harmful"],
        chats["val_harmless"],
        judge,
        config,
        refusal_ids=refusal_ids,
        storage=config.storage or default_storage(config.out),
        fingerprint=fingerprint,
        scoring=(chats[SCORED["val_harmful"]].texts, chats[SCORED["val_harmless"]].texts),
    )
