"""Reasoning ("thinking") models: the chat template's thinking switch and the reasoning block.

A reasoning model writes a block such as ``<think>…</think>`` before its answer. Three things
follow for abliterate, all decided here from text, never by trying things on the model:

* **The switch.** Templates that can turn reasoning off read a variable:
  ``enable_thinking`` (Qwen3, Qwen3.5, SmolLM3, GLM-4.5, EXAONE 4, Hunyuan) or ``thinking``
  (DeepSeek-V3.1, Granite 3.2+). :func:`thinking_switch` finds which one by parsing the template
  source with Jinja and listing the variables it reads (``jinja2.meta``); abliterate then
  always passes that variable explicitly (``True`` for ``--thinking on``, ``False`` for off),
  so the template's own default never matters.
* **Off means an empty reasoning block.** A template with a switch renders its own empty block
  when told to (Qwen3: ``<think>\\n\\n</think>\\n\\n``). A template without a switch whose
  generation prompt *opens* a block (DeepSeek-R1 ends with ``<think>\\n``) is closed the same
  way by :func:`close_reasoning`, so with thinking off the next token is the answer's first.
  A template that has neither (the demo model's Qwen2.5 template) is left exactly as it is.
* **Where the generation starts.** :func:`opens_reasoning` tells whether a formatted prompt
  ends with an opening tag, in which case the model's continuation *is* reasoning until the
  closing tag (the answer extraction of :func:`abliterate.eval.text.split_answer` needs this).

Reasoning blocks are recognised by the tags of :data:`REASONING_TAGS`. Formats without such
tags are not split: Granite's plain-text "Here is my thought process:" and gpt-oss's harmony
channels (whose markers are special tokens, dropped when decoding) are judged whole.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REASONING_TAGS = ("think", "thinking", "reasoning")
"""Names of the XML-style tags that delimit a reasoning block (``<think>…</think>``)."""

SWITCH_VARIABLES = ("enable_thinking", "thinking")
"""Template variables that switch reasoning on and off, in order of preference."""

_TAG = "|".join(REASONING_TAGS)
_OPEN = re.compile(rf"<({_TAG})>", re.IGNORECASE)
_CLOSE = re.compile(rf"</({_TAG})>", re.IGNORECASE)
_OPEN_AT_END = re.compile(rf"<({_TAG})>\s*$", re.IGNORECASE)


class _GenerationTag(jinja2.ext.Extension):
    """Parses transformers' ``{% generation %}…{% endgeneration %}`` block (it marks the
    assistant's tokens for training masks), so templates that use it can be parsed at all;
    only the variables are read here, so the block is kept as plain content."""

    tags = {"generation"}  # noqa: RUF012 (jinja's declared class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@lru_cache(maxsize=16)
def _template_variables(source: str) -> frozenset[str]:
    # The extensions transformers compiles chat templates with (loop controls, generation
    # blocks), so every template transformers can render parses here too.
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", _GenerationTag])
    return frozenset(jinja2.meta.find_undeclared_variables(env.parse(source)))


def thinking_switch(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The chat template's variable that turns reasoning on and off, or None without one.

    Read from the template source (see the module docstring): the first of
    :data:`SWITCH_VARIABLES` that the template reads from its context. A variable the
    template only sets itself (``{% set thinking = … %}``) is not a switch and is not found.
    """
    source = tokenizer.get_chat_template()
    variables = _template_variables(source)
    return next((v for v in SWITCH_VARIABLES if v in variables), None)


def template_options(tokenizer: PreTrainedTokenizerBase, thinking: bool) -> dict[str, Any]:
    """Extra ``apply_chat_template`` arguments that set the thinking switch (none without one)."""
    switch = thinking_switch(tokenizer)
    return {} if switch is None else {switch: thinking}


def opens_reasoning(text: str) -> bool:
    """Whether ``text`` (a formatted prompt) ends with an opening reasoning tag (whitespace
    after it aside), so that the model's continuation starts inside the reasoning block.

    Only the very end counts: a tag quoted in the user's instruction opens nothing.
    """
    return _OPEN_AT_END.search(text) is not None


def close_reasoning(text: str) -> str:
    """``text`` with an open reasoning block at its end closed empty (as Qwen3's template does
    with thinking off: ``<think>\\n\\n</think>\\n\\n``); any other text is returned unchanged."""
    match = _OPEN_AT_END.search(text)
    if match is None:
        return text
    return text + ("\n" if text.endswith("\n") else "\n\n") + f"</{match.group(1)}>\n\n"


def find_close(text: str, start: int = 0) -> re.Match[str] | None:
    """The first closing reasoning tag in ``text`` at or after ``start``."""
    return _CLOSE.search(text, start)


def leading_open(text: str) -> re.Match[str] | None:
    """The opening reasoning tag that ``text`` starts with (after whitespace), if any."""
    return _OPEN.match(text, len(text) - len(text.lstrip()))
