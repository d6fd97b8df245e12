"""The baseline cache: the unedited model's evaluation, measured once per model and settings.

The original model's answers to a prompt set never change, yet every ``run`` generated them
again (at 128 tokens, most of a run's evaluation time). This content-addressed cache keeps the
unedited model's :class:`~abliterate.eval.evaluator.Assessment`: its judged answers to the
harmful (and over-refusal) prompts, each judge's verdicts, the late-refusal flags, fluency,
reference cross-entropy and benchmarks where measured, and its greedy continuations of the
harmless prompts (the reference of both KL divergences).

**The key** (:class:`CacheKey`) is the sha256 of a canonical JSON of everything that can change
those outputs:

* the model: the sha256 of its files (weights, config, generation config, tokenizer and chat
  template files, all of the model directory; the ``.gguf`` file; for a hub model without a
  local path, its repository and commit hash), the dtype and device type it runs in and any
  quantization, and the versions of torch, transformers and abliterate;
* the prompts: for every set, the raw prompts, their categories and the chat-formatted texts
  (which carry the chat template, the system prompt and the thinking switch);
* the settings: answer length, thinking budget, multi-token KL positions, batch size (padding
  can change the last bits of a greedy choice), benchmarks and seed;
* every judge's identity: the marker judge's phrases and late-refusal rule; a classifier or
  local LLM judge's files; and the phrases that place late refusals (a marker judge's, else
  the default ones). An endpoint judge (``llm:https://…``) can change behind its name, so
  an evaluation with one is never cached.

**Why hashing files is safe and cheap.** A file's sha256 is memoised under its device, inode,
size, modification time and *change* time (ctime). The kernel sets ctime on every write to the
file or its metadata and no system call lets a program set it back, so a file whose content
changed since it was hashed is always hashed again; an unchanged model costs a few ``stat``
calls. (The cheaper alternative, a sample of the state dict's values, could miss an edit that
touches a few weights.) The in-memory model is the one those files give, as ``load_model``
reads nothing else.

**Entries** live under ``cache_root()/baselines/`` (``$ABLITERATE_CACHE`` moves the root;
by default ``~/.cache/abliterate`` on Linux), one JSON file per key, written atomically
(:mod:`abliterate.files`), beside the file-hash memo (``files/``). Deleting the ``baselines``
folder clears the cache; nothing else lives there (the demo model's copy is in ``demo/``).
An entry is trusted only if it parses, names the same key and key parts, and its payload's
sha256 matches; anything else is ignored with a log line (and replaced by the next store),
never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate import __version__
from abliterate.eval.evaluator import Assessment
from abliterate.eval.judges import MarkerJudge
from abliterate.eval.refusals import late_rule
from abliterate.files import file_sha256, write_json
from abliterate.model.demo import cache_root
from abliterate.model.forward import model_device

if TYPE_CHECKING:
    from abliterate.data.chat import ChatSet
    from abliterate.eval.evaluator import Evaluator
    from abliterate.eval.judges import Judge
    from abliterate.model.loading import LoadedModel

log = logging.getLogger(__name__)

FORMAT = 1
"""Version of what an entry holds and how it is measured; bumped when either changes."""


def cache_dir() -> Path:
    """Where baseline entries and the file-hash memo live."""
    return cache_root() / "baselines"


def _digest(value: Any) -> str:
    """sha256 of the canonical JSON of ``value``."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def memo_sha256(path: Path) -> str:
    """The sha256 of a file's content (:func:`abliterate.files.file_sha256`), memoised under
    its identity and times (module doc)."""
    st = path.stat()
    identity = [str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                st.st_ctime_ns]  # fmt: skip
    memo = cache_dir() / "files" / f"{_digest(identity)}.json"
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
        if known.get("identity") == identity and isinstance(known.get("sha256"), str):
            return str(known["sha256"])
    except (OSError, ValueError):
        pass  # not hashed yet, or an unreadable memo: hash the file again
    digest = file_sha256(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_json(memo, {"identity": identity, "sha256": digest})
    except OSError as exc:  # an unwritable cache costs the next run a hash, nothing else
        log.warning("cannot remember the hash of %s: %s", path, exc)
    return digest


def files_fingerprint(path: Path) -> dict[str, str]:
    """``{file name: sha256}`` of a file, or of every regular file directly in a directory
    (hidden files aside)."""
    if path.is_file():
        return {path.name: memo_sha256(path)}
    return {
        f.name: memo_sha256(f)
        for f in sorted(path.iterdir())
        if f.is_file() and not f.name.startswith(".")
    }


def model_identity(loaded: LoadedModel, asked: str) -> dict[str, Any] | None:
    """What identifies the model's outputs (module doc), or None when nothing does: a hub model
    whose commit is unknown. ``asked`` is the model as the user named it (a ``.gguf`` file is
    hashed alone, not its whole folder)."""
    import torch
    import transformers

    model = loaded.model
    path = Path(asked).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        files: Any = files_fingerprint(path)
    elif Path(loaded.source).is_dir():
        files = files_fingerprint(Path(loaded.source))
    elif loaded.revision:
        files = {"hub": loaded.source, "commit": loaded.revision}
    else:
        return None
    quantization = getattr(model.config, "quantization_config", None)
    return {
        "files": files,
        "dtype": str(model.dtype),
        "device": model_device(model).type,
        "quantization": quantization.to_dict() if quantization is not None else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "abliterate": __version__},
    }  # fmt: skip


def judge_identity(judge: Judge) -> str | None:
    """A judge's identity for the key, or None when it has none that can be checked (an
    endpoint, or a hub model judged by name alone)."""
    if isinstance(judge, MarkerJudge):
        return f"markers:{judge.fingerprint}"
    source = judge.name.partition(":")[2]
    if source.startswith(("http://", "https://")):
        return None
    local = Path(source.partition("#")[0]).expanduser()
    if not local.exists():
        return None
    return f"{judge.name}:{_digest(files_fingerprint(local))}"


def _chat_set(chats: ChatSet) -> str:
    prompts = chats.prompts
    return _digest([list(prompts.prompts), list(prompts.categories or ()), list(chats.texts)])


@dataclass(frozen=True)
class CacheKey:
    """The content address of one baseline evaluation.

    Attributes:
        parts: Everything the key covers (module doc), as JSON-ready data.
        digest: sha256 of ``parts``' canonical JSON: the entry's name.
    """

    parts: dict[str, Any]
    digest: str

    @property
    def path(self) -> Path:
        """The entry's file."""
        return cache_dir() / self.digest[:2] / f"{self.digest}.json"


def baseline_key(evaluator: Evaluator, loaded: LoadedModel, asked: str) -> CacheKey | None:
    """The key of ``loaded``'s evaluation by ``evaluator``, or None (with a log line) when it
    cannot be cached: an endpoint judge, or a hub model of unknown commit."""
    model = model_identity(loaded, asked)
    if model is None:
        log.info("baseline not cached: the hub commit of %s is unknown", loaded.name)
        return None
    judges = [judge_identity(j) for j in evaluator.judges]
    if None in judges:
        name = evaluator.judges[judges.index(None)].name
        log.info("baseline not cached: judge %s cannot be identified by content", name)
        return None
    sets = evaluator.sets
    parts = {
        "format": FORMAT,
        "model": model,
        "sets": {
            "harmful": _chat_set(sets.harmful),
            "harmless": _chat_set(sets.harmless),
            "over_refusal": None if sets.over_refusal is None else _chat_set(sets.over_refusal),
            "reference": None if sets.reference is None else _digest(
                [list(sets.reference.prompts), list(sets.reference.answers)]
            ),
        },
        "settings": evaluator.settings(),
        "judges": judges,
        "late_rule": late_rule(evaluator.judges).fingerprint,
    }  # fmt: skip
    return CacheKey(parts, _digest(parts))


def load(key: CacheKey) -> Assessment | None:
    """The stored assessment of ``key``, or None: no entry, or one that cannot be trusted
    (logged and ignored: unreadable, another key, a payload that does not match its hash or
    does not describe an assessment)."""
    path = key.path
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry.get("key") != key.digest or entry.get("parts") != key.parts:
            raise ValueError("the entry belongs to another key")
        payload = entry["assessment"]
        if _digest(payload) != entry.get("sha256"):
            raise ValueError("its content does not match its checksum")
        return Assessment.from_cache(payload)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("baseline cache entry %s ignored: %s", path, exc)
        return None


def store(key: CacheKey, assessment: Assessment) -> bool:
    """Write ``assessment`` under ``key`` atomically; False (logged) when the cache directory
    cannot be written, which costs the next run a measurement and nothing else."""
    payload = assessment.to_cache()
    entry = {"key": key.digest, "parts": key.parts, "abliterate_version": __version__,
             "sha256": _digest(payload), "assessment": payload}  # fmt: skip
    try:
        key.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(key.path, entry)
    except OSError as exc:
        log.warning("baseline not cached: cannot write %s: %s", key.path, exc)
        return False
    return True


def round_trip(assessment: Assessment) -> Assessment:
    """``assessment`` as a later run reads it back from the cache, so that a run that measured
    it reports exactly what a run that reads it will."""
    payload = json.loads(json.dumps(assessment.to_cache()))
    return Assessment.from_cache(payload)


def baseline_assessment(
    evaluator: Evaluator, loaded: LoadedModel, asked: str, *, use_cache: bool = True
) -> tuple[Assessment, dict[str, Any] | None]:
    """The unedited model's evaluation (a reference: with its harmless continuations), read
    from the cache when an entry for its key is there and can be trusted, else measured and
    stored.

    Args:
        asked: The model as the user named it (see :func:`model_identity`).
        use_cache: False measures it and stores nothing.

    Returns:
        The assessment and the report's ``baseline_cache`` record (None without a key).
    """
    key = baseline_key(evaluator, loaded, asked) if use_cache else None
    if key is not None:
        cached = load(key)
        if cached is not None:
            log.info("baseline evaluation read from the cache: %s", key.path)
            return cached, {"hit": True, "key": key.digest, "stored": False}
    measured = round_trip(evaluator.assess(loaded.model, "baseline", reference=True))
    if key is None:
        return measured, None
    stored = store(key, measured)
    if stored:
        log.info("baseline evaluation stored in the cache: %s", key.path)
    return measured, {"hit": False, "key": key.digest, "stored": stored}
