"""``abliterate push RUN ORG/NAME`` (and ``run --push-to-hub``): upload a run's model or adapter
with a generated model card.

The upload is planned first (:func:`plan_upload`): the repository's root holds the edited model
(``RUN/model``) or, when the run saved none, its PEFT adapter (``RUN/adapter``); further exports
go into ``gguf/`` and ``adapter/``. ``README.md`` is the model card (:mod:`abliterate.edit.card`)
and ``abliteration.json`` the run's record with the SHA-256 of every weight file uploaded under
``"files"``. The run directory is only read. :func:`upload` sends the plan as one commit with
``huggingface_hub`` (``HfApi.create_repo`` + ``create_commit``); its ``api`` parameter is the seam
tests stub, since the plan (:func:`operations`) is what they check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate.config import PushConfig
from abliterate.edit.card import CardInputs, model_card
from abliterate.errors import ConfigError, HubError
from abliterate.files import file_sha256
from abliterate.report.schema import load_report

if TYPE_CHECKING:
    from huggingface_hub import CommitOperationAdd, HfApi

WEIGHT_SUFFIXES = (".safetensors", ".gguf")
_SKIP = {"abliteration.json", "README.md"}


def weight_hashes(files: dict[str, Path]) -> dict[str, str]:
    """SHA-256 of every weight file among ``files`` (path in the repository -> local file)."""
    return {p: file_sha256(f) for p, f in sorted(files.items()) if p.endswith(WEIGHT_SUFFIXES)}


@dataclass
class UploadPlan:
    """What a push uploads.

    Attributes:
        repo: Hub repository ``ORG/NAME``.
        files: Path in the repository -> local file (uploaded as is).
        generated: Path in the repository -> text generated for the upload (card, record).
        is_adapter: The root holds an adapter rather than a model.
    """

    repo: str
    files: dict[str, Path] = field(default_factory=dict)
    generated: dict[str, str] = field(default_factory=dict)
    is_adapter: bool = False

    def describe(self) -> str:
        """The planned uploads, one per line."""
        lines = [f"Upload to {self.repo} ({'adapter' if self.is_adapter else 'model'}):"]
        lines += [f"  {p}  <- {f}" for p, f in sorted(self.files.items())]
        lines += [f"  {p}  (generated)" for p in sorted(self.generated)]
        return "\n".join(lines)


def _folder(plan: UploadPlan, local: Path, prefix: str) -> None:
    for f in sorted(local.rglob("*")):
        if f.is_file() and not (prefix == "" and f.name in _SKIP) and not f.name.startswith("."):
            plan.files[f"{prefix}{f.relative_to(local).as_posix()}"] = f


def plan_upload(run: Path, repo: str) -> UploadPlan:
    """The upload of run directory ``run`` to ``repo`` (see the module docstring).

    Raises:
        ConfigError: ``run`` is not a run directory, or holds neither a model nor an adapter.
    """
    if not (run / "report.json").is_file() or not (run / "abliteration.json").is_file():
        raise ConfigError(f"{run} is not a run directory (report.json and abliteration.json).")
    model, adapter = run / "model", run / "adapter"
    plan = UploadPlan(repo=repo, is_adapter=not model.is_dir())
    if model.is_dir():
        _folder(plan, model, "")
        if adapter.is_dir():
            _folder(plan, adapter, "adapter/")
    elif adapter.is_dir():
        _folder(plan, adapter, "")
    else:
        raise ConfigError(f"{run} has neither model/ nor adapter/ to upload.")
    if (run / "gguf").is_dir():
        _folder(plan, run / "gguf", "gguf/")
    files = weight_hashes(plan.files)
    record = json.loads((run / "abliteration.json").read_text(encoding="utf-8"))
    record["files"] = files
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    card = model_card(CardInputs(repo, load_report(run / "report.json"), config, files,
                                 plan.is_adapter))  # fmt: skip
    plan.generated = {"README.md": card, "abliteration.json": json.dumps(record, indent=2) + "\n"}
    return plan


def operations(plan: UploadPlan) -> list[CommitOperationAdd]:
    """The plan as ``huggingface_hub`` commit operations (files first, generated texts last)."""
    from huggingface_hub import CommitOperationAdd

    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f))
           for p, f in sorted(plan.files.items())]  # fmt: skip
    ops += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=text.encode("utf-8"))
            for p, text in sorted(plan.generated.items())]  # fmt: skip
    return ops


def upload(plan: UploadPlan, *, private: bool = False, api: HfApi | Any = None) -> str:
    """Create the repository if needed and upload the plan as one commit; returns its URL."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        api.create_repo(plan.repo, repo_type="model", private=private, exist_ok=True)
        info = api.create_commit(
            plan.repo,
            operations(plan),
            commit_message="abliterate: upload the edited model with its model card",
            repo_type="model",
        )
    except Exception as exc:
        # huggingface_hub reports network, authentication and repository failures with its own
        # and its HTTP client's exception types; each is an expected, user-facing failure here.
        raise HubError(
            f"upload to {plan.repo} failed: {type(exc).__name__}: {exc}. The run directory is "
            "complete; retry with: abliterate push RUN " + plan.repo
        ) from exc
    return str(getattr(info, "commit_url", f"https://huggingface.co/{plan.repo}"))


def push(config: PushConfig, api: HfApi | Any = None) -> UploadPlan:
    """``abliterate push``: plan the upload of ``config.run`` and send it (unless dry run)."""
    plan = plan_upload(config.run, config.repo)
    print(plan.describe())
    if config.dry_run:
        print("\n" + plan.generated["README.md"])
        return plan
    print(f"Uploaded: {upload(plan, private=config.private, api=api)}")
    return plan
