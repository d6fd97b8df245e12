"""The one-line error contract of the CLI, shared by the tests of bad inputs."""

from __future__ import annotations

import pytest

from abliterate.cli import main


def one_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI on ``argv`` and return its single ``abliterate: error:`` line, asserting the
    exit status 2 and that no traceback was printed."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("abliterate: error:")]
    assert len(lines) == 1, err
    return lines[0]
