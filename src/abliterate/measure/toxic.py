"""DINM's toxic-layer location: the layer whose states best separate a safe from an unsafe
answer to the same adversarial prompt.

For one instance the chat-formatted adversarial prompt is followed once by the safe and once by
the unsafe answer. At the output of every decoder layer (site ``post``, before any final norm)
the residual states are averaged over the answer's tokens only — the prompt and the padding are
excluded through the response mask, and the attention mask keeps padding out of every real
position (:func:`~abliterate.measure.responses.response_means`). Averaging first makes answers
of different lengths comparable (the reference code compares padded token sequences position by
position). Every instance is located on its own, on the model as it is when that instance is
edited.

Two distances between the two answers' mean states ``s`` and ``u`` at a layer:

* ``euclidean``: ``‖s − u‖₂``, as in Wang et al. (2024). The residual stream's norm grows with
  depth (on the demo model from 1.3 after layer 0 to 31 after layer 23), so this distance
  almost always picks the last layer, whose MLP output acts on the logits directly; tuning it
  turns every answer into a refusal.
* ``relative`` (default): ``‖s − u‖₂ / ((‖s‖₂ + ‖u‖₂) / 2)``, the same distance in units of
  the layer's own state norm, so layers of different depth compare on how far apart the two
  answers are rather than on how large the states have grown.

The search runs over ``layers`` (default: every layer but the first and the last — after the
first layer the states still mostly encode the tokens themselves, so any two different texts
look far apart, and the last layer's MLP output writes straight into the logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

from abliterate.errors import ConfigError
from abliterate.measure.responses import response_means

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Distance = Literal["relative", "euclidean"]


class ToxicLayer(NamedTuple):
    """Where one instance's safe and unsafe answers differ most.

    Attributes:
        layer: The located layer (argmax of ``distances`` over the searched layers).
        distances: Per layer (every layer, searched or not), the distance between the mean
            safe and mean unsafe states at its output.
    """

    layer: int
    distances: tuple[float, ...]


def default_search_layers(n_layers: int) -> tuple[int, ...]:
    """Every layer but the first and the last (all of them when there are fewer than three)."""
    return tuple(range(1, n_layers - 1)) if n_layers >= 3 else tuple(range(n_layers))


def locate_toxic_layers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_texts: Sequence[str],
    safe: Sequence[str],
    unsafe: Sequence[str],
    *,
    distance: Distance = "relative",
    layers: Sequence[int] = (),
    batch_size: int = 16,
) -> list[ToxicLayer]:
    """The toxic layer of each instance (one chat-formatted prompt and its two answers).

    Args:
        distance: ``relative`` or ``euclidean`` (module docstring).
        layers: The layers searched (default: :func:`default_search_layers`).

    Raises:
        ConfigError: a searched layer is not a layer of the model.
    """
    n = len(prompt_texts)
    means = response_means(
        model, tokenizer, [*prompt_texts, *prompt_texts], [*safe, *unsafe],
        sites=("post",), batch_size=batch_size, desc="Locating toxic layers",
    )[:, :, 0].double()  # fmt: skip
    # means: (2n, n_layers, d_model); rows i and n + i are instance i's safe and unsafe answers.
    n_layers = means.shape[1]
    searched = tuple(layers) or default_search_layers(n_layers)
    if not all(0 <= layer < n_layers for layer in searched):
        raise ConfigError(
            f"toxic-layer search layers {list(searched)} are not all within the model's "
            f"{n_layers} layers (0 to {n_layers - 1})."
        )
    s, u = means[:n], means[n:]
    distances = (s - u).norm(dim=-1)  # (n, n_layers)
    if distance == "relative":
        distances = distances / ((s.norm(dim=-1) + u.norm(dim=-1)) / 2).clamp_min(1e-12)
    index = list(searched)
    return [
        ToxicLayer(index[int(row[index].argmax())], tuple(float(d) for d in row))
        for row in distances.unbind(0)
    ]
