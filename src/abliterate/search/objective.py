"""The search's cheap objective: what one trial costs, and the precision it is scored in.

A trial never generates text. It costs one forward pass over the harmful and harmless
*validation* prompts, several trials per pass (:mod:`abliterate.search.scoring`): the
objectives are the mean probability that the answer to a harmful prompt opens with one of the
model's own refusal openings (teacher-forced over a few tokens; :func:`refusal_openings` finds
them once, from the unedited model's judged answers) and the first-token KL divergence on
harmless prompts (:class:`CheapObjective`). :func:`search_model` gives the model those passes
run on: the model itself, or a bfloat16 copy where the device computes bfloat16 natively
(:func:`native_bf16`). A layer-streamed model is scored on next-token log-probabilities only
(:func:`scoring_config` says what falls back).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from abliterate.core.edits import Edit
from abliterate.eval.judges import Judge
from abliterate.measure.refusal import RefusalOpenings
from abliterate.model.forward import SharedPrefixScorer, greedy_new_tokens
from abliterate.model.layerwise import LayerwiseModel
from abliterate.search.scoring import ScoringSet, edit_scorer
from abliterate.search.streamed import streamed_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from abliterate.config.commands import RunConfig


log = logging.getLogger(__name__)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (so faster than float32).

    CUDA: the device supports bf16. CPU: the x86 flags ``avx512_bf16`` or ``amx_bf16`` (Linux's
    ``/proc/cpuinfo``), or the Arm ``bf16`` feature. Elsewhere False: bf16 emulated on a CPU
    without those instructions can be slower than float32.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags: set[str] = set()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def search_model(model: PreTrainedModel, search_dtype: str) -> PreTrainedModel:
    """The model the search scores with: ``model`` itself, or a copy in another precision.

    ``"auto"`` copies a float32 model to bfloat16 where that is native (:func:`native_bf16`);
    ``"model"`` never copies; a dtype name converts to it (a copy unless already so). The copy
    costs memory (half the float32 model for bfloat16) for as long as the search runs.
    """
    current = next(model.parameters()).dtype
    # A model placed by a device map (or quantized) is scored as it is: a copy would need the
    # memory that the placement saves, and accelerate's hooks do not survive a deep copy.
    if search_dtype == "model" or getattr(model, "hf_device_map", None) is not None:
        return model
    if search_dtype == "auto":
        device = next(model.parameters()).device
        if current != torch.float32 or not native_bf16(device):
            return model
        target = torch.bfloat16
    else:
        target = getattr(torch, search_dtype)
    if current == target:
        return model
    log.info("search scores trials in %s on a copy of the model", str(target).split(".")[-1])
    # Each parameter is converted straight into the copy (no transient full-precision copy);
    # a shared parameter (tied embeddings) stays shared, as deepcopy's memo maps it once.
    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(p.detach().to(target), requires_grad=False)
        for p in model.parameters()
    }
    clone = copy.deepcopy(model, memo)
    return clone.to(target)  # type: ignore[arg-type]  # buffers too; parameters are done


def judged_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    prompts: Sequence[str],
    judge: Judge,
    *,
    tokens: int = 16,
    batch_size: int = 32,
) -> tuple[list[list[int]], list[bool]]:
    """The model's greedy answers to ``texts`` (token ids, up to and including the first
    end-of-text token, at most ``tokens``) and the judge's verdicts on them (the judge reads
    ``prompts``, the raw instructions)."""
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    rows = greedy_new_tokens(
        model, tokenizer, texts, max_new_tokens=tokens, batch_size=batch_size
    )  # (n_texts, <= tokens)
    answers = [
        row[: next((j + 1 for j, t in enumerate(row) if t in stop), len(row))] for row in rows
    ]
    decoded = [str(tokenizer.decode(a, skip_special_tokens=True)).strip() for a in answers]
    return answers, judge(list(prompts), decoded)


def refusal_probabilities(
    model: PreTrainedModel | LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    refusal_ids: Sequence[int],
    *,
    batch_size: int = 32,
) -> torch.Tensor:
    """``(len(texts),)`` next-token refusal probability of the unedited model after each
    chat-formatted text: the probability that its answer opens with the first token of a
    common refusal opening (the selection's next-token proxy), on a loaded or a layer-streamed
    model."""
    ids = sorted(set(refusal_ids))
    if isinstance(model, LayerwiseModel):
        ((logprobs,),) = streamed_logprobs(
            model, tokenizer, [texts], [None], batch_size=batch_size, desc="Refusals"
        )
    else:
        logprobs = SharedPrefixScorer(model, tokenizer, texts, batch_size).logprobs()
    return logprobs[:, ids].logsumexp(-1).exp()


REFUSED_ABOVE = 0.5
"""A prompt counts as refused when its next-token refusal probability is above this (refusal
log-odds above 0, Arditi et al.'s filter)."""


def refused_prompts(probabilities: torch.Tensor, minimum: int) -> list[int]:
    """Indices (in order) of the prompts a model refuses (probability above
    :data:`REFUSED_ABOVE`), or of the ``minimum`` it is most likely to refuse when it refuses
    fewer (all of them when there are fewer prompts than that)."""
    if minimum < 1:
        raise ValueError(f"minimum must be at least 1, got {minimum}")
    refused = [i for i, p in enumerate(probabilities.tolist()) if p > REFUSED_ABOVE]
    if len(refused) >= minimum:
        return refused
    # A stable sort: equal probabilities keep their prompt order, so the choice is reproducible.
    order = sorted(range(len(probabilities)), key=lambda i: -float(probabilities[i]))
    return sorted(order[:minimum])


def refusal_openings(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    prompts: Sequence[str],
    judge: Judge,
    *,
    length: int,
    top: int,
    tokens: int = 16,
    batch_size: int = 32,
) -> RefusalOpenings:
    """The unedited model's own refusal openings on ``texts`` (harmful validation prompts):
    the ``top`` most frequent first ``length`` tokens of its judged refusals among
    :func:`judged_answers` of ``tokens`` tokens. A short generation suffices: a refusal shows
    in its first words, and only its opening is kept."""
    answers, refused = judged_answers(
        model, tokenizer, texts, prompts, judge, tokens=tokens, batch_size=batch_size
    )
    openings = RefusalOpenings.from_answers(answers, refused, length, top)
    log.info(
        "refusal openings: %s (%d of %d answers refused; the openings cover %.0f%% of them)",
        [tokenizer.decode(list(t)) for t in openings.tokens], sum(refused), len(refused),
        100 * openings.coverage,
    )  # fmt: skip
    return openings


def scoring_config(model: PreTrainedModel | LayerwiseModel, config: RunConfig) -> RunConfig:
    """``config`` as selection and search can score on ``model``. A layer-streamed model gives
    next-token log-probabilities only (:class:`~abliterate.search.scoring.StreamedScorer`):
    ``--refusal-objective openings`` falls back to ``next_token`` and ``--refine-steps`` to 0
    (the descent needs gradients through a loaded model), each with a warning; the report
    then shows the objective actually used."""
    if not isinstance(model, LayerwiseModel):
        return config
    update: dict[str, Any] = {}
    if config.refusal_objective != "next_token":
        log.warning(
            "--refusal-objective %s needs the model loaded; the layer-streamed model is scored "
            "with the next-token refusal probability instead",
            config.refusal_objective,
        )
        update["refusal_objective"] = "next_token"
    if config.refine_steps > 0:
        log.warning(
            "--refine-steps needs gradients through a loaded model; the layer-streamed edit "
            "is not refined"
        )
        update["refine_steps"] = 0
    return config.model_copy(update=update) if update else config


def objective_openings(
    model: PreTrainedModel | LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    prompts: Sequence[str],
    judge: Judge,
    config: RunConfig,
) -> RefusalOpenings:
    """The openings ``--refusal-objective`` asks about: none for ``next_token`` (the scorer's
    refusal is then the next-token proxy) or a layer-streamed model (:func:`scoring_config`),
    else :func:`refusal_openings` of ``texts``."""
    if config.refusal_objective == "next_token" or isinstance(model, LayerwiseModel):
        return RefusalOpenings()
    return refusal_openings(
        model, tokenizer, texts, prompts, judge, length=config.opening_tokens,
        top=config.refusal_openings, batch_size=config.batch_size,
    )  # fmt: skip


class CheapObjective:
    """The generation-free objectives of edits on the validation prompts
    (:class:`~abliterate.search.scoring.EditScorer`): ``refusal`` (the probability of opening
    the answer with one of the model's refusal openings), ``refusal_prob`` (the next-token
    proxy) and ``kl`` (first-token KL divergence).

    Args:
        model: A loaded model (:class:`~abliterate.search.scoring.EditScorer`: several edits
            per forward pass, the chat template's shared opening computed once per pass) or a
            layer-streamed one (:class:`~abliterate.search.scoring.StreamedScorer`: next-token
            scores only, as many edits per read of the weights as fit).
        texts: The validation texts, refusal tokens and openings (:func:`refusal_openings`)
            the edits are scored on, and the rows per forward pass.
        edits_per_pass: Edits scored together in one forward pass (:meth:`many`).
    """

    def __init__(
        self,
        model: PreTrainedModel | LayerwiseModel,
        tokenizer: PreTrainedTokenizerBase,
        texts: ScoringSet,
        edits_per_pass: int = 4,
    ) -> None:
        # The chat template's shared opening is computed once per pass (abliterate.search.scoring).
        self.model = model
        self.scorer = edit_scorer(model, tokenizer, texts)
        self.edits_per_pass = edits_per_pass
        base = self.scorer.baseline()
        prob = base.refusal.mean().clamp(1e-7, 1 - 1e-7)
        self.baseline = {
            **base.summary(),
            "refusal_score": float(torch.log(prob) - torch.log1p(-prob)),
        }
        del self.baseline["kl"]

    def __call__(self, edit: Edit) -> dict[str, float]:
        """``{"refusal", "refusal_prob", "kl"}`` of ``edit`` on the validation prompts."""
        return self.many([edit])[0]

    def many(self, edits: Sequence[Edit], desc: str | None = None) -> list[dict[str, float]]:
        """:meth:`__call__` of several edits, scored ``edits_per_pass`` at a time (``desc``
        shows a progress bar)."""
        return [s.summary() for s in self.scorer.score(edits, self.edits_per_pass, desc)]
