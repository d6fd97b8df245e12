"""Load-time verification: the residual stream is the sum of the writes the anatomy names.

An edit is exact only if the anatomy names *every* residual writer. A new checkpoint variant
or a ``--trust-remote-code`` model may add one the table does not know (a positional
embedding, an extra branch, a per-channel scale), and editing it would silently leave the
direction in the stream. :func:`verify_anatomy` runs one short prompt through the decoder with
hooks on every module the anatomy names and checks, in float64:

* the first layer's input is the embedding's output (up to a scale: Gemma multiplies it by
  ``√d_model``);
* at every layer, each residual state (``mid`` where it exists, ``post``) is the previous
  state plus the writes of the sublayer in between: each writer's output, or the output of the
  norm after it (post-norm families), or the output of its MoE block. Each term may carry one
  scalar (Granite's ``residual_multiplier``, Falcon-H1's multipliers, Gemma 4's layer scalar):
  scalars commute with the edit's projection, so they do not spoil its exactness;
* an MoE block's output is its routed experts' and shared experts' outputs, each times a
  per-token scalar (a shared expert's gate);
* every post-norm multiplies its input by exactly the gain the edit uses (``weight +
  norm_offset``) up to a per-token scalar (an RMS norm without bias or mean subtraction), and
  reads exactly what the anatomy says flows into it.

Each check is a least-squares fit; its error is the norm of the unexplained part relative to
the norm of what was to be explained (a layer's writes, a block's output). A model in float32
explains everything to ~1e-6; half precision allows for its rounding. A failure raises
:class:`~abliterate.errors.UnsupportedArchitectureError` naming the layer and the unexplained
norm.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from abliterate.errors import UnsupportedArchitectureError
from abliterate.model.anatomy import BoundAnatomy, Writer, anatomy_of
from abliterate.model.devices import input_device, onloaded

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PROMPT = "The quick brown fox jumps over the lazy dog, then explains how rivers reach the sea."
"""The one prompt the check runs (plain text: any tokenizer encodes it)."""

TOLERANCE = 1e-3
"""Largest unexplained fraction accepted, above the rounding floor of the model's dtype."""

ROUNDING = 2.0
"""Rounding floor, in units of the dtype's epsilon times the target's norm: a residual add in
half precision rounds each element by at most half a unit in the last place, and a stage adds
a few terms (float32 models sit far below it)."""

FIRST_STAGE = ("attention", "mixer")
"""Roles written before the "mid" site; every other role writes after it."""


@dataclass(frozen=True)
class Verification:
    """The outcome of :func:`verify_anatomy` (it raised if any check failed).

    Attributes:
        max_error: Largest unexplained fraction over all checks.
        worst: The check where it occurred.
        n_checks: Checks made.
        seconds: Wall time of the verification.
    """

    max_error: float
    worst: str
    n_checks: int
    seconds: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary for logs and reports."""
        return {
            "max_relative_error": self.max_error,
            "worst_check": self.worst,
            "n_checks": self.n_checks,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class _Check:
    """One fit: ``target ≈ Σ c_k terms[k]`` with a scalar per term, or per term and token."""

    name: str
    target: torch.Tensor  # (tokens, d_model) float64
    terms: tuple[torch.Tensor, ...]  # each (tokens, d_model) float64
    per_token: bool
    reference: torch.Tensor  # what the fit must explain (its norm is the error's scale)


class _Recorder:
    """Inputs and outputs of the modules the checks read, captured by hooks."""

    def __init__(self) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    @contextmanager
    def hooks(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        handles = []
        try:
            for path, module in modules.items():
                handles.append(module.register_forward_pre_hook(self._pre(path), with_kwargs=True))
                handles.append(module.register_forward_hook(self._post(path)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _pre(self, path: str) -> Any:
        def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor):
                self.inputs[path] = _flat(x)

        return hook

    def _post(self, path: str) -> Any:
        def hook(_m: Any, _a: Any, out: Any) -> None:
            self.outputs[path] = _flat(out[0] if isinstance(out, tuple) else out)

        return hook

    def get(self, store: dict[str, torch.Tensor], path: str, family: str) -> torch.Tensor:
        if path not in store:
            raise UnsupportedArchitectureError(
                f"'{path}' of the '{family}' model did not run on a plain text prompt: the "
                "anatomy names a module this checkpoint does not use."
            )
        return store[path]


def _flat(x: torch.Tensor) -> torch.Tensor:
    # A copy: modules may add into their outputs in place afterwards (Llama 4's shared expert).
    return x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64, copy=True)


def _write_module(w: Writer) -> str:
    """Where ``w``'s contribution to the residual stream is read."""
    if w.post_norms:
        return _norm_module(w.post_norms[-1])
    return w.block or w.module


def _per_token(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """``x`` (rows, width) summed to one row per token: Llama 4's experts module runs every
    expert on every token and returns ``(experts * tokens, width)``, summed by its block."""
    if x.shape[0] == tokens or x.shape[0] % tokens:
        return x
    return x.view(-1, tokens, x.shape[-1]).sum(0)


def _norm_module(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0]


def _watched(bound: BoundAnatomy) -> dict[str, nn.Module]:
    """Every module whose input or output a check reads, by path."""
    a = bound.anatomy
    paths = {a.layer_path(i) for i in range(a.n_layers)}
    paths.add(f"{a.decoder}.{a.table.embedding}")
    if a.table.mid is not None:
        paths |= {f"{a.layer_path(i)}.{a.table.mid}" for i in range(a.n_layers)}
    for w in a.writers[1:]:
        paths |= {w.module, _write_module(w), *(_norm_module(n) for n in w.post_norms)}
    return {p: bound.model.get_submodule(p) for p in sorted(paths)}


def _layer_checks(bound: BoundAnatomy, rec: _Recorder) -> Iterator[_Check]:
    """The stage checks: each residual state is the previous one plus the stage's writes."""
    a = bound.anatomy
    fam = a.family
    for i in range(a.n_layers):
        path = a.layer_path(i)
        states = [("pre", rec.get(rec.inputs, path, fam))]
        if a.table.mid is not None:
            states.append(("mid", rec.get(rec.inputs, f"{path}.{a.table.mid}", fam)))
        states.append(("post", rec.get(rec.outputs, path, fam)))
        writers = [w for w in a.writers if w.layer == i]
        stages = (
            [writers]
            if len(states) == 2
            else [
                [w for w in writers if w.role in FIRST_STAGE],
                [w for w in writers if w.role not in FIRST_STAGE],
            ]
        )
        for (name0, start), (name1, end), stage in zip(
            states[:-1], states[1:], stages, strict=True
        ):
            writes = dict.fromkeys(_write_module(w) for w in stage)
            yield _Check(
                name=f"layer {i} ({name0} → {name1})",
                target=end,
                terms=(start, *(rec.get(rec.outputs, p, fam) for p in writes)),
                per_token=False,
                reference=end - start,
            )


def _writer_checks(bound: BoundAnatomy, rec: _Recorder) -> Iterator[_Check]:
    """Blocks are the sum of their members; post-norms scale by the edit's gain and read what
    flows into them."""
    a = bound.anatomy
    fam = a.family
    members: dict[str, dict[str, None]] = {}
    feeds: dict[str, dict[str, None]] = {}
    for w in a.writers[1:]:
        if w.block is not None:
            members.setdefault(w.block, {})[w.module] = None
        chain = [w.block or w.module, *(_norm_module(n) for n in w.post_norms)]
        for src, dst in itertools.pairwise(chain):
            feeds.setdefault(dst, {})[src] = None
    for block, parts in members.items():
        out = rec.get(rec.outputs, block, fam)
        terms = tuple(_per_token(rec.get(rec.outputs, p, fam), out.shape[0]) for p in parts)
        yield _Check(f"block {block}", out, terms, per_token=True, reference=out)
    for norm, sources in feeds.items():
        x = rec.get(rec.inputs, norm, fam)
        terms = tuple(rec.get(rec.outputs, p, fam) for p in sources)
        yield _Check(f"input of {norm}", x, terms, per_token=False, reference=x)
        with onloaded(bound.model.get_submodule(norm)):
            gain = bound.model.get_parameter(f"{norm}.weight").detach().to("cpu", torch.float64)
        out = rec.get(rec.outputs, norm, fam)
        gained = x * (gain + a.table.norm_offset)
        yield _Check(f"gain of {norm}", out, (gained,), per_token=True, reference=out)


def _unexplained(check: _Check) -> torch.Tensor:
    """``target`` minus its least-squares fit by ``terms`` (tokens, d_model)."""
    terms = torch.stack(check.terms, dim=-1)  # (tokens, d_model, k)
    if check.per_token:
        coef = torch.linalg.lstsq(terms, check.target.unsqueeze(-1)).solution  # (tokens, k, 1)
        return check.target - (terms @ coef).squeeze(-1)
    flat = terms.reshape(-1, terms.shape[-1])  # (tokens * d_model, k)
    coef = torch.linalg.lstsq(flat, check.target.reshape(-1, 1)).solution  # (k, 1)
    return check.target - (flat @ coef).view_as(check.target)


@torch.inference_mode()
def verify_anatomy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompt: str = PROMPT,
    tolerance: float = TOLERANCE,
    anatomy: BoundAnatomy | None = None,
) -> Verification:
    """Check on one forward pass that the anatomy explains the whole residual stream (the
    result is logged).

    Raises:
        UnsupportedArchitectureError: a residual state, block or post-norm is not what the
            anatomy says (the message names the layer and the unexplained norm).
    """
    start = time.perf_counter()
    bound = anatomy or anatomy_of(model)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True).input_ids
    rec = _Recorder()
    # An offloaded model's embedding may sit on the meta device; inputs go where accelerate runs it.
    device = input_device(model)
    with rec.hooks(_watched(bound)):
        bound.body(input_ids=ids.to(device), use_cache=False)
    a = bound.anatomy
    embed = rec.get(rec.outputs, f"{a.decoder}.{a.table.embedding}", a.family)
    first = rec.get(rec.inputs, a.layer_path(0), a.family)
    checks: list[_Check] = [_Check("embedding", first, (embed,), False, first)]
    checks += [*_layer_checks(bound, rec), *_writer_checks(bound, rec)]
    # Half precision rounds every residual add: allow for that rounding (ROUNDING).
    # (the embedding's dtype: quantized layers store integers, the embedding never is)
    eps = torch.finfo(next(bound.embedding.parameters()).dtype).eps
    worst, worst_name = 0.0, ""
    for check in checks:
        left = _unexplained(check)
        scale = float(check.reference.norm()) + 1e-30
        error = float(left.norm()) / scale
        allowed = tolerance + ROUNDING * eps * float(check.target.norm()) / scale
        if error > allowed:
            raise UnsupportedArchitectureError(
                f"the '{a.family}' anatomy does not explain this model: at {check.name} the "
                f"residual stream has an unexplained part of norm {float(left.norm()):.4g} "
                f"({error:.2%} of {float(check.reference.norm()):.4g}); some residual writer "
                "is missing from the table or works differently in this checkpoint (a new "
                "variant or remote code), so an edit would not be exact."
            )
        if error >= worst:
            worst, worst_name = error, check.name
    result = Verification(worst, worst_name, len(checks), time.perf_counter() - start)
    log.info("%s", describe(result))
    return result


def describe(result: Verification) -> str:
    """One log line for a passed verification."""
    return (
        f"anatomy verified on one prompt: {result.n_checks} checks, largest unexplained part "
        f"{result.max_error:.2e} (at {result.worst}), {result.seconds:.2f} s"
    )


__all__: Sequence[str] = ("PROMPT", "TOLERANCE", "Verification", "describe", "verify_anatomy")
