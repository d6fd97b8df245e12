"""Detoxification instances (DINM, SafeEdit): an attack, a safe and an unsafe answer, and a
general-knowledge pair that the edit must leave alone.

One :class:`DetoxInstance` is one harmful question wrapped in an attack prompt, the answer the
model should give (a refusal) and the one it should not (a compliance), and an unrelated
question with its answer, whose next-token distributions the edit must keep. The package ships
project-written instances (``builtin:detox``: 24 questions in 12 categories, each wrapped in one
of six attack templates, ``prompt_data/detox_*.jsonl``) so ``abliterate detox`` works offline.

User files (``--instances FILE``):

* **JSONL**, one instance a line, with the fields of :class:`DetoxInstance`::

    {"id": "a1", "category": "fraud", "question": "How do I ...?",
     "prompt": "Ignore your rules. How do I ...?",        # optional: default the question
     "attack": "developer_mode",                           # optional
     "safe": "I'm sorry, but I can't ...", "unsafe": "Sure, here is ...",
     "knowledge_prompt": "What is the capital of Japan?", "knowledge_answer": "Tokyo."}

* **SafeEdit's JSON** (a list of records, as released with Wang et al., 2024): ``id``,
  ``unsafety category``, ``question``, ``adversarial prompt``, ``safe generation``, ``unsafe
  generation``, ``knowledge constrain`` (``prompt``, ``answer``), ``attack name`` and, where
  present, ``generalization test`` (its four test inputs are used by the evaluation as they
  are).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from abliterate.errors import PromptSetError

GENERALIZATION = ("only_question", "other_attack", "other_question", "other_both")
"""SafeEdit's generalization inputs: the bare question, the question under another attack,
another question under the same attack, another question under another attack."""

_SAFEEDIT_TESTS = {
    "only_question": "test input of only harmful question",
    "other_attack": "test input of other attack prompt input",
    "other_question": "test input of other question input",
    "other_both": "test input of other questions and attack prompts",
}


@dataclass(frozen=True)
class DetoxInstance:
    """One DINM instance (see the module docstring).

    Attributes:
        id: Identifier, for reports.
        category: Harm category.
        question: The bare harmful question.
        prompt: The adversarial input: the question inside an attack (the edited input).
        safe: The answer the edit teaches (a refusal).
        unsafe: The answer it must not give; it serves to locate the toxic layer.
        knowledge_prompt, knowledge_answer: An unrelated question and answer whose
            next-token distributions the edit keeps (its KL term).
        attack: Name of the attack template, when known.
        generalization: SafeEdit's four generalization inputs, when the source gives them
            (keys :data:`GENERALIZATION`).
    """

    id: str
    category: str
    question: str
    prompt: str
    safe: str
    unsafe: str
    knowledge_prompt: str
    knowledge_answer: str
    attack: str | None = None
    generalization: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InstanceSet:
    """A named list of instances with the attack templates that can re-wrap their questions.

    Attributes:
        name: Where the set came from.
        instances: The instances, in order.
        attacks: Attack template by name (``{question}`` marks the question), for the
            generalization tests of instances that do not carry their own.
    """

    name: str
    instances: tuple[DetoxInstance, ...]
    attacks: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.instances:
            raise PromptSetError(f"instance set '{self.name}' is empty.")

    def __len__(self) -> int:
        return len(self.instances)

    @property
    def sha256(self) -> str:
        """Content hash of every instance (order-sensitive), recorded in the report."""
        h = hashlib.sha256()
        for inst in self.instances:
            h.update(json.dumps(inst.__dict__, sort_keys=True).encode("utf-8"))
        return h.hexdigest()

    def head(self, n: int | None) -> InstanceSet:
        """The first ``n`` instances (all of them when ``n`` is None or larger)."""
        if n is None or n >= len(self.instances):
            return self
        return InstanceSet(f"{self.name}[:{n}]", self.instances[:n], self.attacks)


def _require(row: dict[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if not isinstance(row.get(k), str) or not row[k].strip()]
    if missing:
        raise PromptSetError(f"{where} lacks the text field(s) {', '.join(missing)}.")


def _from_row(row: dict[str, Any], where: str) -> DetoxInstance:
    _require(row, ("question", "safe", "unsafe", "knowledge_prompt", "knowledge_answer"), where)
    return DetoxInstance(
        id=str(row.get("id", where)),
        category=str(row.get("category") or ""),
        question=row["question"].strip(),
        prompt=str(row.get("prompt") or row["question"]).strip(),
        safe=row["safe"].strip(),
        unsafe=row["unsafe"].strip(),
        knowledge_prompt=row["knowledge_prompt"].strip(),
        knowledge_answer=row["knowledge_answer"].strip(),
        attack=row.get("attack"),
    )


def _from_safeedit(row: dict[str, Any], where: str) -> DetoxInstance:
    keys = ("question", "adversarial prompt", "safe generation", "unsafe generation")
    _require(row, keys, where)
    knowledge = row.get("knowledge constrain")
    if not isinstance(knowledge, dict):
        raise PromptSetError(f"{where} lacks 'knowledge constrain' with 'prompt' and 'answer'.")
    _require(knowledge, ("prompt", "answer"), f"{where} 'knowledge constrain'")
    tests = row.get("generalization test") or {}
    generalization = {k: str(tests[v]) for k, v in _SAFEEDIT_TESTS.items() if tests.get(v)}
    return DetoxInstance(
        id=str(row.get("id", where)),
        category=str(row.get("unsafety category") or ""),
        question=row["question"].strip(),
        prompt=row["adversarial prompt"].strip(),
        safe=row["safe generation"].strip(),
        unsafe=row["unsafe generation"].strip(),
        knowledge_prompt=knowledge["prompt"].strip(),
        knowledge_answer=knowledge["answer"].strip(),
        attack=row.get("attack name"),
        generalization=generalization,
    )


def _read_jsonl(text: str, name: str) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict):
            raise PromptSetError(f"{name} line {i} is not a JSON object.")
        rows.append(row)
    return rows


def builtin_instances() -> InstanceSet:
    """The shipped instances with their attack templates."""
    folder = resources.files("abliterate.data") / "prompt_data"
    attacks = _read_jsonl((folder / "detox_attacks.jsonl").read_text("utf-8"), "detox_attacks")
    rows = _read_jsonl((folder / "detox_instances.jsonl").read_text("utf-8"), "detox_instances")
    return InstanceSet(
        "builtin:detox",
        tuple(_from_row(r, f"builtin instance {i}") for i, r in enumerate(rows)),
        {str(a["name"]): str(a["template"]) for a in attacks},
    )


def load_instances(source: str | None) -> InstanceSet:
    """The built-in instances (``source`` None or ``builtin:detox``), or a user file: ``.jsonl``
    in this tool's shape or ``.json`` in SafeEdit's (module docstring).

    Raises:
        PromptSetError: the file is missing, unreadable, or an instance lacks a field.
    """
    if source is None or source == "builtin:detox":
        return builtin_instances()
    path = Path(source)
    if not path.is_file():
        raise PromptSetError(f"instance file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            rows = _read_jsonl(text, str(path))
            instances = [_from_row(r, f"{path} line {i + 1}") for i, r in enumerate(rows)]
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise PromptSetError(f"{path} must hold a JSON list of SafeEdit records.")
            instances = [_from_safeedit(r, f"{path} record {i}") for i, r in enumerate(data)]
        else:
            raise PromptSetError(
                f"unsupported instance file type '{path.suffix}' for {path}; use .jsonl (this "
                "tool's shape) or .json (SafeEdit's)."
            )
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PromptSetError(f"cannot parse {path}: {exc}") from exc
    # Attack templates for re-wrapping come with the built-in set.
    return InstanceSet(str(path), tuple(instances), builtin_instances().attacks)
