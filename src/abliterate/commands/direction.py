"""``abliterate direction`` and ``abliterate direction combine``: make and combine behaviour
directions.

``direction`` loads two prompt sets, reads the model's mean activations on each
(:func:`~abliterate.measure.behaviour.behaviour_directions`) and writes their per-layer
difference as one direction-set file. ``direction combine`` evaluates a sum of scaled
direction-set files (:func:`parse_expression`), optionally normalises it or keeps some layers,
and writes the result; it needs no model.

Reasoning models (``--thinking``): both sets are formatted with the chat template's thinking
switch as asked, the same rule as the sets ``abliterate run`` measures its directions on (its
``train`` sets; only the sets whose *next-token distributions* it reads are formatted with
thinking off, and ``direction`` reads none). So with ``--thinking on``:

* a set of bare prompts is read at each prompt's last token, where the model is about to
  reason (Qwen3: after ``<|im_start|>assistant``; DeepSeek-style templates: after the opening
  ``<think>``), the position from which ``steer --thinking on`` generates; harmful minus
  harmless prompts read this way is the mean difference ``run --thinking on`` takes its
  refusal directions from;
* a set with responses is read over the response tokens with each response placed where the
  model's output starts, so the responses are taken as whole generations, reasoning block
  included (a reasoning model's own outputs). Plain answers without reasoning belong with
  ``--thinking off``, which places them after an empty reasoning block, where an answer goes.

With ``--thinking off`` (the default) a reasoning block the template opens anyway is closed
empty, so a prompt is read where the answer starts; templates with neither a switch nor such a
block (most chat models) render the same either way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from abliterate.commands.evaluate import load_checked
from abliterate.config import DirectionCombineConfig, DirectionConfig
from abliterate.core.directions import DirectionSet
from abliterate.data.chat import ChatSet
from abliterate.data.prompts import load_prompts
from abliterate.errors import ConfigError, OutputDirError
from abliterate.measure.behaviour import behaviour_directions
from abliterate.model.loading import local_path

log = logging.getLogger(__name__)


def _target(out: Path, overwrite: bool, inputs: Iterable[str | Path | None]) -> Path:
    """The file ``--out`` names; it may replace an earlier result, never a file the command
    reads (``inputs``: paths, or names that may be paths)."""
    target = out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors")
    if target.exists():
        for item in inputs:
            path = Path(item).expanduser() if item else None
            if path is not None and path.exists() and path.resolve() == target.resolve():
                raise OutputDirError(
                    f"--out {out} is the input {item}; a command never writes over what it "
                    "reads. Choose another --out."
                )
        if not overwrite:
            raise OutputDirError(f"{target} already exists; pass --overwrite to replace it.")
    return target


def direction(config: DirectionConfig, extra_inputs: Sequence[str | Path] = ()) -> DirectionSet:
    """Compute ``--positive`` minus ``--negative`` per layer and write it to ``--out``.

    ``extra_inputs``: further files the caller read (the CLI's ``--config`` file), which
    ``--out`` must not be either.
    """
    config.require_sets()
    assert config.positive and config.negative and config.out  # require_sets checked them
    inputs = [config.positive, config.negative, local_path(config.model), *extra_inputs]
    target = _target(config.out, config.overwrite, inputs)
    positive = load_prompts(config.positive, config.prompt_column).head(config.n_prompts)
    negative = load_prompts(config.negative, config.prompt_column).head(config.n_prompts)
    loaded = load_checked(config)
    tok = loaded.tokenizer
    try:
        directions = behaviour_directions(
            loaded.model, tok,
            ChatSet.format(tok, positive, config.system_prompt, config.thinking),
            ChatSet.format(tok, negative, config.system_prompt, config.thinking),
            site=config.site, batch_size=config.batch_size, model_name=loaded.name,
            revision=loaded.revision,
        )  # fmt: skip
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    directions.save(target)
    norms = ", ".join(f"{layer}: {s:.3g}" for layer, s in zip(directions.layers, directions.scales,
                                                                strict=True))  # fmt: skip
    print(f"Wrote {target} ({len(directions)} layers at site {directions.site}; norms {norms})")
    return directions


def parse_expression(expression: str) -> list[tuple[float, Path]]:
    """``[(coefficient, file)]`` of an expression like ``2*a.safetensors - b.safetensors``.

    Terms are separated by ``+`` or ``-`` standing alone between spaces (file names may hold
    hyphens); a term is ``FILE`` or ``NUMBER*FILE``; a leading ``-`` negates the first term.

    Raises:
        ConfigError: the expression is empty, or a term or operator is malformed.
    """
    tokens = expression.split()
    if not tokens:
        raise ConfigError("the expression is empty; write e.g. 'a.safetensors - b.safetensors'.")
    sign, expect_term = 1.0, True
    terms: list[tuple[float, Path]] = []
    for token in tokens:
        if token in ("+", "-"):
            if not expect_term:
                sign, expect_term = (1.0 if token == "+" else -1.0), True
            elif token == "-" and not terms:
                sign = -sign
            else:
                raise ConfigError(f"two operators in a row in {expression!r}.")
            continue
        if not expect_term:
            raise ConfigError(f"missing ' + ' or ' - ' before {token!r} in {expression!r}.")
        coefficient, star, name = token.partition("*")
        if star:
            try:
                value = float(coefficient)
            except ValueError as exc:
                raise ConfigError(f"{coefficient!r} in {token!r} is not a number.") from exc
            if not math.isfinite(value):
                raise ConfigError(f"the coefficient in {token!r} must be finite.")
        else:
            value, name = 1.0, token
        if not name:
            raise ConfigError(f"{token!r} names no file.")
        terms.append((sign * value, Path(name)))
        sign, expect_term = 1.0, False
    if expect_term:
        raise ConfigError(f"{expression!r} ends with an operator.")
    return terms


def combine_sets(
    terms: list[tuple[float, DirectionSet]], *, normalize: bool, layers: tuple[int, ...]
) -> DirectionSet:
    """``Σ cᵢ·Sᵢ``, restricted to ``layers`` (when given) and normalised (when asked).

    Raises:
        ValueError: the sets do not match (layers, width, site, model), or a layer is missing.
    """
    total = terms[0][1] * terms[0][0]
    for coefficient, other in terms[1:]:
        total = total + other * coefficient
    if layers:
        missing = [x for x in layers if x not in total.layers]
        if missing:
            raise ValueError(f"layers {missing} are not in the sets (layers {list(total.layers)})")
        keep = [total.layers.index(x) for x in sorted(set(layers))]
        total = replace(
            total,
            vectors=total.vectors[keep],
            layers=tuple(total.layers[i] for i in keep),
            scales=tuple(total.scales[i] for i in keep),
        )
    return total.normalized() if normalize else total


def combine(
    config: DirectionCombineConfig, extra_inputs: Sequence[str | Path] = ()
) -> DirectionSet:
    """Evaluate ``config.expression`` on the saved sets and write the result to ``--out``
    (which may be none of the sets, nor an ``extra_inputs`` file such as ``--config``)."""
    parsed = parse_expression(config.expression)
    target = _target(config.out, config.overwrite, [*(p for _, p in parsed), *extra_inputs])
    terms = []
    for coefficient, path in parsed:
        if not path.is_file():
            raise ConfigError(f"direction set {path} does not exist.")
        try:
            terms.append((coefficient, DirectionSet.load(path)))
        except (ValueError, OSError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        result = combine_sets(terms, normalize=config.normalize, layers=config.layers)
    except ValueError as exc:
        raise ConfigError(f"cannot combine: {exc}") from exc
    result = replace(result, description=config.description or config.expression)
    result.save(target)
    print(f"Wrote {target} ({len(result)} layers: {list(result.layers)})")
    return result
