"""``abliterate run``: compute candidate directions, select one, apply it, evaluate, export.

The run directory is built under a temporary name beside ``out`` and renamed into place only
when the run succeeds, so a failed or interrupted run never leaves a half-written directory.
Contents::

    config.json            resolved configuration
    environment.json       versions, model source and revision, prompt-set hashes, seed
    candidates.safetensors harmful and harmless means per layer and site (float64)
    scores.json            per-candidate refusal scores and KL (selection)
    optimization.json      every search trial, the Pareto front and the choice (--optimize)
    direction.{safetensors,json}, edit_spec.json (+ layer_directions.safetensors,
    extra_directions.safetensors)
    report.json, report.md, report.html, plots/*.svg
    model/                 the edited model (safetensors) with abliteration.json
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate import __version__
from abliterate.commands.rundir import check_output_dir, environment_record, run_directory
from abliterate.config import RunConfig, to_dict
from abliterate.errors import ConfigError

if TYPE_CHECKING:
    from abliterate.core.directions import Direction
    from abliterate.model.anatomy import Architecture
    from abliterate.model.loading import LoadedModel
    from abliterate.progress import Profiler
    from abliterate.search.optimize import SearchResult
    from abliterate.search.selection import Selection

log = logging.getLogger(__name__)


def _environment(config: RunConfig, loaded: Any, data: dict[str, Any]) -> dict[str, Any]:
    return {
        **environment_record(str(loaded.device), config.seed, data),
        "model": {"name": loaded.name, "source": loaded.source, "revision": loaded.revision},
        "dtype": str(loaded.model.dtype),
    }


def _choose_direction(
    config: RunConfig,
    loaded: LoadedModel,
    arch: Architecture,
    sets: dict[str, Any],
    texts: dict[str, list[str]],
    data: dict[str, Any],
    refusal_ids: list[int],
    judge: Any,
    prof: Profiler,
    tmp: Path,
) -> tuple[Direction, Selection | None, SearchResult | None]:
    """The direction to remove: a saved one, a given layer's, the automatically selected one,
    or (``--optimize``) the searched edit, whose full spec comes with it.

    Writes ``candidates.safetensors`` (and ``scores.json`` when selecting, ``optimization.json``
    when searching) into ``tmp``.
    """
    from abliterate.core.directions import Direction
    from abliterate.measure.activations import collect_activations
    from abliterate.measure.candidates import Candidates
    from abliterate.search.selection import select_direction

    model, tok = loaded.model, loaded.tokenizer
    if config.direction is not None:
        if not config.direction.with_suffix(".json").is_file():
            raise ConfigError(
                f"direction {config.direction} not found (both {config.direction.stem}"
                ".safetensors and .json are needed)."
            )
        direction = Direction.load(config.direction)
        if direction.d_model != arch.d_model:
            raise ConfigError(
                f"direction {config.direction} has d_model={direction.d_model} but the model "
                f"has {arch.d_model}: it was computed for another model."
            )
        if config.optimize:
            raise ConfigError("pass either --direction or --optimize, not both.")
        return direction, None, None

    with prof.stage("activations"):
        hashes = {k: str(data[k]["sha256"]) for k in ("train_harmful", "train_harmless")}
        # Per-prompt activations are kept only when the search may use extra directions.
        keep = config.site if config.optimize and config.max_directions > 1 else None
        if keep is not None and keep not in config.sites:
            raise ConfigError(f"site {keep!r} is not among sites {config.sites}.")
        harmful_mean, harmful_acts = collect_activations(
            model,
            tok,
            arch,
            texts["train_harmful"],
            sites=config.sites,
            keep_site=keep,
            batch_size=config.batch_size,
            desc="Activations (harmful)",
        )
        harmless_mean, _ = collect_activations(
            model,
            tok,
            arch,
            texts["train_harmless"],
            sites=config.sites,
            batch_size=config.batch_size,
            desc="Activations (harmless)",
        )
        candidates = Candidates(
            harmful_mean=harmful_mean,
            harmless_mean=harmless_mean,
            sites=config.sites,
            model=loaded.name,
            revision=loaded.revision,
            dataset_hashes=hashes,
            harmful_acts=harmful_acts,
            acts_site=keep,
        )  # fmt: skip
        candidates.save(tmp / "candidates.safetensors")

    if config.layer is not None:
        if config.layer >= arch.n_layers:
            raise ConfigError(
                f"layer {config.layer} is out of range: the model has {arch.n_layers} layers."
            )
        if config.site not in config.sites:
            raise ConfigError(f"site {config.site!r} is not among sites {config.sites}.")
        if candidates.is_degenerate(config.layer, config.site):
            raise ConfigError(
                f"layer {config.layer}, site {config.site!r} has no direction: harmful "
                "and harmless means are identical there; choose another --layer/--site."
            )
        return candidates.direction(config.layer, config.site), None, None

    if config.optimize:
        with prof.stage("search"):
            search = _optimize(
                config, model, tok, candidates, sets, texts, data, refusal_ids, judge
            )
        (tmp / "optimization.json").write_text(json.dumps(search.to_dict(), indent=2) + "\n")
        return search.spec.direction, None, search

    with prof.stage("selection"):
        selection = select_direction(
            model,
            tok,
            candidates,
            texts["val_harmful"],
            texts["val_harmless"],
            refusal_ids,
            kl_threshold=config.kl_threshold,
            prune_last_layers=config.prune_last_layers,
            n_screen=config.n_screen,
            n_finalists=config.n_finalists,
            strength=config.strength,
            batch_size=config.batch_size,
        )
    (tmp / "scores.json").write_text(json.dumps(selection.to_dict(), indent=2) + "\n")
    return selection.direction, selection, None


def _optimize(
    config: RunConfig,
    model: Any,
    tok: Any,
    candidates: Any,
    sets: dict[str, Any],
    texts: dict[str, list[str]],
    data: dict[str, Any],
    refusal_ids: list[int],
    judge: Any,
) -> Any:
    """The ``--optimize`` search: validation prompts only; the eval split is never passed in."""
    from abliterate.search.optimize import optimize_edit
    from abliterate.search.study import default_storage

    fingerprint = {
        "model": candidates.model,
        "revision": candidates.revision,
        "data": {k: data[k]["sha256"] for k in ("train_harmful", "train_harmless",
                                                 "val_harmful", "val_harmless")},
    }  # fmt: skip
    return optimize_edit(
        model,
        tok,
        candidates,
        harmful_val=texts["val_harmful"],
        harmful_val_prompts=sets["val_harmful"].prompts,
        harmless_val=texts["val_harmless"],
        refusal_ids=refusal_ids,
        judge=judge,
        site=config.site,
        storage=config.storage or default_storage(config.out),
        study_name=config.study_name,
        fingerprint=fingerprint,
        n_trials=config.trials,
        refusal_target=config.refusal_target,
        max_confirm=config.max_confirm,
        prune_last_layers=config.prune_last_layers,
        max_new_tokens=min(config.confirm_tokens, config.max_new_tokens),
        batch_size=config.batch_size,
        seed=config.seed,
        trial=config.trial,
        max_directions=config.max_directions,
        search_dtype=config.search_dtype,
    )


def run(config: RunConfig) -> dict[str, Any]:
    """Run the whole pipeline and return the report (also written to ``config.out``)."""
    import torch

    from abliterate.core.edits import EditSpec
    from abliterate.core.stats import kl_divergence
    from abliterate.data.chat import format_chat
    from abliterate.data.prompts import resolve_prompts
    from abliterate.edit.export import save_model, verify_export
    from abliterate.edit.hooks import ablation_hooks
    from abliterate.edit.weights import orthogonalize_
    from abliterate.eval.judges import MarkerJudge
    from abliterate.eval.kl import multi_token_kl
    from abliterate.eval.refusals import ModelEval, RefusalEval, evaluate_refusals
    from abliterate.measure.refusal import refusal_token_ids
    from abliterate.model.anatomy import resolve_architecture
    from abliterate.model.forward import next_token_logprobs
    from abliterate.model.loading import load_model
    from abliterate.progress import Profiler
    from abliterate.report.markdown import summary_table, write_reports
    from abliterate.report.schema import Report, SelectionScores

    check_output_dir(config.out, config.overwrite)
    torch.manual_seed(config.seed)
    col = config.prompt_column
    # Load every prompt set before the model, so a bad file fails in a second, not a minute.
    sets = {
        "train_harmful": resolve_prompts(config.harmful, "harmful", "train", col).head(
            config.n_train
        ),
        "train_harmless": resolve_prompts(config.harmless, "harmless", "train", col).head(
            config.n_train
        ),
        "val_harmful": resolve_prompts(None, "harmful", "val", col).head(config.n_val),
        "val_harmless": resolve_prompts(None, "harmless", "val", col).head(config.n_val),
        "eval_harmful": resolve_prompts(config.eval_harmful, "harmful", "eval", col).head(
            config.n_eval
        ),
        "eval_harmless": resolve_prompts(config.eval_harmless, "harmless", "eval", col).head(
            config.n_eval
        ),
    }
    data = {k: {"name": s.name, "n": len(s), "sha256": s.sha256} for k, s in sets.items()}
    prof = Profiler()
    judge = MarkerJudge()

    with run_directory(config.out, config.overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
        with prof.stage("load model"):
            loaded = load_model(
                config.model,
                revision=config.revision,
                device=config.device,
                dtype=config.dtype,
                trust_remote_code=config.trust_remote_code,
            )
        model, tok = loaded.model, loaded.tokenizer
        arch = resolve_architecture(model)
        log.info("model: %s", arch.describe())
        texts = {k: format_chat(tok, s.prompts, config.system_prompt) for k, s in sets.items()}
        env = _environment(config, loaded, data)
        (tmp / "environment.json").write_text(json.dumps(env, indent=2) + "\n")

        refusal_ids = refusal_token_ids(tok)
        direction, selection, search = _choose_direction(
            config, loaded, arch, sets, texts, data, refusal_ids, judge, prof, tmp
        )
        spec = EditSpec.uniform(direction, arch.n_layers, config.strength)
        if search is not None:
            spec = search.spec
        spec.save(tmp)

        def evaluate_eval_split(desc: str) -> tuple[RefusalEval, torch.Tensor]:
            """Judged generations on the harmful eval prompts and next-token log-probs on the
            harmless ones, for the model as it is now (unedited, then baked)."""
            refusals = evaluate_refusals(
                model,
                tok,
                sets["eval_harmful"].prompts,
                texts["eval_harmful"],
                judge,
                categories=sets["eval_harmful"].categories,
                max_new_tokens=config.max_new_tokens,
                batch_size=config.batch_size,
                desc=desc,
            )
            logprobs = next_token_logprobs(
                model, tok, texts["eval_harmless"], batch_size=config.batch_size
            )
            return refusals, logprobs

        with prof.stage("baseline eval"):
            baseline_refusals, base_lp = evaluate_eval_split("Generating (baseline)")

        with prof.stage("multi-token KL"):
            # Measured through hooks before the weights are baked; the "orthogonalize" stage
            # checks that hooks and baked weights agree.
            kl_multi, _ = multi_token_kl(
                model,
                tok,
                texts["eval_harmless"],
                spec_q=spec,
                n_tokens=config.kl_tokens,
                batch_size=config.batch_size,
            )

        with prof.stage("orthogonalize"):
            probe = texts["eval_harmless"][:4]
            with ablation_hooks(model, spec):
                hooked = next_token_logprobs(model, tok, probe, batch_size=config.batch_size)
            orthogonalize_(model, spec)
            baked = next_token_logprobs(model, tok, probe, batch_size=config.batch_size)
            hooks_vs_weights = float((hooked - baked).abs().max())

        with prof.stage("edited eval"):
            edited_refusals, edited_lp = evaluate_eval_split("Generating (abliterated)")
            kl = float(kl_divergence(base_lp, edited_lp).mean())

        baseline = ModelEval(baseline_refusals)
        edited = ModelEval(
            edited_refusals,
            kl_divergence=kl,
            extra={"kl_divergence_multi_token": kl_multi, "kl_tokens": config.kl_tokens},
        )
        record = {
            "abliterate_version": __version__,
            "base_model": {"name": loaded.name, "source": loaded.source,
                           "revision": loaded.revision},
            "edit": spec.to_dict(),
            "selection": None if selection is None else {
                k: v for k, v in selection.to_dict().items() if k != "scores"
            },
            "optimization": None if search is None else {
                k: v for k, v in search.to_dict().items() if k != "trials"
            },
            "data": data,
            "metrics": {
                "baseline_refusal_rate": baseline_refusals.refusal_rate,
                "refusal_rate": edited_refusals.refusal_rate,
                "kl_divergence": kl,
                "kl_divergence_multi_token": kl_multi,
                "judge": judge.name,
            },
        }  # fmt: skip
        export_diff: float | None = None
        if config.save_model:
            with prof.stage("export"):
                save_model(model, tok, tmp / "model", record)
                export_diff = verify_export(model, tok, tmp / "model", probe)
        (tmp / "abliteration.json").write_text(json.dumps(record, indent=2) + "\n")

        report: dict[str, Any] = {
            "abliterate_version": __version__,
            "model": {
                "name": loaded.name,
                "source": loaded.source,
                "revision": loaded.revision,
                "architecture": arch.describe(),
            },
            "data": data,
            "edit": spec.to_dict(),
            "selection": record["selection"],
            "checks": {
                "hooks_vs_weights_max_abs_diff": hooks_vs_weights,
                "export_reload_max_abs_diff": export_diff,
            },
            "baseline": baseline.to_dict(),
            "edited": edited.to_dict(),
            "n_examples": config.n_examples,
            "timings": prof.to_dict(),
        }
        if search is not None:
            report["optimization"] = search.to_dict()
        typed = Report.model_validate({"command": "optimize" if search else "run", **report})
        scores = SelectionScores.model_validate(selection.to_dict()) if selection else None
        write_reports(tmp, typed, scores)
    print(summary_table(typed))
    print(f"\nRun directory: {config.out}")
    return report
