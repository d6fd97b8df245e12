"""Chat templates with a reasoning switch, and a recording judge, shared by the reasoning tests
(tests/test_reasoning.py, tests/test_compose_thinking.py)."""

from __future__ import annotations

from collections.abc import Sequence

from abliterate.eval.judges import MarkerJudge

_TURNS = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
# Qwen3's switch (the brief's form): thinking unless enable_thinking is passed as false.
QWEN3_STYLE = (
    _TURNS + "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and "
    "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# DeepSeek-V3.1's switch: `thinking` opens the block in the prompt; off closes it.
V31_STYLE = (
    _TURNS + "{% if add_generation_prompt %}<|assistant|>{% if thinking %}<think>{% else %}"
    "</think>{% endif %}{% endif %}"
)
# DeepSeek-R1: no switch; the generation prompt always opens the block.
R1_STYLE = _TURNS + "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"


class Recorder:
    """A judge that records what it was shown and refuses by markers."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
        self.seen += list(responses)
        return MarkerJudge()(prompts, responses)
