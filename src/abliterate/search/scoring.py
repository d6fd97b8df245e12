"""Scoring edits without generating text: what selection and search measure, several edits per
forward pass.

For an edit, on fixed harmful and harmless validation prompts (:class:`ScoringSet`,
:class:`EditScorer`):

* ``refusal``, per harmful prompt: the probability that the answer *opens with one of the
  model's own refusal openings* (:class:`~abliterate.measure.refusal.RefusalOpenings`, a few
  tokens each), teacher-forced: the prompt is followed by each opening, and the opening's
  tokens' log-probabilities are summed. Openings of equal length are disjoint events, so the
  sum over openings is the probability of opening with any of them. It tells a refusal from
  an answer that merely starts like one ("I can help…" against "I can't…"), which the
  next-token probability cannot;
* ``first_token``, per harmful prompt: the next-token probability of the first tokens of
  common refusal openings (the older, weaker proxy; kept for comparison);
* ``kl``, per harmless prompt: the first-token ``KL(original ‖ edited)``.

Every text is chat-formatted, so all start with the template's shared opening: it runs once
per forward pass (once per edit), its key/value cache is repeated across the rows, and only
each row's own tokens are fed, right-padded (causal attention never looks at the padding that
follows a row). With several edits, each edit gets its own block of rows
(:func:`~abliterate.edit.hooks.batched_edit_hooks`). The same forward runs with gradients for
the search's descent (:meth:`EditScorer.measure` inside a context that installs differentiable
hooks).

A layer-streamed model (``--stream``) is scored by :class:`StreamedScorer` instead, on
next-token log-probabilities only (:func:`edit_scorer` picks the scorer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from abliterate.core.edits import Edit
from abliterate.core.stats import kl_divergence
from abliterate.edit.hooks import RowBlocks, batchable, batched_edit_hooks, edit_hooks
from abliterate.measure.refusal import RefusalOpenings
from abliterate.model.anatomy import anatomy_of
from abliterate.model.forward import common_prefix_length, model_device
from abliterate.model.layerwise import LayerwiseModel
from abliterate.progress import progress
from abliterate.search.streamed import streamed_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ScoringSet:
    """What edits are scored on, and how many rows a forward pass holds: the same for either
    scorer (:func:`edit_scorer`).

    Attributes:
        harmful, harmless: Chat-formatted validation texts.
        refusal_ids: First tokens of common refusal openings (the next-token proxy).
        openings: The model's refusal openings; without any, ``refusal`` is the next-token
            proxy.
        batch_size: Rows per forward pass (all edits of the pass together).
    """

    harmful: Sequence[str]
    harmless: Sequence[str]
    refusal_ids: Sequence[int]
    openings: RefusalOpenings
    batch_size: int = 32


@dataclass(frozen=True)
class EditScores:
    """The cheap measurements of one edit (see the module docstring).

    Attributes:
        refusal: ``(n_harmful,)`` probability of opening with a refusal opening.
        first_token: ``(n_harmful,)`` next-token refusal probability.
        kl: ``(n_harmless,)`` first-token KL divergence from the unedited model, in nats.
    """

    refusal: torch.Tensor
    first_token: torch.Tensor
    kl: torch.Tensor

    def summary(self) -> dict[str, float]:
        """Means over the prompts: ``{"refusal", "refusal_prob", "kl"}`` (``refusal_prob``:
        the next-token proxy)."""
        return {
            "refusal": float(self.refusal.detach().mean()),
            "refusal_prob": float(self.first_token.detach().mean()),
            "kl": float(self.kl.detach().mean()),
        }


@dataclass(frozen=True)
class _Row:
    """One row of a forward pass: a prompt's own tokens, optionally followed by an opening."""

    prompt: int  # index of the harmful or harmless prompt
    harmful: bool
    opening: int  # index of the opening (harmful rows), else -1
    ids: tuple[int, ...]  # suffix tokens (+ the opening without its last token)
    first: int  # position whose logits predict the answer's first token


class EditScorer:
    """Scores edits on a loaded model, on the fixed harmful and harmless chat-formatted
    ``texts`` (module docstring)."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: ScoringSet
    ) -> None:
        harmful, harmless = texts.harmful, texts.harmless
        if not harmful or not harmless:
            raise ValueError("the scorer needs harmful and harmless texts")
        self.model, self.anatomy = model, anatomy_of(model)
        self.batch_size, self.openings = texts.batch_size, texts.openings
        self.refusal_ids = torch.tensor(sorted(set(texts.refusal_ids)), dtype=torch.long)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)
        ids = [
            list(tokenizer(t, add_special_tokens=False).input_ids) for t in (*harmful, *harmless)
        ]
        # Every text keeps at least one token of its own, whose logits are the answer's.
        n = min(common_prefix_length(ids), min(len(x) for x in ids) - 1)
        if self.anatomy.anatomy.recurrent:
            # Recurrent mixers (linear attention, state-space) cache states that cannot be
            # repeated across a batch: every row runs whole (right padding stays exact, as the
            # recurrence is causal), as in abliterate.model.forward.SharedPrefixScorer.
            n = 0
        self.prefix = torch.tensor(ids[0][:n], dtype=torch.long)  # (n_prefix,)
        self.n_harmful, self.n_harmless = len(harmful), len(harmless)
        self.rows = self._rows([x[n:] for x in ids])
        self.base_harmless: torch.Tensor | None = None
        with torch.inference_mode():
            self.base_harmless = self._measure(nullcontext, 1)[0]["harmless"]

    def _rows(self, suffixes: list[list[int]]) -> list[_Row]:
        rows = []
        for i, suffix in enumerate(suffixes[: self.n_harmful]):
            for k, opening in enumerate(self.openings.tokens or ((),)):
                ids = (*suffix, *opening[:-1])
                rows.append(_Row(i, True, k if opening else -1, ids, len(suffix) - 1))
        for i, suffix in enumerate(suffixes[self.n_harmful :]):
            rows.append(_Row(i, False, -1, tuple(suffix), len(suffix) - 1))
        # Similar lengths together keep the padding low.
        return sorted(rows, key=lambda r: len(r.ids))

    def subset(self, n_harmful: int, n_harmless: int) -> EditScorer:
        """The same scorer on the first ``n_harmful`` and ``n_harmless`` prompts (no new
        forward pass: the unedited distributions are shared)."""
        assert self.base_harmless is not None
        clone = object.__new__(EditScorer)
        clone.__dict__.update(self.__dict__)
        clone.n_harmful, clone.n_harmless = (
            min(n_harmful, self.n_harmful),
            min(n_harmless, self.n_harmless),
        )
        clone.rows = [
            r for r in self.rows if r.prompt < (clone.n_harmful if r.harmful else clone.n_harmless)
        ]
        clone.base_harmless = self.base_harmless[: clone.n_harmless]
        return clone

    def _batches(self, n_edits: int) -> Iterator[list[_Row]]:
        size = max(1, self.batch_size // n_edits)
        for start in range(0, len(self.rows), size):
            yield self.rows[start : start + size]

    def _forward(self, rows: list[_Row], n_edits: int, blocks: RowBlocks | None) -> torch.Tensor:
        """Hidden states ``(n_edits * len(rows), length, d_model)``: edit k's block of rows is
        the k-th (run inside the edits' hooks)."""
        from transformers import DynamicCache

        device = model_device(self.model)
        length = max(len(r.ids) for r in rows)
        batch = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        for j, r in enumerate(rows):
            batch[j, : len(r.ids)] = torch.tensor(r.ids)
        cache = None
        if len(self.prefix):
            if blocks is not None:
                blocks.rows = 1
            # Built from the config, the cache matches each layer's kind and index (sliding
            # windows; layers without attention, whose index a bare cache would misnumber).
            cache = DynamicCache(config=self.model.config)
            prefix = self.prefix[None].expand(n_edits, -1).to(device)
            self.anatomy.body(input_ids=prefix, past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(len(rows))
        if blocks is not None:
            blocks.rows = len(rows)
        out = self.anatomy.body(
            input_ids=batch.repeat(n_edits, 1).to(device),
            past_key_values=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state  # after the final norm

    def _measure(
        self, context: Callable[[], AbstractContextManager[Any]], n_edits: int
    ) -> list[dict[str, torch.Tensor]]:
        """Per edit: ``first`` (n_harmful,) log-prob of the refusal tokens, ``openings``
        (n_harmful, n_openings) log-prob of each opening and ``harmless`` (n_harmless, vocab)
        log-probs, in prompt order. ``context`` installs the edits' hooks and yields their
        :class:`RowBlocks` (anything, with one edit)."""
        found: list[dict[tuple[str, int, int], torch.Tensor]] = [{} for _ in range(n_edits)]
        with context() as blocks:
            for rows in self._batches(n_edits):
                hidden = self._forward(rows, n_edits, blocks if n_edits > 1 else None)
                for e in range(n_edits):
                    block = hidden[e * len(rows) : (e + 1) * len(rows)]  # (rows, length, d_model)
                    found[e].update(self._read(block, rows))
        n_open = max(1, len(self.openings.tokens))
        out = []
        for values in found:
            first = [values["first", i, 0] for i in range(self.n_harmful)]
            out.append({
                "first": torch.stack(first),
                "openings": torch.stack([
                    torch.stack([values.get(("opening", i, k), first[i]) for k in range(n_open)])
                    for i in range(self.n_harmful)
                ]),
                "harmless": torch.stack(
                    [values["harmless", i, 0] for i in range(self.n_harmless)]
                ),
            })  # fmt: skip
        return out

    def _read(
        self, hidden: torch.Tensor, rows: list[_Row]
    ) -> dict[tuple[str, int, int], torch.Tensor]:
        """One edit's rows: the log-probabilities each row contributes, keyed by
        ``(what, prompt, opening)``. The vocabulary projection runs once, on every position the
        rows need."""
        where: list[tuple[int, int]] = []
        spans: list[tuple[int, int]] = []
        for j, r in enumerate(rows):
            n = max(1, len(self.openings.tokens[r.opening])) if r.opening >= 0 else 1
            spans.append((len(where), n))
            where.extend((j, r.first + t) for t in range(n))
        index = torch.tensor(where, device=hidden.device)  # (n_positions, 2)
        # The head, then the family's logit scale and soft cap.
        logits = self.anatomy.logits(hidden[index[:, 0], index[:, 1]])  # (n_positions, vocab)
        logp = torch.log_softmax(logits.float(), -1)
        refusal_ids = self.refusal_ids.to(logp.device)
        out: dict[tuple[str, int, int], torch.Tensor] = {}
        for r, (at, n) in zip(rows, spans, strict=True):
            if not r.harmful:
                out["harmless", r.prompt, 0] = logp[at].cpu()
                continue
            if r.opening <= 0:  # the next-token proxy, once per prompt
                out["first", r.prompt, 0] = logp[at, refusal_ids].logsumexp(-1).cpu()
            if r.opening >= 0:
                target = torch.tensor(self.openings.tokens[r.opening], device=logp.device)
                value = logp[torch.arange(at, at + n, device=logp.device), target].sum()
                out["opening", r.prompt, r.opening] = value.cpu()
        return out

    def _scores(self, measured: dict[str, torch.Tensor]) -> EditScores:
        assert self.base_harmless is not None
        first = measured["first"].exp()
        refusal = measured["openings"].exp().sum(-1) if self.openings.tokens else first
        kl = kl_divergence(self.base_harmless, measured["harmless"])
        return EditScores(refusal=refusal, first_token=first, kl=kl)

    @torch.inference_mode()
    def score(
        self, edits: Sequence[Edit], edits_per_pass: int = 4, desc: str | None = None
    ) -> list[EditScores]:
        """Scores of each edit, ``edits_per_pass`` edits per forward pass (one at a time when
        the model has expert writers, see :func:`~abliterate.edit.hooks.batchable`); ``desc``
        shows a progress bar."""
        per_pass = edits_per_pass if batchable(self.model, self.anatomy) else 1
        out: list[EditScores] = []
        starts = range(0, len(edits), per_pass)
        for start in starts if desc is None else progress(starts, desc=desc):
            group = list(edits[start : start + per_pass])
            context: Callable[[], AbstractContextManager[Any]]
            if len(group) == 1:
                context = partial(edit_hooks, self.model, group[0])
            else:
                context = partial(batched_edit_hooks, self.model, group, self.anatomy)
            out.extend(self._scores(m) for m in self._measure(context, len(group)))
        return out

    @torch.inference_mode()
    def baseline(self) -> EditScores:
        """Scores of the unedited model (its KL is 0 up to rounding)."""
        return self._scores(self._measure(nullcontext, 1)[0])

    def measure(self, context: Callable[[], AbstractContextManager[Any]]) -> EditScores:
        """Scores of the model as ``context`` changes it, with gradients when enabled (the
        search's descent installs differentiable hooks; nothing is detached)."""
        return self._scores(self._measure(context, 1)[0])


class StreamedScorer:
    """:class:`EditScorer`'s scores on a layer-streamed model
    (:class:`~abliterate.model.layerwise.LayerwiseModel`), from its next-token log-probabilities
    (:func:`~abliterate.search.streamed.streamed_logprobs`: as many edits per read of the
    weights as its stream memory allows).

    Teacher-forced openings and the descent's gradients need the model loaded, so here
    ``refusal`` is the next-token proxy (``openings`` is always empty) and :meth:`measure` does
    not exist: callers fall back to the ``next_token`` objective and skip the refinement
    (:func:`abliterate.search.objective.scoring_config`).
    """

    def __init__(
        self, model: LayerwiseModel, tokenizer: PreTrainedTokenizerBase, texts: ScoringSet
    ) -> None:
        assert not texts.openings.tokens, "layer-streamed scoring has no teacher-forced openings"
        if not texts.harmful or not texts.harmless:
            raise ValueError("the scorer needs harmful and harmless texts")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, texts.batch_size
        self.harmful, self.harmless = list(texts.harmful), list(texts.harmless)
        self.n_harmful, self.n_harmless = len(self.harmful), len(self.harmless)
        self.refusal_ids = sorted(set(texts.refusal_ids))
        self.openings = RefusalOpenings()
        ((base_harmful, self.base_harmless),) = self._logprobs([None], "Unedited model")
        self._baseline = self._scores(base_harmful, self.base_harmless)

    def _logprobs(self, edits: Sequence[Edit | None], desc: str) -> list[list[torch.Tensor]]:
        sets = (self.harmful, self.harmless)
        return streamed_logprobs(
            self.model, self.tokenizer, sets, edits, batch_size=self.batch_size, desc=desc
        )

    def _scores(self, harmful: torch.Tensor, harmless: torch.Tensor) -> EditScores:
        first = harmful[:, self.refusal_ids].logsumexp(-1).exp()  # (n_harmful,)
        kl = kl_divergence(self.base_harmless, harmless)  # (n_harmless,)
        return EditScores(refusal=first, first_token=first, kl=kl)

    def subset(self, n_harmful: int, n_harmless: int) -> StreamedScorer:
        """The same scorer on the first ``n_harmful`` and ``n_harmless`` prompts (the unedited
        distributions are shared)."""
        clone = object.__new__(StreamedScorer)
        clone.__dict__.update(self.__dict__)
        clone.harmful, clone.harmless = self.harmful[:n_harmful], self.harmless[:n_harmless]
        clone.n_harmful, clone.n_harmless = len(clone.harmful), len(clone.harmless)
        clone.base_harmless = self.base_harmless[: clone.n_harmless]
        return clone

    @torch.inference_mode()
    def score(
        self, edits: Sequence[Edit], edits_per_pass: int = 4, desc: str | None = None
    ) -> list[EditScores]:
        """Scores of each edit; the passes hold as many edits as the stream memory allows
        (``edits_per_pass`` does not apply)."""
        del edits_per_pass
        scored = self._logprobs(list(edits), desc or "Scoring")
        return [self._scores(harmful, harmless) for harmful, harmless in scored]

    def baseline(self) -> EditScores:
        """Scores of the unedited model (its KL is 0)."""
        return self._baseline


Scorer = EditScorer | StreamedScorer
"""Either scorer: selection and search use only what the two share."""


def edit_scorer(
    model: PreTrainedModel | LayerwiseModel, tokenizer: PreTrainedTokenizerBase, texts: ScoringSet
) -> Scorer:
    """:class:`EditScorer` on a loaded model, :class:`StreamedScorer` on a layer-streamed one
    (which cannot use ``openings``: the caller has fallen back to the next-token objective)."""
    if isinstance(model, LayerwiseModel):
        return StreamedScorer(model, tokenizer, texts)
    return EditScorer(model, tokenizer, texts)
