"""``abliterate chat``: talk to an edited model and its original side by side.

Each line you type goes to both models, each with its own multi-turn history, and their
answers stream into two columns as they are generated (one thread per model, each with a
:class:`~transformers.TextStreamer` that feeds a shared queue). When stdin or stdout is not a
terminal, the answers are printed one after the other as plain text instead, which suits pipes
and transcripts.

Commands: ``/reset`` clears both histories, ``/quit`` (or EOF, or Ctrl-C at the prompt) ends
the session; Ctrl-C while the models answer stops the answers and drops that turn.

``--steer FILE --strength S`` steers the edited model (the first column) for the whole session
with hooks (:mod:`abliterate.edit.steering`); the original answers unsteered beside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate.config import ChatConfig
from abliterate.data.chat import format_chat, format_messages
from abliterate.edit.hooks import edit_hooks
from abliterate.edit.steering import read_directions, require_targets
from abliterate.errors import ModelLoadError
from abliterate.model.anatomy import anatomy_of
from abliterate.model.loading import context_limit, load_model

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from abliterate.model.loading import LoadedModel
    from abliterate.types import Thinking

log = logging.getLogger(__name__)

COMMANDS_HELP = "/reset clears the conversation, /quit ends it"

# Control characters other than newline and tab (ESC above all) could drive the terminal; a
# model's output is data, so they are dropped before printing (rich keeps ESC in plain Text).
_CONTROL = {c: None for c in range(32) if chr(c) not in "\n\t"} | {127: None}


def printable(text: str) -> str:
    """``text`` without terminal control characters (newlines and tabs are kept)."""
    return text.translate(_CONTROL)


@dataclass
class ChatModel:
    """One side of the conversation: a loaded model, its label and its own history."""

    label: str
    loaded: LoadedModel
    system_prompt: str | None = None
    color: str = "green"
    history: list[dict[str, str]] = field(default_factory=list)
    thinking: Thinking = "off"

    def prompt_text(self, user: str) -> str:
        """The chat-formatted conversation so far plus ``user``, ready for the answer (with
        the template's thinking switch set as ``thinking`` says)."""
        messages = [*self.history, {"role": "user", "content": user}]
        return format_messages(self.loaded.tokenizer, messages, self.system_prompt, self.thinking)

    def remember(self, user: str, answer: str) -> None:
        """Append a finished exchange to the history."""
        self.history += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]


@dataclass(frozen=True)
class _Done:
    """A model finished its answer; ``text`` is the exact decoding of its new tokens."""

    text: str


def _generate(
    side: ChatModel,
    column: int,
    user: str,
    out: queue.Queue[tuple[int, Any]],
    stop: threading.Event,
    max_new_tokens: int,
    temperature: float | None,
) -> None:
    """Generate one answer, streaming text pieces into ``out``; runs in a worker thread."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

    class QueueStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                out.put((column, text))

    class StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

    try:
        tok = side.loaded.tokenizer
        enc = tok(side.prompt_text(user), return_tensors="pt", add_special_tokens=False)
        enc = enc.to(side.loaded.device)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature}
            if temperature is not None
            # Greedy decoding: clear any sampling defaults the model's generation config carries.
            else {"do_sample": False, "temperature": None}
        )
        with torch.inference_mode():
            tokens = side.loaded.model.generate(  # type: ignore[operator]
                **enc,
                max_new_tokens=max_new_tokens,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
                streamer=QueueStreamer(tok, skip_prompt=True, skip_special_tokens=True),
                stopping_criteria=StoppingCriteriaList([StopOnEvent()]),
                **sampling,
            )
        new = tokens[0, enc["input_ids"].shape[1] :]  # (new_tokens,)
        out.put((column, _Done(str(tok.decode(new, skip_special_tokens=True)).strip())))
    except BaseException as exc:  # handed to the main thread, which re-raises it
        out.put((column, exc))


def stream_answers(
    sides: Sequence[ChatModel],
    user: str,
    on_update: Callable[[list[str], list[bool]], None],
    *,
    max_new_tokens: int,
    temperature: float | None = None,
) -> list[str]:
    """Generate every side's answer to ``user`` concurrently; return the finished answers.

    ``on_update(texts, done)`` is called from this thread after every streamed piece. On any
    exception (including Ctrl-C) the generations are stopped and the exception propagates;
    histories are left unchanged either way (see :meth:`ChatModel.remember`).
    """
    out: queue.Queue[tuple[int, Any]] = queue.Queue()
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_generate,
            args=(side, i, user, out, stop, max_new_tokens, temperature),
            daemon=True,
        )
        for i, side in enumerate(sides)
    ]
    texts = [""] * len(sides)
    done = [False] * len(sides)
    for t in threads:
        t.start()
    try:
        while not all(done):
            try:
                column, item = out.get(timeout=0.1)  # a timeout keeps Ctrl-C responsive
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _Done):
                texts[column], done[column] = item.text, True
            else:
                texts[column] += item
            on_update(texts, done)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return texts


def resolve_baseline(model: str) -> tuple[str, str | None] | None:
    """The original model recorded in ``MODEL/abliteration.json`` as ``(spec, revision)``.

    The recorded local source is preferred when it still exists (the demo model's cache, a
    local directory); otherwise the hub id and revision are used. None when there is no record.
    """
    record = Path(model).expanduser() / "abliteration.json"
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{record} is not readable JSON ({exc}); pass --baseline to name the original model."
        ) from exc
    base = (data.get("base_model") or {}) if isinstance(data, dict) else None
    fields = [base.get(k) for k in ("source", "name", "revision")] if isinstance(base, dict) else []
    if len(fields) != 3 or not all(v is None or isinstance(v, str) for v in fields):
        raise ModelLoadError(
            f"{record} has no well-formed base_model entry; pass --baseline to name the "
            "original model."
        )
    source, name, revision = fields
    if source and Path(source).exists():
        return source, None
    return (name, revision) if name else None


def _model_path(model: str) -> str:
    # A run directory holds the edited model under model/ (its own config.json is the run's
    # configuration, not a model's); accept the run directory itself.
    path = Path(model).expanduser()
    if (path / "model" / "config.json").is_file():
        return str(path / "model")
    return model


def load_sides(config: ChatConfig) -> list[ChatModel]:
    """Load MODEL and its baseline (``--baseline``, else the recorded base model, if any)."""

    def load(name: str, revision: str | None) -> LoadedModel:
        return load_model(
            name,
            revision=revision,
            device=config.device,
            dtype=config.dtype,
            trust_remote_code=config.trust_remote_code,
            **config.placement(),
        )

    model = _model_path(config.model)
    # The record is read first: a malformed one fails before any model is loaded.
    baseline = (config.baseline, None) if config.baseline else resolve_baseline(model)
    edited = load(model, config.revision)
    if baseline is None:
        log.info("no --baseline given and %s records no base model: chatting with it alone", model)
        return [ChatModel(edited.name, edited, config.system_prompt, thinking=config.thinking)]
    original = load(*baseline)
    return [
        ChatModel(f"edited · {edited.name}", edited, config.system_prompt,
                  thinking=config.thinking),
        ChatModel(f"original · {original.name}", original, config.system_prompt, color="blue",
                  thinking=config.thinking),
    ]  # fmt: skip


def _columns(
    sides: Sequence[ChatModel],
    texts: Sequence[str],
    done: Sequence[bool],
    console: Console,
    tail: bool,
) -> RenderableType:
    """Panels side by side; with ``tail``, each shows only the last lines that fit the screen."""
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(expand=True, padding=(0, 1))
    for _ in sides:
        grid.add_column(ratio=1)
    width = max(10, console.width // len(sides) - 5)  # minus borders, padding and the gap
    room = max(3, console.height - 6)
    panels = []
    for side, text, finished in zip(sides, texts, done, strict=True):
        body = Text(printable(text))
        if tail:
            lines = body.wrap(console, width)
            if len(lines) > room:
                body = Text("…\n") + Text("\n").join(lines[-room + 1 :])
        panels.append(
            Panel(
                body,
                title=Text(side.label),
                title_align="left",
                border_style=side.color,
                subtitle=None if finished else "generating…",
                subtitle_align="right",
            )
        )
    grid.add_row(*panels)
    return grid


def _read(console: Console | None, prompt: str) -> str:
    # A closed stdin (``<&-``) leaves sys.stdin None, and input() then raises RuntimeError:
    # for the chat it is the end of the input, like EOF.
    if sys.stdin is None or sys.stdin.closed:
        raise EOFError
    if console is None:
        return input()
    return console.input(prompt)


def steered(config: ChatConfig, side: ChatModel) -> contextlib.AbstractContextManager[Any]:
    """``--steer``'s hooks on ``side``'s model (its label says so), or nothing."""
    if config.steer is None:
        return contextlib.nullcontext()
    steering = read_directions(config.steer, config.strength, config.steer_layers or None)
    require_targets(steering, anatomy_of(side.loaded.model))
    side.label += f" · steered ×{config.strength:g}"
    return edit_hooks(side.loaded.model, steering)


def _too_long(sides: Sequence[ChatModel], user: str) -> str | None:
    """Why the conversation plus ``user`` cannot be answered (longer than a model's context),
    or None when it can."""
    for side in sides:
        tok, model = side.loaded.tokenizer, side.loaded.model
        limit, why = context_limit(model, tok)
        n = len(tok(side.prompt_text(user), add_special_tokens=False)["input_ids"])
        if n > limit:
            return (
                f"(this message and the conversation so far are {n:,} tokens, more than the "
                f"{limit:,} {side.label} reads ({why}); it was not sent: /reset starts over)"
            )
    return None


def chat(
    config: ChatConfig,
    *,
    interactive: bool,
    console: Console | None = None,
    sides: Sequence[ChatModel] | None = None,
) -> int:
    """Run the chat loop until ``/quit``, EOF or Ctrl-C at the prompt; returns the exit status.

    Args:
        interactive: Live side-by-side columns (a terminal) or plain sequential output (pipes).
        console: The rich console to draw on (default: a new one on stdout).
        sides: Already loaded models (default: :func:`load_sides` of ``config``).
    """
    if sides is None:
        if sys.stdin is None or sys.stdin.closed:
            return 0  # nothing will ever be read: do not load the models for nothing
        sides = load_sides(config)
    with steered(config, sides[0]):
        return _chat_loop(config, interactive, console, sides)


def _chat_loop(
    config: ChatConfig, interactive: bool, console: Console | None, sides: Sequence[ChatModel]
) -> int:
    from rich.console import Console
    from rich.text import Text

    for side in sides:
        # Fail now, with the usual one-line error, if a model cannot be prompted at all.
        format_chat(side.loaded.tokenizer, ["hello"], config.system_prompt, config.thinking)
    if interactive:
        console = console or Console()
        # Line editing and history for input(); readline is missing on Windows, where plain
        # input still works.
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401
        names = " and ".join(s.label for s in sides)
        console.print(Text(f"Chatting with {names}. {COMMANDS_HELP}.", style="bold"))
    else:
        console = None

    def say(message: str) -> None:
        if console is None:
            print(message, flush=True)
        else:
            console.print(message, markup=False, highlight=False)

    while True:
        try:
            user = _read(console, "[bold cyan]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            if console is not None:
                console.print()  # leave the shell prompt on a line of its own
            return 0
        if not user:
            continue
        if not user.startswith("/") and (problem := _too_long(sides, user)) is not None:
            say(problem)
            continue
        if user.startswith("/"):
            command = user.split()[0].lower()
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                for side in sides:
                    side.history.clear()
                say("(conversation cleared)")
            else:
                say(f"unknown command {command}: {COMMANDS_HELP}.")
            continue
        try:
            if console is not None:
                answers = _live_turn(sides, user, config, console)
            else:
                answers = _plain_turn(sides, user, config)
        except KeyboardInterrupt:
            say("\n(interrupted; this turn is not kept)")
            continue
        for side, answer in zip(sides, answers, strict=True):
            side.remember(user, answer)


def _live_turn(
    sides: Sequence[ChatModel], user: str, config: ChatConfig, console: Console
) -> list[str]:
    from rich.live import Live

    texts: list[str] = [""] * len(sides)
    done = [False] * len(sides)
    # Transient: while streaming, the columns show the latest lines only; once finished, they
    # are printed in full below, so the scroll-back holds complete answers.
    with Live(
        _columns(sides, texts, done, console, tail=True),
        console=console,
        refresh_per_second=12,
        transient=True,
    ) as live:

        def update(t: list[str], d: list[bool]) -> None:
            live.update(_columns(sides, t, d, console, tail=True))

        answers = stream_answers(
            sides,
            user,
            update,
            max_new_tokens=answer_tokens(config),
            temperature=config.temperature,
        )
    console.print(_columns(sides, answers, [True] * len(sides), console, tail=False))
    return answers


def _plain_answer(side: ChatModel, user: str, config: ChatConfig) -> str:
    print(f"--- {side.label}", flush=True)
    printed = 0

    def update(texts: list[str], done: list[bool]) -> None:
        # Print streamed pieces as they come, without the answer's leading whitespace; the
        # finished (stripped) text adds nothing new, because the streamer flushes before it.
        nonlocal printed
        if not done[0]:
            visible = texts[0].lstrip()
            print(printable(visible[printed:]), end="", flush=True)
            printed = len(visible)

    (answer,) = stream_answers(
        [side],
        user,
        update,
        max_new_tokens=answer_tokens(config),
        temperature=config.temperature,
    )
    print(flush=True)
    return answer


def answer_tokens(config: ChatConfig) -> int:
    """The longest answer: ``--max-new-tokens``, plus the reasoning budget with thinking on."""
    return config.max_new_tokens + config.reasoning_budget


def _plain_turn(sides: Sequence[ChatModel], user: str, config: ChatConfig) -> list[str]:
    # One model after the other: sequential output reads well in a pipe or a transcript.
    print(f">>> {user}", flush=True)
    return [_plain_answer(side, user, config) for side in sides]
