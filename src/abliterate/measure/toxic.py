"""DINM's toxic-layer location: the layer whose states best separate a safe from an unsafe
answer to the same adversarial prompt.

For one instance the chat-formatted adversarial prompt is followed once by the safe and once by
the unsafe answer. At the output of every decoder layer (site ``post``, before any final norm)
the residual states are averaged over the answer's tokens only — the prompt and the padding are
excluded through the response mask, and the attention mask keeps padding out of every real
position (:func:`~abliterate.measure.responses.response_means`). The toxic layer is the one
where the Euclidean distance between the two answers' mean states is largest, as in Wang et al.
(2024). Averaging first makes answers of different lengths comparable (the reference code
compares padded token sequences position by position). Every instance is located on its own,
on the model as it is when that instance is edited.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from abliterate.measure.responses import response_means

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ToxicLayer(NamedTuple):
    """Where one instance's safe and unsafe answers differ most.

    Attributes:
        layer: The located layer (argmax of ``distances``).
        distances: Per layer, ``‖mean(safe states) − mean(unsafe states)‖₂`` at its output.
    """

    layer: int
    distances: tuple[float, ...]


def locate_toxic_layers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_texts: Sequence[str],
    safe: Sequence[str],
    unsafe: Sequence[str],
    *,
    batch_size: int = 16,
) -> list[ToxicLayer]:
    """The toxic layer of each instance (one chat-formatted prompt and its two answers)."""
    n = len(prompt_texts)
    means = response_means(
        model, tokenizer, [*prompt_texts, *prompt_texts], [*safe, *unsafe],
        sites=("post",), batch_size=batch_size, desc="Locating toxic layers",
    )[:, :, 0]  # fmt: skip
    # means: (2n, n_layers, d_model); rows i and n + i are instance i's safe and unsafe answers.
    distances = (means[:n].double() - means[n:].double()).norm(dim=-1)  # (n, n_layers)
    return [
        ToxicLayer(int(row.argmax()), tuple(float(d) for d in row)) for row in distances.unbind(0)
    ]
