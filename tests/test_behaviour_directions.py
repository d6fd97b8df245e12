"""Behaviour directions: arithmetic laws (hypothesis), the combine expression, directions from
bare prompts and from prompt + response sets, and ``abliterate direction`` end to end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abliterate.cli import main, parse_command
from abliterate.commands.direction import combine_sets, parse_expression
from abliterate.core.directions import DirectionSet
from abliterate.data.chat import ChatSet
from abliterate.data.prompts import PromptSet, builtin, load_prompts
from abliterate.errors import ConfigError, PromptSetError
from abliterate.measure.activations import collect_activations
from abliterate.measure.behaviour import behaviour_directions
from abliterate.measure.responses import response_means

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
scalars = st.floats(-50, 50, allow_nan=False, allow_infinity=False).filter(lambda x: abs(x) > 1e-3)


@st.composite
def pairs_of_sets(draw: st.DrawFn) -> tuple[DirectionSet, DirectionSet]:
    """Two direction sets of one shape (same layers, width and site)."""
    n = draw(st.integers(1, 4))
    d = draw(st.integers(1, 6))
    layers = tuple(sorted(draw(st.sets(st.integers(0, 30), min_size=n, max_size=n))))

    def one() -> DirectionSet:
        values = draw(st.lists(finite, min_size=n * d, max_size=n * d))
        return DirectionSet(torch.tensor(values).view(n, d), layers, site="post")

    return one(), one()


@settings(max_examples=60, deadline=None)
@given(pairs_of_sets(), scalars, scalars)
def test_combination_is_the_python_arithmetic(
    sets: tuple[DirectionSet, DirectionSet], a: float, b: float
) -> None:
    x, y = sets
    assert combine_sets([(a, x), (b, y)], normalize=False, layers=()) == x * a + y * b
    assert torch.equal((x + y).vectors, (y + x).vectors)  # commutative, exactly
    assert x * 2 == x + x
    negated = -x
    assert -negated == x
    assert torch.count_nonzero((x - x).vectors) == 0
    assert torch.allclose(((x * a) / a).vectors, x.vectors, rtol=1e-5, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(pairs_of_sets())
def test_normalizing_gives_unit_rows_once_and_for_all(
    sets: tuple[DirectionSet, DirectionSet],
) -> None:
    x, _ = sets
    norms = x.vectors.norm(dim=-1)
    if bool((norms == 0).any()):
        with pytest.raises(ValueError, match="zero vector"):
            combine_sets([(1.0, x)], normalize=True, layers=())
        return
    if bool((norms < 1e-3).any()):
        return  # float32 rounding dominates such tiny rows
    unit = combine_sets([(1.0, x)], normalize=True, layers=())
    assert torch.allclose(unit.vectors.norm(dim=-1), torch.ones(len(x)), atol=1e-5)
    assert torch.allclose(unit.normalized().vectors, unit.vectors, atol=1e-6)


names = st.from_regex(r"[a-z][a-z0-9_/.-]{0,12}\.safetensors", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-9, 9, allow_nan=False).map(lambda v: round(v, 3)), names),
                min_size=1, max_size=4))  # fmt: skip
def test_expressions_parse_back_to_their_terms(terms: list[tuple[float, str]]) -> None:
    text = ""
    for i, (coefficient, name) in enumerate(terms):
        sign = "-" if coefficient < 0 else "+"
        term = f"{abs(coefficient)!r}*{name}"
        text += f"{'-' if sign == '-' else ''} {term}" if i == 0 else f" {sign} {term}"
    parsed = parse_expression(text.strip())
    # The names come back as paths (so "a//b.safetensors" reads as "a/b.safetensors").
    assert [(c, p) for c, p in parsed] == [(c, Path(name)) for c, name in terms]


def test_expression_errors_are_one_line() -> None:
    assert parse_expression("a.safetensors - 0.5*b-c.safetensors") == [
        (1.0, Path("a.safetensors")), (-0.5, Path("b-c.safetensors"))]  # fmt: skip
    for bad in ("", "a + + b", "a b", "a -", "x*a", "inf*a", "2*"):
        with pytest.raises(ConfigError):
            parse_expression(bad)


def test_combine_keeps_layers_and_refuses_mismatches() -> None:
    x = DirectionSet(torch.eye(3), (2, 5, 7), site="post")
    kept = combine_sets([(1.0, x)], normalize=False, layers=(7, 2))
    assert kept.layers == (2, 7) and torch.equal(kept.vectors, torch.eye(3)[[0, 2]])
    with pytest.raises(ValueError, match="not in the sets"):
        combine_sets([(1.0, x)], normalize=False, layers=(3,))
    other = DirectionSet(torch.eye(3), (2, 5, 8), site="post")
    with pytest.raises(ValueError, match="layer mismatch"):
        combine_sets([(1.0, x), (1.0, other)], normalize=False, layers=())


def test_style_sets_ship_with_their_answers() -> None:
    terse, verbose = builtin("terse"), builtin("verbose")
    assert terse.prompts == verbose.prompts and len(terse) >= 32
    assert terse.responses is not None and verbose.responses is not None
    words = [len(r.split()) for r in terse.responses], [len(r.split()) for r in verbose.responses]
    assert max(words[0]) < min(words[1])
    assert load_prompts("builtin:terse") == terse
    assert load_prompts("builtin:harmful:eval") == builtin("harmful", "eval")
    with pytest.raises(PromptSetError, match="no built-in"):
        load_prompts("builtin:nothing")
    # Sets without answers keep the content hash they always had.
    assert PromptSet("x", ("a", "b")).sha256 != PromptSet("x", ("a", "b"), None, ("1", "2")).sha256


def test_directions_from_bare_prompts_are_mean_differences(
    make_model: Callable[[str], Any], tokenizer: Any
) -> None:
    model = make_model("qwen2")
    pos = ChatSet.format(
        tokenizer, PromptSet("p", ("Explain how to pick a lock.", "Build a weapon."))
    )
    neg = ChatSet.format(tokenizer, PromptSet("n", ("How do I bake bread?", "Write a poem.")))
    found = behaviour_directions(model, tokenizer, pos, neg, site="pre", batch_size=2)
    a, _ = collect_activations(model, tokenizer, pos.texts, sites=("pre",))
    b, _ = collect_activations(model, tokenizer, neg.texts, sites=("pre",))
    assert found.layers == (1, 2, 3)  # site "pre" of layer 0 is the embedding: left out
    assert torch.allclose(found.vectors, (a - b)[1:, 0].float(), atol=1e-5)
    assert found.scales == pytest.approx([float(n) for n in (a - b)[1:, 0].norm(dim=-1)])


def test_directions_from_answers_are_read_at_the_answer_tokens(
    make_model: Callable[[str], Any], tokenizer: Any
) -> None:
    model = make_model("llama")
    prompts = ("How do I bake bread?", "What is the capital of France?")
    pos = PromptSet("terse", prompts, None, ("Bake it.", "Paris."))
    neg = PromptSet("long", prompts, None, ("Sure, here is a recipe for a tasty soup.",
                                            "Paris is the capital of France."))  # fmt: skip
    chats = ChatSet.format(tokenizer, pos), ChatSet.format(tokenizer, neg)
    found = behaviour_directions(model, tokenizer, *chats, site="post")
    means = [response_means(model, tokenizer, c.texts, c.prompts.responses or ()) for c in chats]
    expected = (means[0].double().mean(0) - means[1].double().mean(0))[:, 0].float()
    assert found.layers == (0, 1, 2, 3) and torch.allclose(found.vectors, expected, atol=1e-5)
    with pytest.raises(ValueError, match="both prompt sets"):
        behaviour_directions(
            model, tokenizer, chats[0], ChatSet.format(tokenizer, PromptSet("b", prompts))
        )


def test_direction_command_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "terse"
    args = ["direction", "--model", str(tiny_model_dir), "--positive", "builtin:terse",
            "--negative", "builtin:verbose", "--n-prompts", "4", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    terse = DirectionSet.load(tmp_path / "terse.safetensors")
    assert terse.site == "post" and terse.layers == (0, 1, 2, 3)
    assert "builtin:terse" in terse.description
    assert main(args) == 2  # exists: refused without --overwrite
    combined = tmp_path / "both.safetensors"
    expr = f"2*{tmp_path / 'terse.safetensors'} - {tmp_path / 'terse.safetensors'}"
    assert main(["direction", "combine", expr, "--normalize", "--layers", "1", "3",
                 "--out", str(combined)]) == 0  # fmt: skip
    both = DirectionSet.load(combined)
    assert both.layers == (1, 3) and both.description == expr
    assert torch.allclose(both.vectors, terse.normalized().vectors[[1, 3]], atol=1e-6)
    assert parse_command(["direction", "combine", "a.safetensors", "--out", "x"]).command == (
        "direction combine"
    )
    assert main(["direction", "--model", str(tiny_model_dir)]) == 2  # --positive ... missing
