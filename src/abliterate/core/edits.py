"""Edits: one protocol for every change of a model's residual writers.

A *residual writer* is a matrix whose output is added to the residual stream: ``y = W x + b``
with ``W`` of shape ``(d_model, d_in)`` in canonical orientation (each column is one *write
vector*; the token embedding is the writer whose columns are the token embeddings). The model
layer (:mod:`abliterate.model.anatomy`) knows where each writer lives and converts other
layouts (transposed, fused experts) to this one; an edit only sees :class:`WriterInfo`.

An :class:`Edit` gives, for each writer it changes, a :class:`WriterEdit`, which is at once

* a *hook*: a transform of the writer's output (optionally after a rescaling of its input),
  installed reversibly on a live model by :func:`abliterate.edit.hooks.edit_hooks`; and
* a *weight change*: a transform of ``W``'s columns and of ``b``, applied permanently through
  a weight store by :func:`abliterate.edit.weights.apply_edit`.

Every kind guarantees that the two agree in exact arithmetic (tests check it on every
supported family), so the model that was scored through hooks is the model that is exported.

Edits compose: ``a.then(b)`` (a :class:`Composite`) applies ``a`` and then ``b`` to every
writer, as hooks and as weights alike. Every edit round-trips through ``to_dict``/``tensors``
and :func:`edit_from_dict` by its ``kind``, and through a directory (``edit_spec.json`` +
``edit.safetensors``) with :meth:`Edit.save` / :func:`load_edit`.

The hook form of a writer edit is an affine map of the writer: ``W' = A W D + E``, ``b' = A b +
c`` (``A`` acts on the output, ``D`` is a diagonal input rescaling, ``E`` and ``c`` are additive
terms). :mod:`abliterate.edit.hooks` composes such maps exactly: the module sees its input
rescaled by every edit's ``D``, and each edit's :meth:`WriterEdit.output` receives the input as
rescaled by the edits *after* it only, so additive terms line up with the weight path.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from abliterate.files import write_bytes, write_json

WriterRole = Literal["embedding", "attention", "mlp", "expert", "shared_expert", "mixer"]
"""What a residual writer is: the token embedding, an attention output projection, an MLP
output projection, a routed expert's or a shared expert's down projection, or the output
projection of a non-attention token mixer (linear attention, state-space layers)."""

EDIT_FILE = "edit_spec.json"
TENSORS_FILE = "edit.safetensors"


@dataclass(frozen=True, eq=False)
class WriterInfo:
    """What an edit needs to know about one residual writer.

    Attributes:
        name: Tensor name of the writer's weight (e.g.
            ``model.layers.3.mlp.down_proj.weight``); stable across hooks and stores.
        role: What the writer is (see :data:`WriterRole`).
        layer: Decoder layer index, or None for the token embedding.
        norm_gain: ``(d_model,)`` effective gain of a normalisation applied to the writer's
            output before it is added to the stream (Gemma-2/3-style post-norms), else None.
            The write is then ``g ⊙ y / rms(y)``, so an edit that must remove ``v`` from the
            stream removes ``g ⊙ v`` from ``y`` instead.
    """

    name: str
    role: WriterRole
    layer: int | None
    norm_gain: torch.Tensor | None = None


class WriterEdit(ABC):
    """One edit's change of one writer, as a hook and as a weight change (see module docs).

    Attributes:
        uses_input: Whether :meth:`output` reads the writer's input (an additive weight term
            does; a projection of the output does not), so hooks capture it only when needed.
    """

    uses_input: ClassVar[bool] = False

    def input_scale(self, weight: torch.Tensor) -> torch.Tensor | None:
        """``(d_in,)`` rescaling of the writer's input for the hook form, or None.

        ``weight`` is the canonical ``(d_model, d_in)`` weight the edit applies to.
        """
        return None

    @abstractmethod
    def output(self, y: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """The hook: the edited output for output ``y`` (..., d_model) and input ``x``
        (..., d_in), as described in the module docstring; ``x`` is the token ids for the
        embedding. Returns ``y``'s dtype."""

    @abstractmethod
    def columns(self, w: torch.Tensor, start: int) -> torch.Tensor:
        """The weight change: float32 edited copy of ``w`` (d_model, k), the columns
        ``start … start + k - 1`` of the canonical weight."""

    def bias(self, b: torch.Tensor) -> torch.Tensor:
        """The edited bias (``(d_model,)``) of a writer that has one."""
        return b

    @property
    def needs_bias(self) -> bool:
        """Whether the weight form of a linear writer must change its bias even where the hook
        adds nothing to a zero bias: the edit adds a constant to the writer's output, which
        only a bias can hold. A writer without one is refused before anything changes
        (:func:`abliterate.edit.weights.planned_edits`), so hooks and weights never disagree
        silently, unless :attr:`creates_bias` allows a zero bias to be created for it."""
        return False

    @property
    def creates_bias(self) -> bool:
        """Whether, for :attr:`needs_bias`, a writer that has no bias may be given a zero one
        by a weight store that can create it (the in-memory model: steering, whose ``steer``
        command declares the created biases in an exported config,
        :mod:`abliterate.edit.biases`). False (affine ablation) refuses such writers instead,
        as every other store does (LoRA, GGUF, streamed checkpoints)."""
        return False


class Edit(ABC):
    """A change of a model's residual writers (see the module docstring)."""

    kind: ClassVar[str]
    _kinds: ClassVar[dict[str, type[Edit]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if isinstance(kind, str):  # concrete kinds register themselves for edit_from_dict
            Edit._kinds[kind] = cls

    @abstractmethod
    def writer_edit(self, writer: WriterInfo) -> WriterEdit | None:
        """This edit's change of ``writer``, or None when it leaves the writer alone."""

    def writer_edits(self, writer: WriterInfo) -> list[WriterEdit]:
        """Every change of ``writer``, in the order they apply."""
        edit = self.writer_edit(writer)
        return [] if edit is None else [edit]

    @abstractmethod
    def check(self, d_model: int, n_layers: int) -> None:
        """Raise ``ValueError`` when the edit does not fit a model of this shape."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description with ``"kind"``; tensors are in :meth:`tensors`."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The edit's tensors by name (what ``to_dict`` does not hold)."""

    @classmethod
    @abstractmethod
    def from_dict(cls, data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Edit:
        """Inverse of :meth:`to_dict` + :meth:`tensors`."""

    def __eq__(self, other: object) -> bool:
        """Value equality: same kind, same description, bit-identical tensors."""
        if not isinstance(other, Edit):
            return NotImplemented
        if self.to_dict() != other.to_dict():
            return False
        mine, theirs = self.tensors(), other.tensors()
        return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def load(cls, directory: str | Path) -> Edit:
        """:func:`load_edit`, checking that the edit read is of this class."""
        edit = load_edit(directory)
        if not isinstance(edit, cls):
            raise ValueError(f"{directory} holds a '{edit.kind}' edit, not a '{cls.kind}' edit")
        return edit

    @classmethod
    def load_legacy(cls, directory: Path, data: Mapping[str, Any]) -> Edit:
        """Read an edit saved without ``edit.safetensors`` by an older version of the tool."""
        raise ValueError(f"{directory} has {EDIT_FILE} but no {TENSORS_FILE}")

    def then(self, other: Edit) -> Composite:
        """This edit followed by ``other``."""
        return Composite((self, other))

    def save(self, directory: str | Path) -> None:
        """Write ``edit_spec.json`` and ``edit.safetensors`` into ``directory``."""
        from safetensors.torch import save

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, v in self.tensors().items():
            t = v.detach().cpu().contiguous()
            # safetensors refuses tensors sharing memory (one direction set in two steerings
            # of a composite): such a tensor is written as a copy.
            if t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[k] = t
        write_bytes(d / TENSORS_FILE, save(tensors))
        write_json(d / EDIT_FILE, self.to_dict())


def edit_from_dict(data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Edit:
    """The edit described by ``data`` (its ``kind`` picks the class) and ``tensors``.

    Raises:
        ValueError: the kind is unknown.
    """
    kind = data.get("kind")
    cls = Edit._kinds.get(str(kind))
    if cls is None:
        raise ValueError(
            f"unknown edit kind {kind!r}; known kinds: {', '.join(sorted(Edit._kinds))}"
        )
    return cls.from_dict(data, tensors)


def load_edit(directory: str | Path) -> Edit:
    """Read an edit written by :meth:`Edit.save` (or by an older version, see
    :meth:`Edit.load_legacy`).

    Raises:
        ValueError: the directory holds no readable edit.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    try:
        data = json.loads((d / EDIT_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{d / EDIT_FILE} is not a readable edit: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{d / EDIT_FILE} does not describe an edit")
    cls = Edit._kinds.get(str(data.get("kind")))
    if cls is None:
        raise ValueError(f"{d / EDIT_FILE} names an unknown edit kind {data.get('kind')!r}")
    try:
        if (d / TENSORS_FILE).is_file():
            return edit_from_dict(data, load_file(str(d / TENSORS_FILE)))
        return cls.load_legacy(d, data)
    except (OSError, SafetensorError, KeyError) as exc:
        # A missing or truncated tensor file, or a description that does not match its tensors.
        raise ValueError(f"the edit in {d} cannot be read: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, eq=False)
class Composite(Edit):
    """Several edits applied in order to every writer (hooks and weights alike)."""

    edits: tuple[Edit, ...]
    kind: ClassVar[str] = "composite"

    def __post_init__(self) -> None:
        flat: list[Edit] = []
        for e in self.edits:
            flat.extend(e.edits if isinstance(e, Composite) else (e,))
        if not flat:
            raise ValueError("a composite edit needs at least one edit")
        object.__setattr__(self, "edits", tuple(flat))

    def writer_edit(self, writer: WriterInfo) -> WriterEdit | None:
        raise TypeError("a composite edit has several changes per writer: use writer_edits()")

    def writer_edits(self, writer: WriterInfo) -> list[WriterEdit]:
        return [w for e in self.edits for w in e.writer_edits(writer)]

    def check(self, d_model: int, n_layers: int) -> None:
        for e in self.edits:
            e.check(d_model, n_layers)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "edits": [e.to_dict() for e in self.edits]}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v for i, e in enumerate(self.edits) for k, v in e.tensors().items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Composite:
        parts: list[Edit] = []
        for i, sub in enumerate(data["edits"]):
            prefix = f"{i}."
            mine = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            parts.append(edit_from_dict(sub, mine))
        return cls(tuple(parts))


def strengths_finite(values: Sequence[float], what: str) -> tuple[float, ...]:
    """``values`` as floats, or ``ValueError`` naming ``what`` when one is not finite."""
    out = tuple(float(v) for v in values)
    bad = [v for v in out if v != v or v in (float("inf"), float("-inf"))]
    if bad:
        raise ValueError(f"{what} must be finite, got {bad[0]}")
    return out
