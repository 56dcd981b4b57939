"""`codreamer.storage` (locked JSONL appends and reads, atomic files) and the run finder of `codreamer.runs`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from codreamer.paths import UnsafePathError
from codreamer.runs import FAILURES_FILE, RUN_FILE, find_run_in, find_runs
from codreamer.storage import (
    JsonlLineError,
    append_jsonl,
    iter_jsonl,
    read_jsonl,
    remove_stale_temporaries,
    write_atomic,
    write_bytes_atomic,
    write_json_atomic,
)

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- appends

APPENDER = """
import sys, time
from pathlib import Path
from codreamer.storage import append_jsonl

path, worker, count, go = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
deadline = time.monotonic() + 30
while not go.exists() and time.monotonic() < deadline:  # start together with the others
    time.sleep(0.001)
for i in range(count):
    # lines far over PIPE_BUF, and batches of two: a batch must land as one block
    pad = str(worker) * (70_000 + 997 * worker + i)
    append_jsonl(path, [{"worker": worker, "i": i, "half": 0, "pad": pad}, {"worker": worker, "i": i, "half": 1}],
                 fsync=worker % 2 == 0)
"""


def test_concurrent_appends_from_processes_lose_no_line_and_interleave_no_bytes(tmp_path: Path) -> None:
    path, go, workers, count = tmp_path / "deep" / "log.jsonl", tmp_path / "go", 4, 25
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(path), str(w), str(count), str(go)], cwd=REPO)
        for w in range(workers)
    ]
    time.sleep(0.3)  # let the interpreters start and import
    go.touch()
    assert [p.wait(timeout=60) for p in procs] == [0] * workers
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == workers * count * 2
    records, skipped = read_jsonl(path)
    assert skipped == 0 and len(records) == workers * count * 2
    for first, second in zip(records[::2], records[1::2], strict=True):  # each batch is contiguous
        assert (first["worker"], first["i"], first["half"]) == (second["worker"], second["i"], 0)
        assert second["half"] == 1 and first["pad"] == str(first["worker"]) * (
            70_000 + 997 * first["worker"] + first["i"]
        )
    for worker in range(workers):
        assert [r["i"] for r in records[::2] if r["worker"] == worker] == list(range(count))


def test_an_append_after_a_torn_last_line_starts_on_its_own_line(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    append_jsonl(path, [{"n": 1}])
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"n": 2, "cut')  # a writer crashed mid-append
    assert read_jsonl(path) == ([{"n": 1}], 1)  # the torn tail is tolerated: skipped and counted
    append_jsonl(path, [{"n": 3}], fsync=False)
    assert path.read_text(encoding="utf-8").split("\n") == ['{"n": 1}', '{"n": 2, "cut', '{"n": 3}', ""]
    assert read_jsonl(path) == ([{"n": 1}, {"n": 3}], 1)


def test_records_are_strict_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    append_jsonl(path, [{"x": math.nan, "y": [math.inf, 1.5], "p": Path("a/b"), "s": "line\u2028break"}])
    raw = path.read_text(encoding="utf-8")
    assert raw.count("\n") == 1 and "NaN" not in raw and "Infinity" not in raw
    assert read_jsonl(path) == ([{"x": None, "y": [None, 1.5], "p": "a/b", "s": "line\u2028break"}], 0)
    append_jsonl(path, [])  # nothing to write: the file is not touched
    assert path.read_text(encoding="utf-8") == raw


# --------------------------------------------------------------------------- reads


def test_a_bad_middle_line_is_skipped_or_reported_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"n": 1}\n\n   \n{"n": 2,,}\n{"n": 3}\n', encoding="utf-8")
    assert read_jsonl(path) == ([{"n": 1}, {"n": 3}], 1)  # blank lines are not records, not errors
    with pytest.raises(JsonlLineError) as caught:
        read_jsonl(path, strict=True)
    assert str(caught.value).startswith(f"{path}:4: invalid JSON: ")
    assert caught.value.line == 4 and caught.value.column is not None and isinstance(caught.value, ValueError)


def test_strict_iteration_is_lazy_so_the_first_bad_line_in_file_order_is_reported(tmp_path: Path) -> None:
    text = '{"n": 1}\n[1, 2]\nnot json\n'
    got = iter_jsonl(text, tmp_path / "x.jsonl", strict=True)
    assert next(got) == (1, {"n": 1}) and next(got) == (2, [1, 2])  # the caller may raise on line 2 first
    with pytest.raises(JsonlLineError, match=r"x\.jsonl:3: "):
        next(got)
    bad: list[int] = []
    assert list(iter_jsonl(text, tmp_path / "x.jsonl", bad_lines=bad)) == [(1, {"n": 1}), (2, [1, 2])]
    assert bad == [3]


def test_split_on_newline_only_and_crlf_and_deep_nesting(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"s": "a\xe2\x80\xa8b"}\r\n' + b"[" * 100_000 + b"\n")  # a raw U+2028 inside a string
    assert read_jsonl(path) == ([{"s": "a\u2028b"}], 1)
    with pytest.raises(JsonlLineError, match=r"x\.jsonl:2: invalid JSON: nested too deeply"):
        read_jsonl(path, strict=True)


def test_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": "\xff"}\n')
    with pytest.raises(UnicodeDecodeError):
        read_jsonl(path)
    assert read_jsonl(path, encoding_errors="replace") == ([{"n": 1}, {"n": "\ufffd"}], 0)


def test_hostile_paths_for_reads_and_appends(tmp_path: Path) -> None:
    assert read_jsonl(tmp_path / "missing.jsonl") == ([], 0)
    (tmp_path / "a-folder.jsonl").mkdir()
    assert read_jsonl(tmp_path / "a-folder.jsonl") == ([], 0)  # a folder is no file: nothing read
    with pytest.raises(IsADirectoryError):
        append_jsonl(tmp_path / "a-folder.jsonl", [{"n": 1}])
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):  # a file where a parent folder should be
        append_jsonl(tmp_path / "file" / "log.jsonl", [{"n": 1}])


# --------------------------------------------------------------------------- atomic writes


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_json_write_round_trip_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "run.json"
    assert write_json_atomic(path, {"a": 1, "when": Path("x")}) == path
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 1, "when": "x"}
    assert path.stat().st_mode & 0o777 == 0o600 and _listing(path.parent) == ["run.json"]


def test_a_failed_serialisation_leaves_the_old_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_json_atomic(path, {"version": 1})
    circular: dict[str, object] = {"version": 2}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular"):
        write_json_atomic(path, circular)
    assert json.loads(path.read_text(encoding="utf-8")) == {"version": 1}
    assert _listing(tmp_path) == ["state.json"]


def test_a_write_that_fails_midway_leaves_the_old_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "report.md"
    write_bytes_atomic(path, b"old report")

    def half_then_fail(temporary: Path) -> None:
        temporary.write_bytes(b"new rep")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(path, half_then_fail)
    assert path.read_bytes() == b"old report" and _listing(tmp_path) == ["report.md"]


def test_an_interrupted_rename_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "index.json"
    write_bytes_atomic(path, b"old")

    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and _listing(tmp_path) == ["index.json"]


def test_an_atomic_write_replaces_a_symlink_never_its_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "run.json").symlink_to(victim)
    write_json_atomic(runs / "run.json", {"ok": True})
    assert victim.read_text() == "precious"
    assert not (runs / "run.json").is_symlink() and json.loads((runs / "run.json").read_text()) == {"ok": True}


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "log.index.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".{path.name}.{dead.stdout.strip()}.0badf00d.tmp"
    mine = tmp_path / f".{path.name}.{os.getpid()}.feedf00d.tmp"
    other = tmp_path / ".other.json.1.feedf00d.tmp"
    for temporary in (stale, mine, other):
        temporary.write_text("{")
    assert remove_stale_temporaries(path) == [stale]
    assert not stale.exists() and mine.exists() and other.exists()


# --------------------------------------------------------------------------- the run finder


def _run(root: Path, name: str, created_at: str | None = None, *, failures_only: bool = False) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    if failures_only:
        (directory / FAILURES_FILE).write_text("")
    else:
        write_json_atomic(directory / RUN_FILE, {"run_id": name} | ({"created_at": created_at} if created_at else {}))
    return directory


def test_runs_are_listed_oldest_first_by_created_at_then_mtime_then_name(tmp_path: Path) -> None:
    root = tmp_path / "models"
    _run(root, "b-late", "2026-01-03T00:00:00+00:00")
    _run(root, "a-early", "2026-01-01T00:00:00+00:00")
    _run(root, "c-middle", "2026-01-02T00:00:00+00:00")
    legacy = _run(root, "z-no-date")
    only_failures = _run(root, "y-failures", failures_only=True)
    os.utime(legacy, (1, 1))
    os.utime(only_failures, (2, 2))
    (root / "_cross_run").mkdir()  # the analysis's output folder: not a run
    (root / ".hidden").mkdir()
    (root / "empty").mkdir()  # no run.json, no failures: not a run
    assert [p.name for p in find_runs(root)] == ["z-no-date", "y-failures", "a-early", "c-middle", "b-late"]
    assert find_runs(tmp_path / "nowhere") == []


def test_the_run_finder_refuses_hostile_ids_and_links_out(tmp_path: Path) -> None:
    root = tmp_path / "models"
    _run(root, "run-1", "2026-01-01T00:00:00+00:00")
    victim = _run(tmp_path / "elsewhere", "victim", "2026-01-02T00:00:00+00:00")
    (root / "link").symlink_to(victim, target_is_directory=True)
    assert [p.name for p in find_runs(root)] == ["run-1"]
    assert find_run_in(root, "run-1") == root / "run-1"
    with pytest.raises(UnsafePathError, match="outside"):
        find_run_in(root, "link")
    for hostile in ("../elsewhere/victim", "..", str(victim), ".hidden"):
        with pytest.raises(UnsafePathError, match="not allowed"):
            find_run_in(root, hostile)
    with pytest.raises(FileNotFoundError, match=r"no run 'run-2' .*recent runs: run-1"):
        find_run_in(root, "run-2")


def test_secret_values_never_reach_a_json_file_by_accident(tmp_path: Path) -> None:
    """`default=str` on a SecretStr writes its mask, never the value."""
    path = tmp_path / "run.json"
    write_json_atomic(path, {"key": SecretStr("sk-live-123")})
    append_jsonl(tmp_path / "log.jsonl", [{"key": SecretStr("sk-live-123")}])
    assert "sk-live-123" not in path.read_text() + (tmp_path / "log.jsonl").read_text()


def test_a_run_open_in_one_place_is_refused_in_another_and_free_after(tmp_path: Path) -> None:
    from codreamer.runs import RunBusyError, run_lock

    with run_lock(tmp_path, "r1"):
        assert (tmp_path / "run.lock").read_text() == str(os.getpid())
        busy = rf"run 'r1' is open in another process \(pid {os.getpid()}\)"
        with pytest.raises(RunBusyError, match=busy), run_lock(tmp_path, "r1"):
            pass
    with run_lock(tmp_path, "r1"):  # released on exit (and by the kernel when a process dies)
        pass
