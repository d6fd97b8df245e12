"""DINM: detoxify by tuning the located toxic layer's MLP output projection (Wang et al., 2024).

For each instance (:class:`~abliterate.data.detox.DetoxInstance`), with its toxic layer ``L``
located on the model as it is at that moment (the locator is passed in; see
:mod:`abliterate.measure.toxic`):

* only the MLP output projection of layer ``L`` is trainable; every other parameter is frozen;
* the loss is the safe answer's negative log-likelihood given the adversarial prompt (mean over
  the answer's tokens) plus ``kl_weight`` times ``KL(p_ref ‖ p_now)`` of the next-token
  distributions over the general-knowledge answer's tokens, where ``p_now`` is the model being
  tuned, *with* gradient — so the KL term actually holds the general answer in place (the
  reference implementation computes both sides under ``no_grad``, which makes it a constant);
* with a :class:`Guard` (``abliterate detox`` builds one by default), the loss also holds a set of
  harmless prompts' answers in place: ``kl_weight`` times ``KL(p_ref ‖ p_now)`` over the reference
  model's own answers to them, ``guard_batch`` prompts a step, cycling through the set. One
  general-knowledge answer per instance does not stop a tuned projection from teaching *every*
  prompt to open with a refusal (on the demo model the paper's loss alone took the over-refusal
  rate from 12% to 74%); the guard is this project's addition and ``--n-guard 0`` turns it off;
* Adam takes ``steps`` steps with learning rate ``lr``.

``p_ref`` is computed once, before any instance is edited (:func:`knowledge_references`): by
default from the model DINM is given, so later instances are held to the same reference as the
first rather than to a model that earlier edits have already moved; a caller may pass another
model's distributions (``abliterate detox --edit`` passes the original model's, the one without
the earlier edit).

``sequence`` mode edits the instances one after another: each is located and tuned on the model
already carrying the previous instances' changes. ``batch`` mode locates every instance on the
unedited model, then tunes every located layer at once on the whole batch's mean loss.

The result is a :class:`~abliterate.core.delta.WeightDelta` (the summed change of each tuned
projection), an ordinary edit: it can be hooked, baked, saved and composed with an ablation.
:func:`run_dinm` leaves the model it was given unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from abliterate.core.delta import DeltaTarget, WeightDelta
from abliterate.core.stats import kl_divergence
from abliterate.data.chat import format_chat
from abliterate.data.detox import DetoxInstance
from abliterate.data.pairs import PairBatch, encode_pairs
from abliterate.edit.weights import bake
from abliterate.errors import UnsupportedArchitectureError
from abliterate.model.anatomy import BoundAnatomy, BoundWriter, anatomy_of, canonical
from abliterate.model.forward import model_device
from abliterate.progress import progress

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DinmMode = Literal["sequence", "batch"]

Locator = Callable[
    [Sequence[str], Sequence[str], Sequence[str]], Sequence[tuple[int, Sequence[float]]]
]
"""``locate(prompt_texts, safe, unsafe)`` → per instance ``(layer, per-layer distances)``."""


@dataclass(frozen=True)
class DinmSettings:
    """How DINM tunes (see the module docstring).

    Attributes:
        steps: Adam steps per instance (per batch in batch mode).
        lr: Adam's learning rate (the paper's 1e-4; ``abliterate detox`` defaults to 5e-5,
            measured better with a guard).
        kl_weight: Weight of the KL term on the general-knowledge answer.
        mode: ``sequence`` or ``batch``.
        system_prompt: System prompt of the chat template, or None for the template's own.
    """

    steps: int = 10
    lr: float = 1e-4
    kl_weight: float = 1.0
    mode: DinmMode = "sequence"
    system_prompt: str | None = None


@dataclass
class InstanceRecord:
    """What DINM did for one instance: its located layer, the distances that chose it, and the
    loss terms at every step (shared by the whole batch in batch mode)."""

    id: str
    layer: int
    distances: list[float]
    nll: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    guard_kl: list[float] = field(default_factory=list)


@dataclass
class DinmResult:
    """The learned edit, the per-instance records and how many guard prompts were held."""

    edit: WeightDelta
    records: list[InstanceRecord]
    guard_prompts: int = 0


@dataclass(frozen=True)
class Guard:
    """Harmless prompts whose answers DINM holds in place (module docstring).

    Attributes:
        texts: Chat-formatted harmless prompts.
        answers: The reference model's answers to them (what the KL is taken over).
        references: Per prompt, the reference model's log-probabilities over its answer:
            ``(answer tokens, vocab)`` float32 on the CPU.
        batch: Prompts per Adam step (the set is cycled through, step after step).
    """

    texts: tuple[str, ...]
    answers: tuple[str, ...]
    references: tuple[torch.Tensor, ...]
    batch: int = 2

    def rows(self, step: int) -> list[int]:
        """The prompts of Adam step ``step`` (counted over the whole run)."""
        n = len(self.texts)
        return [(step * self.batch + k) % n for k in range(min(self.batch, n))]


def build_guard(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    answers: Sequence[str],
    batch: int = 2,
) -> Guard:
    """A :class:`Guard` with ``model``'s log-probabilities over ``answers`` as the reference.

    Raises:
        ValueError: no prompts, or not one answer per prompt.
    """
    if not texts or len(texts) != len(answers):
        raise ValueError("a guard needs at least one prompt and one answer per prompt")
    bound = anatomy_of(model)
    refs = []
    for text, answer in zip(texts, answers, strict=True):
        with torch.no_grad():
            refs.append(answer_logprobs(bound, encode_pairs(tokenizer, [text], [answer]))[0].cpu())
    return Guard(tuple(texts), tuple(answers), tuple(refs), batch)


def mlp_output_writer(bound: BoundAnatomy, layer: int) -> BoundWriter:
    """The MLP output projection of ``layer`` (DINM's trainable matrix).

    Raises:
        UnsupportedArchitectureError: the layer has no dense MLP output projection (MoE).
    """
    for w in bound.writers:
        if w.writer.role == "mlp" and w.writer.layer == layer and w.writer.expert is None:
            return w
    raise UnsupportedArchitectureError(
        f"layer {layer} of the '{bound.anatomy.family}' model has no dense MLP output "
        "projection for DINM to tune."
    )


def answer_logprobs(bound: BoundAnatomy, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities at every position that predicts a response token, and those tokens.

    Returns:
        ``(k, vocab)`` float32 log-probabilities (with the graph, when gradients are on) and
        ``(k,)`` target ids, ``k`` being the batch's total number of response tokens.
    """
    device = model_device(bound.model)
    hidden = bound.body(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
    ).last_hidden_state  # (batch, pos, d_model), after the final norm
    targets = batch.targets().to(device)
    keep = targets != -100
    # The vocabulary projection only where an answer token is predicted: (k, vocab).
    logits = bound.lm_head(hidden[keep]).float()
    return torch.log_softmax(logits, dim=-1), targets[keep]


def dinm_losses(
    bound: BoundAnatomy, edit: PairBatch, knowledge: PairBatch, reference: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll, kl)``: the safe answer's mean NLL and ``KL(reference ‖ model)`` averaged over the
    general-knowledge answer's tokens; both carry gradient to the trainable parameters.

    ``reference`` is :func:`answer_logprobs` of ``knowledge`` before tuning (``(k, vocab)``).
    """
    logprobs, targets = answer_logprobs(bound, edit)
    nll = torch.nn.functional.nll_loss(logprobs, targets)
    return nll, answer_kl(bound, knowledge, reference)


def answer_kl(bound: BoundAnatomy, batch: PairBatch, reference: torch.Tensor) -> torch.Tensor:
    """``KL(reference ‖ model)`` averaged over ``batch``'s answer tokens, with gradient
    (``reference``: the answers' log-probabilities ``(k, vocab)`` from :func:`answer_logprobs`)."""
    current, _ = answer_logprobs(bound, batch)
    return kl_divergence(reference.to(current.device), current).mean()


@contextmanager
def _trainable(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Only ``params`` require gradients inside the block; every flag is restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def tune_mlp_outputs(
    bound: BoundAnatomy,
    writers: Sequence[BoundWriter],
    edit: PairBatch,
    knowledge: PairBatch,
    reference: torch.Tensor,
    settings: DinmSettings,
    guard: tuple[Guard, PreTrainedTokenizerBase, int] | None = None,
) -> tuple[dict[str, torch.Tensor], list[list[float]]]:
    """Tune ``writers`` with Adam on :func:`dinm_losses` (``reference``: the knowledge answer's
    reference log-probabilities), plus the guard's KL when ``guard`` (the guard, the tokenizer
    and the number of steps taken before) is given; return their canonical ``ΔW`` by tensor
    name and the loss terms per step (NLL, knowledge KL, guard KL). The weights are restored
    before returning."""
    params = [w.module.get_parameter(w.writer.tensor.rsplit(".", 1)[-1]) for w in writers]
    originals = [p.detach().clone() for p in params]
    logs: list[list[float]] = [[], [], []]
    try:
        with _trainable(bound.model, params):
            optimizer = torch.optim.Adam(params, lr=settings.lr)
            for step in range(settings.steps):
                optimizer.zero_grad(set_to_none=True)
                nll, kl = dinm_losses(bound, edit, knowledge, reference)
                loss = nll + settings.kl_weight * kl
                if guard is not None:
                    guard_kl = _guard_kl(bound, *guard, step)
                    loss = loss + settings.kl_weight * guard_kl
                    logs[2].append(float(guard_kl.detach()))
                loss.backward()
                optimizer.step()
                logs[0].append(float(nll.detach()))
                logs[1].append(float(kl.detach()))
        deltas = {
            w.writer.tensor: canonical(p.detach() - o, w.writer.layout).float().cpu().clone()
            for w, p, o in zip(writers, params, originals, strict=True)
        }
    finally:
        with torch.no_grad():
            for p, o in zip(params, originals, strict=True):
                p.copy_(o)
    return deltas, logs


def _guard_kl(
    bound: BoundAnatomy, guard: Guard, tokenizer: PreTrainedTokenizerBase, before: int, step: int
) -> torch.Tensor:
    """``KL(reference ‖ model)`` averaged over the answer tokens of this step's guard prompts."""
    rows = guard.rows(before + step)
    batch = encode_pairs(
        tokenizer, [guard.texts[i] for i in rows], [guard.answers[i] for i in rows]
    )
    return answer_kl(bound, batch, torch.cat([guard.references[i] for i in rows]))


@dataclass(frozen=True)
class _Texts:
    """An instance's chat-formatted texts."""

    id: str
    prompt: str
    safe: str
    unsafe: str
    knowledge_prompt: str
    knowledge_answer: str


def _texts(
    tokenizer: PreTrainedTokenizerBase, instances: Sequence[DetoxInstance], system: str | None
) -> list[_Texts]:
    prompts = format_chat(tokenizer, [i.prompt for i in instances], system)
    knowledge = format_chat(tokenizer, [i.knowledge_prompt for i in instances], system)
    return [
        _Texts(i.id, p, i.safe, i.unsafe, k, i.knowledge_answer)
        for i, p, k in zip(instances, prompts, knowledge, strict=True)
    ]


def knowledge_references(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instances: Sequence[DetoxInstance],
    system_prompt: str | None = None,
) -> list[torch.Tensor]:
    """Per instance, ``model``'s log-probabilities over its general-knowledge answer:
    ``(answer tokens, vocab)`` float32 on the CPU (DINM's KL reference)."""
    bound = anatomy_of(model)
    out = []
    for t in _texts(tokenizer, instances, system_prompt):
        _, knowledge = _batches(tokenizer, [t])
        with torch.no_grad():
            out.append(answer_logprobs(bound, knowledge)[0].cpu())
    return out


def _target(writer: BoundWriter) -> DeltaTarget:
    return DeltaTarget(writer.writer.tensor, writer.writer.layer, writer.writer.role)


def _batches(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[_Texts]
) -> tuple[PairBatch, PairBatch]:
    edit = encode_pairs(tokenizer, [t.prompt for t in texts], [t.safe for t in texts])
    knowledge = encode_pairs(
        tokenizer, [t.knowledge_prompt for t in texts], [t.knowledge_answer for t in texts]
    )
    return edit, knowledge


def run_dinm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instances: Sequence[DetoxInstance],
    settings: DinmSettings,
    locate: Locator,
    references: Sequence[torch.Tensor] | None = None,
    guard: Guard | None = None,
) -> DinmResult:
    """Detoxify ``model`` on ``instances`` (module docstring); the model is left unchanged.

    Args:
        references: Per instance, the KL reference over its knowledge answer (default:
            :func:`knowledge_references` of ``model`` as given).
        guard: Harmless prompts held in place at every step (:func:`build_guard`), or None
            for the paper's loss.

    Raises:
        UnsupportedArchitectureError: a located layer has no dense MLP output projection.
    """
    bound = anatomy_of(model)
    texts = _texts(tokenizer, instances, settings.system_prompt)
    if references is None:
        references = knowledge_references(model, tokenizer, instances, settings.system_prompt)
    parts: dict[DeltaTarget, torch.Tensor] = {}
    records: list[InstanceRecord] = []
    touched: dict[str, torch.Tensor] = {}  # originals of every baked weight, to restore
    try:
        if settings.mode == "batch":
            _batch(bound, tokenizer, texts, references, settings, locate, parts, records, guard)
        else:
            pairs = enumerate(zip(texts, references, strict=True))
            for i, (t, reference) in progress(pairs, total=len(texts), desc="DINM (instances)"):
                layer, distances = locate([t.prompt], [t.safe], [t.unsafe])[0]
                writer = mlp_output_writer(bound, layer)
                edit, knowledge = _batches(tokenizer, [t])
                held = None if guard is None else (guard, tokenizer, i * settings.steps)
                deltas, logs = tune_mlp_outputs(
                    bound, [writer], edit, knowledge, reference, settings, held
                )
                records.append(InstanceRecord(t.id, layer, list(distances), *logs))
                target = _target(writer)
                param = writer.module.get_parameter(writer.writer.tensor.rsplit(".", 1)[-1])
                touched.setdefault(target.name, param.detach().clone())
                step = deltas[target.name]
                parts[target] = parts[target] + step if target in parts else step
                # The next instance is located and tuned on the model carrying this change.
                bake(model, WeightDelta((target,), (step,)))
    finally:
        with torch.no_grad():
            for name, original in touched.items():
                model.get_parameter(name).copy_(original)
    guard_prompts = 0 if guard is None else len(guard.texts)
    provenance = {
        "method": "dinm",
        "mode": settings.mode,
        "steps": settings.steps,
        "lr": settings.lr,
        "kl_weight": settings.kl_weight,
        "guard_prompts": guard_prompts,
        "instances": [r.id for r in records],
        "layers": [r.layer for r in records],
    }
    return DinmResult(WeightDelta.accumulate(parts, provenance), records, guard_prompts)


def _batch(
    bound: BoundAnatomy,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[_Texts],
    references: Sequence[torch.Tensor],
    settings: DinmSettings,
    locate: Locator,
    parts: dict[DeltaTarget, torch.Tensor],
    records: list[InstanceRecord],
    guard: Guard | None,
) -> None:
    """Batch mode: locate every instance first, then tune every located layer together."""
    located = locate([t.prompt for t in texts], [t.safe for t in texts], [t.unsafe for t in texts])
    layers = sorted({layer for layer, _ in located})
    writers = [mlp_output_writer(bound, layer) for layer in layers]
    edit, knowledge = _batches(tokenizer, texts)
    # The batch's answer tokens come in instance order, as the references do.
    reference = torch.cat(list(references))
    held = None if guard is None else (guard, tokenizer, 0)
    deltas, logs = tune_mlp_outputs(bound, writers, edit, knowledge, reference, settings, held)
    for t, (layer, distances) in zip(texts, located, strict=True):
        records.append(InstanceRecord(t.id, layer, list(distances), *logs))
    for writer in writers:
        parts[_target(writer)] = deltas[writer.writer.tensor]
