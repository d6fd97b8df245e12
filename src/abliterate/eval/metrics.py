"""Quality metrics of a model beyond refusal: reference cross-entropy and n-gram fluency.

* **Reference cross-entropy** — the mean per-token cross-entropy (nats) of a good, harmless
  reference answer given its prompt, under teacher forcing in the chat format. It measures how
  much an edit damaged the model's ability to predict ordinary helpful text: an unedited model
  scores some baseline value, and damage shows as an increase. The package ships
  :func:`reference_answers`, project-written prompt/answer pairs.
* **n-gram fluency** — for each generated answer, the fraction of distinct word n-grams
  (``distinct_n``) and the Shannon entropy in bits of its n-gram frequency distribution
  (``entropy_n``) for n = 1, 2, 3, averaged over non-empty answers. A fluent answer repeats
  itself little (distinct close to 1, entropy near log2 of the number of n-grams); a degenerate
  loop ("the the the …") drives both down. Words are lower-cased ``\\w+`` runs, so the metric
  does not depend on the model's tokenizer and compares across models.

KL divergences between two models live in :mod:`abliterate.scoring`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import torch

from abliterate.data.chat import format_chat
from abliterate.model.devices import input_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_WORDS = re.compile(r"\w+")
FLUENCY_ORDERS = (1, 2, 3)


@dataclass(frozen=True)
class ReferenceAnswers:
    """Prompts with reference answers, for :func:`reference_cross_entropy`."""

    name: str
    prompts: tuple[str, ...]
    answers: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int | None) -> ReferenceAnswers:
        """The first ``n`` pairs (all of them when ``n`` is None or larger than the set)."""
        if n is None or n >= len(self.prompts):
            return self
        return ReferenceAnswers(f"{self.name}[:{n}]", self.prompts[:n], self.answers[:n])


def reference_answers() -> ReferenceAnswers:
    """The built-in harmless prompts with project-written reference answers."""
    path = resources.files("abliterate.data") / "prompt_data" / "reference_answers.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return ReferenceAnswers(
        "builtin:reference_answers",
        tuple(r["prompt"] for r in rows),
        tuple(r["answer"] for r in rows),
    )


@torch.inference_mode()
def reference_cross_entropy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    system_prompt: str | None = None,
    batch_size: int = 32,
) -> float:
    """Mean per-token cross-entropy (nats) of each answer given its chat-formatted prompt.

    The prompt and the answer are tokenized separately and concatenated, so the answer's tokens
    are the same whatever the template's last characters; every answer token is predicted from
    the prompt and the answer tokens before it. The mean is over all answer tokens of all pairs.
    """
    if len(prompts) != len(answers) or not prompts:
        raise ValueError("one answer per prompt, and at least one pair, are needed")
    device = input_device(model)
    prefixes = format_chat(tokenizer, prompts, system_prompt)
    rows = []
    for prefix, answer in zip(prefixes, answers, strict=True):
        p_ids = tokenizer(prefix, add_special_tokens=False).input_ids
        a_ids = tokenizer(answer, add_special_tokens=False).input_ids
        rows.append((p_ids, a_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        # Right padding: positions keep their natural indices and padding sits after the answer.
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, a) in enumerate(chunk):
            ids[row, : len(p) + len(a)] = torch.tensor(p + a)
            mask[row, : len(p) + len(a)] = 1
        # Only positions from the shortest prompt's last token on predict answer tokens; keeping
        # just those logits saves most of the (batch, width, vocab) tensor on large vocabularies.
        first = min(len(p) for p, _ in chunk) - 1
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=width - first
        ).logits  # (batch, width - first, vocab); index j is position first + j
        for row, (p, a) in enumerate(chunk):
            pred = logits[row, len(p) - 1 - first : len(p) + len(a) - 1 - first].float()
            target = torch.tensor(a, device=pred.device)
            total += float(torch.nn.functional.cross_entropy(pred, target, reduction="sum"))
            count += len(a)
    return total / count


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def ngram_stats(text: str, n: int) -> tuple[float, float] | None:
    """``(distinct_n, entropy_n)`` of one text, or None when it has no n-gram of that order."""
    grams = _ngrams(_WORDS.findall(text.lower()), n)
    if not grams:
        return None
    counts = Counter(grams)
    total = len(grams)
    entropy = -sum(c / total * math.log2(c / total) for c in counts.values())
    return len(counts) / total, entropy


def ngram_fluency(texts: Sequence[str]) -> dict[str, float | int | None]:
    """Mean ``distinct_n`` and ``entropy_n`` (bits) over texts, n = 1, 2, 3 (module docstring).

    Texts too short for an order are left out of that order's mean; an order no text reaches is
    reported as None. ``n_texts`` counts the non-empty texts.
    """
    out: dict[str, float | int | None] = {"n_texts": sum(1 for t in texts if _WORDS.search(t))}
    for n in FLUENCY_ORDERS:
        stats = [s for s in (ngram_stats(t, n) for t in texts) if s is not None]
        out[f"distinct_{n}"] = sum(s[0] for s in stats) / len(stats) if stats else None
        out[f"entropy_{n}"] = sum(s[1] for s in stats) / len(stats) if stats else None
    return out
