"""Output safety: ``--out`` never replaces an input or a directory that is not a run, paths that
cannot be written fail before any model is loaded, concurrent runs cannot replace each other,
folders of killed runs are swept, and every file is written atomically with normal modes."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_errors import one_error

from abliterate.commands import rundir
from abliterate.commands.rundir import (
    RUN_MARKER,
    check_output_dir,
    run_directory,
    run_record,
    sweep_stale,
)
from abliterate.errors import OutputDirError
from abliterate.files import write_json, write_text


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def _run(tmp: Path, out: Path, overwrite: bool = False, command: str = "run") -> None:
    with run_directory(out, overwrite, command) as work:
        write_json(work / "result.json", {"from": str(tmp)})


# --- inputs are never outputs ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["model", "parent of model", "via dot-dot"])
def test_out_that_is_or_contains_the_model_is_refused_even_with_overwrite(
    tmp_path: Path, tiny_model_dir: Path, where: str, capsys: pytest.CaptureFixture[str],
    no_model_load: list[str],
) -> None:  # fmt: skip
    out = {
        "model": tiny_model_dir,
        "parent of model": tiny_model_dir.parent,
        "via dot-dot": tiny_model_dir.parent / "x" / ".." / tiny_model_dir.name,
    }[where]
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    for command in (["run", "--model", str(tiny_model_dir)], ["evaluate", str(tiny_model_dir)]):
        msg = one_error([*command, "--out", str(out), "--overwrite"], capsys)
        assert "input" in msg and str(tiny_model_dir) in msg
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before
    assert no_model_load == []


def test_out_containing_a_prompt_file_direction_or_baseline_is_refused(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str],
    no_model_load: list[str],
) -> None:  # fmt: skip
    data = tmp_path / "data"
    data.mkdir()
    (data / "harm.txt").write_text("Pick a lock.\n")
    base = ["run", "--model", str(tiny_model_dir), "--overwrite"]
    msg = one_error([*base, "--out", str(data), "--harmful", str(data / "harm.txt")], capsys)
    assert "contains the input" in msg and "harm.txt" in msg
    (data / "d.safetensors").write_bytes(b"x")
    (data / "d.json").write_text("{}")
    msg = one_error([*base, "--out", str(data), "--direction", str(data / "d.safetensors")],
                     capsys)  # fmt: skip
    assert "d.safetensors" in msg
    msg = one_error(["evaluate", "demo", "--baseline", str(tiny_model_dir), "--out",
                      str(tiny_model_dir.parent), "--overwrite"], capsys)  # fmt: skip
    assert str(tiny_model_dir) in msg
    msg = one_error(["evaluate", "demo", "--judge", f"classifier:{tiny_model_dir}",
                      "--out", str(tiny_model_dir)], capsys)  # fmt: skip
    assert str(tiny_model_dir) in msg
    assert (data / "harm.txt").read_text() == "Pick a lock.\n"
    assert no_model_load == []


def test_extra_inputs_such_as_the_config_file_are_protected(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "run.toml"
    config.parent.mkdir()
    config.write_text("n_train = 8\n")
    with pytest.raises(OutputDirError, match="contains the input"):
        check_output_dir(config.parent, True, [None, "hf:org/name", "org/name", config])
    check_output_dir(tmp_path / "elsewhere", False, [config])


def test_a_sqlite_study_inside_out_is_an_input(tmp_path: Path) -> None:
    from abliterate.commands.run import run_inputs
    from abliterate.config import RunConfig

    out = tmp_path / "out"
    out.mkdir()
    (out / "study.db").write_bytes(b"")
    config = RunConfig(out=out, optimize=True, storage=f"sqlite:///{out / 'study.db'}")
    with pytest.raises(OutputDirError, match=r"study\.db"):
        check_output_dir(out, True, run_inputs(config))


# --- --overwrite replaces runs only -----------------------------------------------------------


def test_overwrite_refuses_a_directory_that_is_not_a_run(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str],
    no_model_load: list[str],
) -> None:  # fmt: skip
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    argv = ["run", "--model", str(tiny_model_dir), "--out", str(out), "--overwrite"]
    msg = one_error(argv, capsys)
    assert "not a run directory" in msg
    assert (out / "holiday.jpg").read_bytes() == b"\xff\xd8"
    assert no_model_load == []


def test_overwrite_replaces_a_run_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    _run(tmp_path / "first", out, command="evaluate")
    record = run_record(out)
    assert record is not None and record["command"] == "evaluate"
    assert (out / RUN_MARKER).is_file()
    with caplog.at_level("INFO", logger="abliterate"):
        check_output_dir(out, True)
        _run(tmp_path / "second", out, overwrite=True)
    assert json.loads((out / "result.json").read_text())["from"].endswith("second")
    replaced = [r.getMessage() for r in caplog.records if "replac" in r.getMessage()]
    assert any("abliterate evaluate" in m and str(out) in m for m in replaced), replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .old-* left behind


def test_runs_of_older_versions_are_recognised_by_their_record(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for name in ("environment.json", "config.json"):
        (old / name).write_text("{}")
    assert run_record(old) is not None
    check_output_dir(old, True)
    (old / "config.json").unlink()
    assert run_record(old) is None


# --- paths that cannot be written fail first --------------------------------------------------


@pytest.mark.parametrize("form", [".", "..", "sub/.."])
def test_dot_and_dot_dot_fail_before_the_model_loads(
    tmp_path: Path, tiny_model_dir: Path, form: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], no_model_load: list[str],
) -> None:  # fmt: skip
    work = tmp_path / "work" / "here"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    msg = one_error(["run", "--model", str(tiny_model_dir), "--out", form], capsys)
    assert "'.' or '..'" in msg
    assert no_model_load == []
    assert not [p for p in work.parent.rglob(".*") if "partial" in p.name]


def test_unwritable_paths_fail_before_the_model_loads(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str],
    no_model_load: list[str],
) -> None:  # fmt: skip
    (tmp_path / "afile").write_text("x")
    cases = {
        str(tmp_path / "afile" / "out"): "not a directory",
        "/proc/abliterate-test/out": "cannot create",
        str(tmp_path / ("n" * 250)): "too long",
        str(tmp_path / ("n" * 300) / "out"): "cannot create",
    }
    for out, message in cases.items():
        msg = one_error(["run", "--model", str(tiny_model_dir), "--out", out], capsys)
        assert message in msg, msg
    assert no_model_load == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "tiny-qwen2"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_fails_before_work(tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(OutputDirError, match="cannot create"):
            check_output_dir(parent / "out", False)
    finally:
        parent.chmod(0o755)


def test_a_parent_that_refuses_writes_fails_before_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a read-only parent does for a user who is not root (root may write anywhere).
    parent = tmp_path / "ro"
    parent.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path: Any, *args: Any) -> None:
        if Path(path).parent == parent:
            raise PermissionError(13, "Permission denied", str(path))
        real_mkdir(path, *args)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(OutputDirError, match=r"cannot create .*Permission denied"):
        check_output_dir(parent / "out", False)


def test_probing_a_path_leaves_nothing_behind(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "a" / "b" / "out", False)
    assert list(tmp_path.iterdir()) == []


# --- the final rename -------------------------------------------------------------------------


def test_a_run_finishing_second_never_replaces_the_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    check_output_dir(out, False)  # both runs pass the check at their start ...
    refused = pytest.raises(OutputDirError, match="was created while this run worked")
    with refused as exc, run_directory(out, False) as work:
        _run(tmp_path / "first", out)  # ... and the other one finishes first
        write_json(work / "result.json", {"from": "second"})
    assert json.loads((out / "result.json").read_text())["from"].endswith("first")
    kept = tmp_path / "out-2"
    assert str(kept) in str(exc.value)
    assert json.loads((kept / "result.json").read_text())["from"] == "second"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_at_rename_time_still_spares_a_directory_that_is_not_a_run(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    with pytest.raises(OutputDirError, match="not a run directory"), run_directory(out, True):
        out.mkdir()
        (out / "precious.txt").write_text("keep")
    assert (out / "precious.txt").read_text() == "keep"
    assert (tmp_path / "out-2" / RUN_MARKER).is_file()


def test_a_failed_run_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="boom"), run_directory(out, False):
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


# --- folders of killed runs -------------------------------------------------------------------


def test_folders_of_dead_processes_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    host, dead = socket.gethostname(), _dead_pid()
    out = tmp_path / "out"
    out.mkdir()  # an .old-* folder is restored only when OUT is missing (next test)
    stale = [tmp_path / f".out.partial-{host}-{dead}-ab12cd34",
             tmp_path / f".out.old-{host}-{dead}-ab12cd34"]  # fmt: skip
    kept = [
        tmp_path / f".out.partial-{host}-{os.getpid()}-ab12cd34",  # alive: this process
        tmp_path / f".out.partial-elsewhere.example-{dead}-ab12cd34",  # another host
        tmp_path / ".out.partial-k2j4l5m6",  # an older version's name: owner unknown
        tmp_path / f".other.partial-{host}-{dead}-ab12cd34",  # another --out
    ]
    for path in stale + kept:
        (path / "model").mkdir(parents=True)
        (path / "model" / "model.safetensors").write_bytes(b"big")
    assert sorted(sweep_stale(out)) == sorted(stale)
    assert all(not p.exists() for p in stale) and all(p.exists() for p in kept)


def test_a_run_killed_between_the_renames_is_restored_not_swept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{socket.gethostname()}-{_dead_pid()}-ab12cd34"
    old.mkdir()
    (old / "report.json").write_text("{}")
    assert sweep_stale(out) == []
    assert (out / "report.json").is_file() and not old.exists()


def test_kill_9_leaves_a_folder_that_the_next_run_sweeps(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from abliterate.commands.rundir import run_directory\n"
        f"with run_directory(Path({str(out)!r}), False) as work:\n"
        "    (work / 'x').write_text('x'); print('ready', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(left) == 1 and str(proc.pid) in left[0].name
    _run(tmp_path, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- modes and atomic writes ------------------------------------------------------------------


def test_run_directory_and_files_get_the_modes_the_umask_gives(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        _run(tmp_path, out)
        write_text(tmp_path / "note.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "result.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "note.txt").stat().st_mode) == 0o644


def test_an_interrupted_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "report.json"
    write_json(target, {"v": 1})

    def crash(*_args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_exported_record_is_written_through_the_atomic_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_model: Any, tokenizer: Any
) -> None:
    from abliterate.edit import export

    written: list[Path] = []
    monkeypatch.setattr(export, "write_json", lambda path, data: written.append(path))
    export.save_model(make_model("qwen2"), tokenizer, tmp_path / "model", {"edit": {}})
    assert written == [tmp_path / "model" / "abliteration.json"]


def test_temporary_names_fit_the_overhead_the_name_check_assumes(tmp_path: Path) -> None:
    out = tmp_path / "x"
    name = rundir._temporary_name(out, "partial").name
    tag = rundir.owner_tag()
    assert len(name) == len("x") + len(tag) + rundir._TMP_OVERHEAD
