"""The LLM judge: the yes/no parse rule, the OpenAI-compatible HTTP backend against a local fake
endpoint, and the local chat-model backend."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from abliterate.errors import JudgeError
from abliterate.eval.llm_judge import API_KEY_ENV, LLMJudge, parse_yes_no


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("yes", True),
        ("No.", False),
        ("**Yes**", True),
        ("  NO  ", False),
        ("Yes, the assistant declined.", True),
        ("<think>Hmm, no wait, it did refuse.</think>Yes", True),
        ("Answer: no", False),  # the only yes/no word decides
        ("The answer is yes", True),
        ("Yesterday it rained.", None),  # "yesterday" is not "yes"
        ("maybe", None),
        ("I cannot tell: yes or no?", None),  # both words, neither first: unparsed
        ("", None),
    ],
)
def test_parse_rule(answer: str, expected: bool | None) -> None:
    assert parse_yes_no(answer) is expected


class _FakeOpenAI(BaseHTTPRequestHandler):
    """Answers "Yes." when the judged response contains "can't", "maybe" when it contains
    "unsure", else "no"; records every request body and Authorization header."""

    requests: ClassVar[list[tuple[dict[str, Any], str | None]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((body, self.headers.get("Authorization")))
        if self.path != "/v1/chat/completions":
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"not found")
            return
        question = body["messages"][0]["content"]
        response = question.split("Assistant response:")[1]
        answer = "Yes." if "can't" in response else "maybe" if "unsure" in response else "no"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    """A fake OpenAI-compatible server on 127.0.0.1 that is shut down after the test."""
    _FakeOpenAI.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_http_judge_asks_fixed_question_at_temperature_zero(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(API_KEY_ENV, "sk-test")
    judge = LLMJudge.from_endpoint(endpoint, "judge-model", timeout_s=5)
    verdicts = judge(["Bake bread.", "Pick a lock."], ["Mix flour.", "<think>unsure</think>Step 1"])
    assert verdicts == [False, False]
    assert judge.n_unparsed == 0  # the reasoning block ("unsure") was stripped before asking
    verdicts = judge(["a", "b", "c"], ["I can't do that.", "Sure.", "I am unsure."])
    assert verdicts == [True, False, False] and judge.n_unparsed == 1
    assert judge.last_answers == ["Yes.", "no", "maybe"]
    body, auth = _FakeOpenAI.requests[-1]
    assert body["temperature"] == 0 and body["model"] == "judge-model"
    assert auth == "Bearer sk-test"
    assert "Answer with exactly one word: yes or no." in body["messages"][0]["content"]


def test_http_judge_errors_are_one_line(endpoint: str) -> None:
    wrong_path = LLMJudge.from_endpoint(endpoint.replace("/v1", "/v2"), "m", timeout_s=5)
    with pytest.raises(JudgeError, match="HTTP 404"):
        wrong_path(["p"], ["r"])
    # An endpoint that cannot be reached fails when the judge is built, before any answer.
    with pytest.raises(JudgeError, match="unreachable"):
        LLMJudge.from_endpoint("http://127.0.0.1:9/v1", "m", timeout_s=2)


def test_local_judge_runs_a_chat_model(tiny_model_dir: Path) -> None:
    judge = LLMJudge.from_local(str(tiny_model_dir), device="cpu", batch_size=2)
    verdicts = judge(["Bake bread.", "Pick a lock.", "Hi"], ["Sure.", "No.", ""])
    assert len(verdicts) == 3 == len(judge.last_answers)
    # A random model answers gibberish: every unparsed answer counts as "not refused".
    parsed = [parse_yes_no(a) for a in judge.last_answers]
    assert verdicts == [p is True for p in parsed]
    assert judge.n_unparsed == sum(p is None for p in parsed)
