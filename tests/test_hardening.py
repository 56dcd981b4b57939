"""A careless or hostile user: run ids that try to escape the runs folder, secrets on the
command line, bad settings and corrupt files. Every case: one clear line, nothing lost.

Everything goes through the entry-point functions (`learn_loop_main`, `train_main`,
`codreamer_main`) as the console scripts call them; none of these tests loads the model.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from loguru import logger

from codreamer.checkpoints import prune_checkpoints
from codreamer.cli import codreamer_main, learn_loop_main, train_main
from codreamer.config import Settings
from codreamer.errors import UsageError
from codreamer.log import configure_logging
from codreamer.paths import SAFE_NAME_PATTERN, UnsafePathError, check_name
from codreamer.runs import list_runs, run_dir

ENTRIES: list[Callable[[list[str]], int]] = [learn_loop_main, train_main]
HOSTILE_IDS = ["../../x", "../victim", "a/b", "..", ".", "", "x" * 101, "-rf", ".hidden", "a\\b", "run id", "ü"]


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No .env or CODREAMER_* / W&B variables of the machine; loguru back to a plain sink after."""
    for name in list(os.environ):
        if name.startswith(("CODREAMER_", "WANDB_", "WEAVE_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield
    logger.remove()
    logger.add(sys.stderr, diagnose=False)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A folder outside the runs folder that looks like a run, with a file that must survive."""
    folder = tmp_path / "victim"
    (folder / "checkpoints" / "0001").mkdir(parents=True)
    (folder / "checkpoints" / "0001" / "weights.bin").write_bytes(b"precious")
    (folder / "run.json").write_text(json.dumps({"run_id": "victim", "kind": "learn-loop", "status": "finished"}))
    (folder / "iterations.jsonl").write_text(
        json.dumps({"iteration": 1, "step": 1, "train/reward_mean": 0.5, "train/reward_std": 0.1}) + "\n"
    )
    return folder


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"") for p in sorted(root.rglob("*"))}


def _one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: ")
    return lines[0]


# --------------------------------------------------------------------------- run ids


@pytest.mark.parametrize("run_id", HOSTILE_IDS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_hostile_run_ids_are_refused_before_anything_is_written(
    entry: Callable[[list[str]], int], run_id: str, tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(tmp_path)
    runs = tmp_path / "runs" / "deeper"
    assert entry(["--runs-dir", str(runs), f"--run-id={run_id}", "--no-wandb"]) == 2
    line = _one_error_line(capsys.readouterr().err, entry.__name__.removesuffix("_main").replace("_", "-"))
    assert "run_id" in line and "CODREAMER_RUN_ID" in line and "letters, digits" in line
    assert _snapshot(tmp_path) == before  # nothing written anywhere, the victim untouched


@pytest.mark.parametrize("entry", ENTRIES)
def test_an_absolute_run_id_is_refused(
    entry: Callable[[list[str]], int], tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(tmp_path)
    assert entry(["--runs-dir", str(tmp_path / "runs"), "--run-id", str(victim), "--no-wandb"]) == 2
    assert "not allowed" in _one_error_line(
        capsys.readouterr().err, entry.__name__.removesuffix("_main").replace("_", "-")
    )
    assert (
        _snapshot(tmp_path) == before and (victim / "checkpoints" / "0001" / "weights.bin").read_bytes() == b"precious"
    )


@pytest.mark.parametrize("project", ["../..", "/abs", "a/b", "..", ""])
def test_hostile_project_names_are_refused(
    project: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _snapshot(tmp_path)
    assert learn_loop_main(["--runs-dir", str(tmp_path / "runs"), f"--project={project}", "--no-wandb"]) == 2
    assert "project name" in _one_error_line(capsys.readouterr().err, "learn-loop")
    monkeypatch.setenv("CODREAMER_PROJECT", project)
    assert codreamer_main(["--runs-dir", str(tmp_path / "runs"), "runs"]) == 2
    assert "CODREAMER_PROJECT" in _one_error_line(capsys.readouterr().err, "codreamer")
    assert _snapshot(tmp_path) == before


def test_a_run_id_from_the_environment_is_checked_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODREAMER_RUN_ID", "../../x")
    assert train_main(["--runs-dir", str(tmp_path / "runs"), "--no-wandb"]) == 2
    assert "'../../x' is not allowed" in _one_error_line(capsys.readouterr().err, "train")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_the_safe_name_pattern() -> None:
    assert SAFE_NAME_PATTERN == r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
    for good in ["run-20250101-120000", "a", "A.b_c-1", "x" * 100, "1..2"]:
        assert check_name(good) == good and Settings(run_id=good, project=good).run_id == good
    for bad in HOSTILE_IDS:
        with pytest.raises(UnsafePathError):
            check_name(bad)
    assert issubclass(UnsafePathError, UsageError) and issubclass(UnsafePathError, ValueError)


@pytest.mark.parametrize("verb", ["show", "report", "trace", "analyze"])
@pytest.mark.parametrize("run_id", ["../../../victim", "../victim", "..", str(Path("/tmp")), "a/b"])
def test_codreamer_verbs_refuse_hostile_run_ids(
    verb: str, run_id: str, tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "runs" / "codreamer" / "models").mkdir(parents=True)
    before = _snapshot(tmp_path)
    assert codreamer_main(["--runs-dir", str(tmp_path / "runs"), verb, run_id]) == 2
    err = capsys.readouterr().err
    assert "not allowed" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(tmp_path) == before  # no report.md, no failure report in the victim


def test_a_run_directory_that_links_out_of_the_runs_folder_is_never_used(
    tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "runs" / "codreamer" / "models"
    models.mkdir(parents=True)
    (models / "link").symlink_to(victim, target_is_directory=True)
    before = _snapshot(victim)
    settings = Settings(runs_dir=tmp_path / "runs", _env_file=None)  # type: ignore[call-arg]
    assert list_runs(settings) == []
    with pytest.raises(UnsafePathError, match="outside"):
        run_dir(settings, "link")
    assert codreamer_main(["--runs-dir", str(tmp_path / "runs"), "report", "link"]) == 2
    assert "outside" in _one_error_line(capsys.readouterr().err, "codreamer")
    assert learn_loop_main(["--runs-dir", str(tmp_path / "runs"), "--run-id", "link", "--no-wandb"]) == 2
    assert "outside" in _one_error_line(capsys.readouterr().err, "learn-loop")
    assert codreamer_main(["--runs-dir", str(tmp_path / "runs"), "runs"]) == 0
    assert "victim" not in capsys.readouterr().out
    assert _snapshot(victim) == before


def test_checkpoint_pruning_never_follows_a_link_out(tmp_path: Path, victim: Path) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3):
        (checkpoints / f"{step:04d}").mkdir(parents=True)
    (checkpoints / "0002").rmdir()
    (checkpoints / "0002").symlink_to(victim / "checkpoints" / "0001", target_is_directory=True)
    assert prune_checkpoints(checkpoints, {}, keep_last=1, keep_best=False) == [1]
    assert (victim / "checkpoints" / "0001" / "weights.bin").read_bytes() == b"precious"


# --------------------------------------------------------------------------- secrets

SECRET_SPELLINGS = [
    (["--wandb-api-key", "sekrit-value-1"], "WANDB_API_KEY"),
    (["--wandb_api_key=sekrit-value-1"], "WANDB_API_KEY"),
    (["--WANDB-API-KEY", "sekrit-value-1"], "WANDB_API_KEY"),
    (["--judge-api-key", "sekrit-value-1"], "CODREAMER_JUDGE_API_KEY"),
    (["--judge_api_key", "sekrit-value-1"], "CODREAMER_JUDGE_API_KEY"),
    (["--events-secret=sekrit-value-1"], "CODREAMER_EVENTS_SECRET"),
    (["--events_secret", "sekrit-value-1"], "CODREAMER_EVENTS_SECRET"),
]


@pytest.mark.parametrize(("flags", "env"), SECRET_SPELLINGS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_secrets_on_the_command_line_are_refused(
    entry: Callable[[list[str]], int], flags: list[str], env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert entry(["--runs-dir", str(tmp_path / "runs"), *flags, "--no-wandb"]) == 2
    err = capsys.readouterr().err
    line = _one_error_line(err, entry.__name__.removesuffix("_main").replace("_", "-"))
    assert "not accepted on the command line" in line and f"set {env} in the environment" in line and ".env" in line
    assert "sekrit-value-1" not in err
    assert not (tmp_path / "runs").exists()


def test_secrets_still_come_from_the_environment_and_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("CODREAMER_JUDGE_API_KEY=from-dotenv\n")
    monkeypatch.setenv("WANDB_API_KEY", "from-env")
    settings = Settings()
    assert settings.judge_api_key is not None and settings.judge_api_key.get_secret_value() == "from-dotenv"
    assert settings.wandb_api_key is not None and settings.wandb_api_key.get_secret_value() == "from-env"


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("entry", [*ENTRIES, codreamer_main])
def test_a_bad_setting_in_the_environment_is_one_line_under_every_entry_point(
    entry: Callable[[list[str]], int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("CODREAMER_GROUP_SIZE", "abc")
    argv = (
        ["--runs-dir", str(tmp_path / "runs"), "runs"]
        if entry is codreamer_main
        else ["--runs-dir", str(tmp_path / "runs")]
    )
    assert entry(argv) == 2
    prog = "codreamer" if entry is codreamer_main else entry.__name__.removesuffix("_main").replace("_", "-")
    line = _one_error_line(capsys.readouterr().err, prog)
    assert "group_size (CODREAMER_GROUP_SIZE / --group-size)" in line and "'abc'" in line and "valid integer" in line
    assert not (tmp_path / "runs").exists()


def test_a_bad_line_in_dotenv_and_bad_flags_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / ".env").write_text("CODREAMER_EVAL_SAMPLES=0\n")
    assert learn_loop_main([]) == 2
    assert "eval_samples (CODREAMER_EVAL_SAMPLES / --eval-samples)" in _one_error_line(
        capsys.readouterr().err, "learn-loop"
    )
    (tmp_path / ".env").unlink()
    assert learn_loop_main(["--no-such-flag", "1"]) == 2
    assert "unrecognized arguments: --no-such-flag 1" in _one_error_line(capsys.readouterr().err, "learn-loop")
    assert train_main(["--group-size"]) == 2
    assert "--group-size: expected one argument" in _one_error_line(capsys.readouterr().err, "train")


def test_the_local_backend_on_a_cpu_machine_is_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (
        learn_loop_main(
            ["--runs-dir", str(tmp_path / "runs"), "--backend", "local", "--base-model", "Qwen/Qwen2.5-0.5B"]
        )
        == 2
    )
    line = _one_error_line(capsys.readouterr().err, "learn-loop")
    assert "needs a CUDA GPU" in line and "--backend embedded" in line
    assert not (tmp_path / "runs").exists()
    assert train_main(["--runs-dir", str(tmp_path / "runs"), "--backend", "serverless"]) == 2
    assert "WANDB_API_KEY" in _one_error_line(capsys.readouterr().err, "train")
    # a GPU, but not ART's GPU extra (unsloth): said up front, not deep inside ART's first step
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "unsloth" else real_find_spec(name, *a)
    )
    assert learn_loop_main(["--runs-dir", str(tmp_path / "runs"), "--backend", "local"]) == 2
    assert "unsloth" in _one_error_line(capsys.readouterr().err, "learn-loop")
    assert not (tmp_path / "runs").exists()


def test_codreamer_show_of_a_corrupt_run_file_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "runs" / "codreamer" / "models" / "r1"
    directory.mkdir(parents=True)
    (directory / "run.json").write_text('{"run_id": "r1", broken')
    assert codreamer_main(["--runs-dir", str(tmp_path / "runs"), "show", "r1"]) == 1
    line = _one_error_line(capsys.readouterr().err, "codreamer")
    assert f"{directory / 'run.json'}: the run's settings file is not valid JSON" in line and "--run-id" in line


def test_a_corrupt_run_file_on_resume_is_one_line_and_the_traceback_is_in_run_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "runs" / "codreamer" / "models" / "r1"
    directory.mkdir(parents=True)
    (directory / "run.json").write_text("[1, 2")
    assert learn_loop_main(["--runs-dir", str(tmp_path / "runs"), "--run-id", "r1", "--no-wandb"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("learn-loop: error: ") and f"{directory / 'run.json'}" in last and "not valid JSON" in last
    assert "Traceback" not in err and "RunFileError" not in err
    log = (directory / "run.log").read_text()
    assert "Traceback" in log and "RunFileError" in log
    assert (directory / "run.json").read_text() == "[1, 2"  # left as it was


def test_tracebacks_carry_no_variable_values(tmp_path: Path) -> None:
    log_file = tmp_path / "run.log"
    configure_logging(log_file=log_file)

    def fails() -> None:
        api_key = "sekrit-in-a-local-variable"
        raise ValueError(f"bad value of length {len(api_key)}")

    try:
        fails()
    except ValueError as exc:
        logger.opt(exception=exc).error("failed")
    text = log_file.read_text()
    assert "ValueError: bad value of length 26" in text and "sekrit-in-a-local-variable" not in text


def test_codreamer_verbs_print_no_debug_noise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "events.jsonl"
    source.write_text(
        json.dumps(
            {"event_id": "e1", "trajectory_id": "t", "prospect_id": "p", "step": 0, "timestamp": "2025-01-01T00:00:00Z"}
        )
        + "\n"
    )
    assert codreamer_main(["--runs-dir", str(tmp_path / "runs"), "ingest", str(source)]) == 0
    assert codreamer_main(["--runs-dir", str(tmp_path / "runs"), "ingest", str(source)]) == 0  # loads the index
    captured = capsys.readouterr()
    assert "DEBUG" not in captured.err and "1 valid (0 new, 1 already" in captured.out


# --------------------------------------------------------------------------- CPU threads


def test_the_embedded_backend_gets_the_threads_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import codreamer.backends.embedded.backend as embedded
    from codreamer.backends import factory

    built: list[dict[str, object]] = []

    class Recorder:  # stands in for EmbeddedBackend: records what the factory passes
        def __init__(self, *args: object, **kwargs: object) -> None:
            built.append(kwargs)

    monkeypatch.setattr(embedded, "EmbeddedBackend", Recorder)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(factory.os, "sched_getaffinity", lambda _pid: {0, 3, 5})
    monkeypatch.setattr(factory.Path, "read_text", lambda self, *a, **k: "max 100000\n")
    factory.create_backend(Settings())
    assert built[-1]["threads"] == 3  # the cores this process is pinned to, not the machine's
    monkeypatch.setattr(factory.Path, "read_text", lambda self, *a, **k: "150000 100000\n")
    factory.create_backend(Settings())
    assert built[-1]["threads"] == 2  # a container's quota of 1.5 CPUs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    factory.create_backend(Settings())
    assert built[-1]["threads"] == 1
    factory.create_backend(Settings(torch_threads=4))
    assert built[-1]["threads"] == 4  # the setting wins
    with pytest.raises(ValueError, match="torch_threads"):
        Settings(torch_threads=0)


def test_ctrl_c_outside_the_loop_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import codreamer.events.cli_commands as commands

    def interrupted(*_args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "cmd_ingest", interrupted)
    assert codreamer_main(["--runs-dir", str(tmp_path / "runs"), "ingest", "x.jsonl"]) == 130
    assert capsys.readouterr().err.strip() == "codreamer: interrupted"
