"""Tracking modes, the W&B/Weave boundary, and a real offline W&B run with stdin closed.

The online path cannot reach W&B here: it is checked against `RecordingWandbClient` and
`RecordingWeaveClient`, TEST DOUBLES of the two libraries' boundary only (what CoDreamer
passes to `wandb.init` / `weave.init` and what it does when they fail or hang). The offline
path runs the real wandb in a subprocess and reads the run file it leaves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

import codreamer.tracking as tracking
from codreamer.config import Settings
from codreamer.tracking import (
    TRACKING_FILE,
    choose_mode,
    compact_inputs,
    compact_payload,
    init_tracking,
    metrics_for_wandb,
    process,
    wandb_run_id,
)

REPO = Path(__file__).resolve().parent.parent
ENV_NAMES = (
    "WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL", "WANDB_SILENT",
    "WANDB_ERROR_REPORTING", "WEAVE_PROJECT", "WEAVE_DISABLED", "WEAVE_ENABLE_WAL", "WEAVE_PRINT_CALL_LINK",
    "WEAVE_HTTP_TIMEOUT", "CODREAMER_WANDB", "CODREAMER_TRACKING_TIMEOUT_S",
)  # fmt: skip


@pytest.fixture(autouse=True)
def clean_tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No key or mode from the machine; the module's process-wide state reset; env restored after."""
    for name in ENV_NAMES:
        monkeypatch.setenv(name, "")  # recorded, so what tracking sets (WEAVE_ENABLE_WAL, ...) is undone after
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setattr(process, "STATE", process.ProcessState())


# --------------------------------------------------------------------------- test doubles


class RecordingRun:
    """TEST DOUBLE of a wandb Run: records what is logged."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs
        self.id, self.entity = kwargs["id"], "team-x"
        self.url = f"https://wandb.example/{kwargs['project']}/runs/{kwargs['id']}"
        self.dir = str(Path(kwargs["dir"]) / "wandb" / f"run-{kwargs['id']}" / "files")
        self.logged: list[tuple[dict[str, Any], int]] = []
        self.defined: list[tuple[str, str | None]] = []
        self.summary: dict[str, Any] = {}
        self.exit_code: int | None = None

    def log(self, data: dict[str, Any], step: int) -> None:
        self.logged.append((data, step))

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.defined.append((name, step_metric))

    def finish(self, exit_code: int) -> None:
        self.exit_code = exit_code


class RecordingWandbClient:
    """TEST DOUBLE of the wandb boundary (`tracking.WandbClient`): no network, no wandb."""

    def __init__(self, *, reachable: bool = True, online_fails: bool = False) -> None:
        self.reachable, self.online_fails = reachable, online_fails
        self.probes: list[str] = []
        self.inits: list[dict[str, Any]] = []
        self.runs: list[RecordingRun] = []
        self.resets = 0

    def probe(self, base_url: str, timeout_s: float) -> str | None:
        self.probes.append(base_url)
        return None if self.reachable else "gaierror: Name or service not known"

    def init(self, **kwargs: Any) -> RecordingRun:
        self.inits.append(kwargs)
        if kwargs["mode"] == "online" and self.online_fails:
            raise TimeoutError("Run initialization has timed out after 10.0 sec")
        self.runs.append(RecordingRun(kwargs))
        return self.runs[-1]

    def reset(self) -> None:
        self.resets += 1


class RecordingWeaveClient:
    """TEST DOUBLE of the weave boundary (`tracking.WeaveClient`); `hang` makes init never return."""

    def __init__(self, *, hang: bool = False) -> None:
        self.hang, self.release = hang, threading.Event()
        self.inits: list[tuple[str, Any, Any]] = []
        self.flushes = 0
        self.env_at_init: dict[str, str | None] = {}

    def init(self, project: str, *, postprocess_inputs: Any, postprocess_output: Any) -> None:
        self.inits.append((project, postprocess_inputs, postprocess_output))
        self.env_at_init = {k: os.environ.get(k) for k in ("WEAVE_ENABLE_WAL", "WANDB_API_KEY", "WEAVE_DISABLED")}
        if self.hang:
            self.release.wait(30)

    def flush(self) -> None:
        self.flushes += 1


class TableCollector:
    """Stands in for FailureCollector in the in-process tests: records the run it was given."""

    def __init__(self) -> None:
        self.runs: list[Any] = []
        self.steps: list[int | None] = []

    def log_to_wandb(self, run: Any, step: int | None = None) -> bool:
        self.runs.append(run)
        self.steps.append(step)
        return True


def _settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


# --------------------------------------------------------------------------- mode selection

KEY = SecretStr("k" * 40)


@pytest.mark.parametrize(
    ("values", "weave_disabled", "expected"),
    [
        ({"wandb": False, "wandb_api_key": KEY}, False, ("disabled", False, False)),
        ({"wandb_mode": "disabled", "wandb_api_key": KEY}, False, ("disabled", False, False)),
        ({"wandb_mode": "offline", "wandb_api_key": KEY}, False, ("offline", False, False)),
        ({}, False, ("offline", False, False)),
        ({"wandb_mode": "online"}, False, ("offline", False, True)),
        ({"wandb_api_key": SecretStr("  ")}, False, ("offline", False, False)),
        ({"wandb_api_key": KEY}, False, ("online", True, False)),
        ({"wandb_mode": "online", "wandb_api_key": KEY}, False, ("online", True, False)),
        ({"wandb_api_key": KEY}, True, ("online", False, False)),
        ({"wandb_mode": "offline"}, True, ("offline", False, False)),
    ],
)
def test_mode_matrix(values: dict[str, Any], weave_disabled: bool, expected: tuple[str, bool, bool]) -> None:
    decision = choose_mode(_settings(**values), weave_disabled=weave_disabled)
    assert (decision.mode, decision.weave, decision.degraded) == expected
    assert decision.reason


def test_modes_come_from_the_usual_wandb_variables_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's legacy name for offline
    monkeypatch.setenv("WANDB_PROJECT", "proj-a")
    monkeypatch.setenv("WANDB_ENTITY", "team-a")
    monkeypatch.setenv("WEAVE_PROJECT", "weave-a")
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-1")
    settings = Settings()
    assert (settings.wandb_mode, settings.wandb_project, settings.wandb_entity) == ("offline", "proj-a", "team-a")
    assert settings.weave_project == "weave-a" and choose_mode(settings).mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "ONLINE")
    assert choose_mode(Settings()).mode == "online"
    flags = Settings(_cli_parse_args=["--no-wandb"], _cli_settings_source=None)  # type: ignore[call-arg]
    assert choose_mode(flags).mode == "disabled"
    flags = Settings(_cli_parse_args=["--wandb-mode", "offline"], _cli_settings_source=None)  # type: ignore[call-arg]
    assert choose_mode(flags).mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "shared-cluster")
    with pytest.raises(ValueError, match="wandb_mode"):
        Settings()


def test_wandb_run_id_is_stable_per_run_and_valid() -> None:
    first = wandb_run_id("codreamer", "run-20260101-120000")
    assert first == wandb_run_id("codreamer", "run-20260101-120000")
    assert first.startswith("run-20260101-120000-") and len(first) <= 64
    assert first != wandb_run_id("other-project", "run-20260101-120000")
    odd = wandb_run_id("p", "my run/with:odd chars" + "x" * 100)
    assert all(c.isalnum() or c in "-_" for c in odd) and len(odd) <= 64


def test_metrics_filter_keeps_numeric_namespaced_values_only() -> None:
    record = {
        "run_id": "r1", "iteration": 2, "step": 2, "recorded_at": "2026-01-01", "scenarios": ["a"],
        "train/reward_mean": 0.5, "train/rubric/subject": 0.25, "eval/reward_mean": float("nan"),
        "llm/calls": 12, "llm/latency_ms": 340.5, "llm/cost_usd": 0.01, "time/generate_s": 1.5,
        "score/renormalized": True, "peak_rss_mb": 900.0, "train_metrics/loss": float("inf"), "note/text": "x",
    }  # fmt: skip
    assert metrics_for_wandb(record) == {
        "iteration": 2, "train/reward_mean": 0.5, "train/rubric/subject": 0.25, "llm/calls": 12,
        "llm/latency_ms": 340.5, "llm/cost_usd": 0.01, "time/generate_s": 1.5, "score/renormalized": 1,
        "peak_rss_mb": 900.0,
    }  # fmt: skip


class _Choice(BaseModel):
    text: str
    logprobs: list[float]


class _Config(BaseModel):
    model: str
    api_key: SecretStr


def test_traces_keep_no_token_ids_logprobs_or_secrets() -> None:
    choice = _Choice(text="Hello Dana", logprobs=[-0.1] * 300)
    payload = {
        "choices": [choice], "prompt_token_ids": list(range(900)), "scores": list(range(200)), "body": "y" * 9000,
        "usage": {"prompt_tokens": 120, "completion_tokens": 48},
    }  # fmt: skip
    out = compact_payload(payload)
    assert out["usage"] == {"prompt_tokens": 120, "completion_tokens": 48}
    assert out["choices"] == [{"text": "Hello Dana", "logprobs": "<omitted>"}]
    assert out["prompt_token_ids"] == "<omitted>" and out["scores"] == "<200 numbers omitted>"
    assert out["body"].endswith("<9000 chars>") and len(out["body"]) < 4100
    assert len(choice.logprobs) == 300  # the original is untouched
    inputs = compact_inputs(
        {"judge": _Config(model="m", api_key=SecretStr("sk-1")), "api_key": "sk-2", "client": object()}
    )
    assert inputs == {"judge": {"model": "m", "api_key": "***"}, "api_key": "***", "client": "<object>"}
    assert "sk-" not in json.dumps(inputs)


# --------------------------------------------------------------------------- sessions (doubles)


def _open(
    tmp_path: Path,
    wandb_double: RecordingWandbClient,
    weave_double: RecordingWeaveClient,
    resumed: bool = False,
    **values: Any,
) -> tracking.TrackingSession:
    settings = _settings(runs_dir=tmp_path, **values)
    return init_tracking(
        settings, tmp_path / "run-1", "run-1", resumed, wandb_client=wandb_double, weave_client=weave_double
    )


def test_online_with_a_key_starts_wandb_then_weave_with_its_write_ahead_log(tmp_path: Path) -> None:
    wandb, weave = RecordingWandbClient(), RecordingWeaveClient()
    session = _open(tmp_path, wandb, weave, wandb_api_key=KEY, tracking_timeout_s=5)
    assert (session.mode, session.weave, session.degraded) == ("online", True, False)
    [kwargs] = wandb.inits
    assert kwargs["mode"] == "online" and kwargs["resume"] == "allow" and kwargs["name"] == "run-1"
    assert kwargs["id"] == wandb_run_id("codreamer", "run-1") and kwargs["dir"] == str(tmp_path / "run-1")
    assert kwargs["project"] == "codreamer" and kwargs["settings"]["init_timeout"] == 5
    assert kwargs["settings"]["finish_timeout"] > 0 and "wandb_api_key" not in kwargs["config"]
    assert kwargs["config"]["max_tokens"] == 256 and kwargs["config"]["group_size"] == 4
    assert KEY.get_secret_value() not in json.dumps(kwargs, default=str)
    [(project, post_inputs, post_output)] = weave.inits
    assert project == "team-x/codreamer" and post_inputs is compact_inputs and post_output is compact_payload
    assert (
        weave.env_at_init["WEAVE_ENABLE_WAL"] == "true" and weave.env_at_init["WANDB_API_KEY"] == KEY.get_secret_value()
    )
    assert weave.env_at_init["WEAVE_DISABLED"] is None

    logged = session.log_metrics({"train/reward_mean": 0.5, "step": 3, "run_id": "run-1"}, step=3)
    collector = TableCollector()
    assert session.log_failures(collector) and collector.runs == [wandb.runs[0]]
    assert session.log_failures(collector, step=7) and collector.steps == [3, 7]  # default: the metrics' step
    session.finish("finished")
    session.finish("failed")  # a second finish does nothing
    run = wandb.runs[0]
    both = {"train/reward_mean": 0.5, "train/reward": 0.5, "training_step": 3}  # ours, and ART's names
    assert logged == both and run.logged == [(both, 3)]
    assert run.exit_code == 0 and run.summary == {"codreamer/status": "finished"} and weave.flushes == 1


def test_init_is_idempotent_per_run_and_the_wandb_id_survives_a_resume(tmp_path: Path) -> None:
    wandb, weave = RecordingWandbClient(), RecordingWeaveClient()
    first = _open(tmp_path, wandb, weave, wandb_api_key=KEY)
    assert _open(tmp_path, wandb, weave, wandb_api_key=KEY) is first and len(wandb.inits) == 1
    first.finish("interrupted")
    assert wandb.runs[0].exit_code == 1
    resumed = _open(tmp_path, wandb, weave, resumed=True, wandb_api_key=KEY)
    assert resumed is not first and wandb.inits[1]["id"] == wandb.inits[0]["id"]
    assert len(weave.inits) == 1  # Weave is started once per process
    lines = [json.loads(line) for line in (tmp_path / "run-1" / TRACKING_FILE).read_text().splitlines()]
    assert [line["resumed"] for line in lines] == [False, True]
    assert lines[0]["wandb_run_id"] == lines[1]["wandb_run_id"] == wandb_run_id("codreamer", "run-1")


def test_unreachable_wandb_degrades_to_offline_without_weave(tmp_path: Path) -> None:
    wandb, weave = RecordingWandbClient(reachable=False), RecordingWeaveClient()
    session = _open(tmp_path, wandb, weave, wandb_api_key=KEY)
    assert (session.mode, session.weave, session.degraded) == ("offline", False, True)
    assert [k["mode"] for k in wandb.inits] == ["offline"] and weave.inits == []
    assert os.environ["WEAVE_DISABLED"] == "true" and "unreachable" in session.reason
    session.log_metrics({"eval/reward_mean": 0.25}, step=1)
    assert wandb.runs[0].logged == [({"eval/reward_mean": 0.25, "val/reward": 0.25, "training_step": 1}, 1)]


def test_a_failed_online_init_falls_back_to_an_offline_run(tmp_path: Path) -> None:
    wandb, weave = RecordingWandbClient(online_fails=True), RecordingWeaveClient()
    session = _open(tmp_path, wandb, weave, wandb_api_key=KEY)
    assert [k["mode"] for k in wandb.inits] == ["online", "offline"] and wandb.resets == 1
    assert session.mode == "offline" and "timed out" in session.reason and weave.inits == []
    assert wandb.inits[0]["id"] == wandb.inits[1]["id"]


def test_a_hanging_weave_init_is_abandoned_and_ops_stay_plain_calls(tmp_path: Path) -> None:
    wandb, weave = RecordingWandbClient(), RecordingWeaveClient(hang=True)
    try:
        session = _open(tmp_path, wandb, weave, wandb_api_key=KEY, tracking_timeout_s=0.2)
        assert (session.mode, session.weave, session.degraded) == ("online", False, True)
        assert os.environ["WEAVE_DISABLED"] == "true" and "Weave not started: timed out" in session.reason
        session.finish("finished")
        assert weave.flushes == 0
    finally:
        weave.release.set()


def test_online_without_a_key_never_calls_the_network(tmp_path: Path) -> None:
    wandb, weave = RecordingWandbClient(), RecordingWeaveClient()
    session = _open(tmp_path, wandb, weave, wandb_mode="online")
    assert session.mode == "offline" and session.degraded and wandb.probes == [] and weave.inits == []
    assert [k["mode"] for k in wandb.inits] == ["offline"] and "WANDB_API_KEY" not in os.environ
    assert os.environ["WANDB_ERROR_REPORTING"] == "false"  # not even wandb's Sentry


def test_disabled_touches_neither_library_and_logs_nothing(tmp_path: Path) -> None:
    wandb, weave = RecordingWandbClient(), RecordingWeaveClient()
    session = _open(tmp_path, wandb, weave, wandb=False, wandb_api_key=KEY)
    assert session.mode == "disabled" and session.wandb_run is None
    assert session.log_metrics({"train/reward_mean": 1.0}, step=1)["train/reward_mean"] == 1.0
    assert not session.log_failures(TableCollector())
    session.finish("finished")
    assert wandb.probes == wandb.inits == [] and weave.inits == [] and os.environ["WEAVE_DISABLED"] == "true"


def test_a_user_weave_disabled_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEAVE_DISABLED", "1")
    wandb, weave = RecordingWandbClient(), RecordingWeaveClient()
    session = _open(tmp_path, wandb, weave, wandb_api_key=KEY)
    assert session.mode == "online" and not session.weave and weave.inits == []
    assert os.environ["WEAVE_DISABLED"] == "1"


def test_the_call_without_a_run_only_sets_process_switches(tmp_path: Path) -> None:
    session = init_tracking(_settings(wandb=False))
    assert session.mode == "disabled" and session.wandb_run is None
    assert os.environ["WEAVE_DISABLED"] == "true" and not (tmp_path / TRACKING_FILE).exists()


# --------------------------------------------------------------------------- weave 0.54 facts relied on


def test_weave_reads_the_write_ahead_log_switch_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from weave.trace import settings as weave_settings

    assert not weave_settings.should_enable_wal()
    monkeypatch.setenv("WEAVE_ENABLE_WAL", "true")
    assert weave_settings.should_enable_wal()


def test_weave_write_ahead_log_records_are_on_disk_before_they_are_sent(tmp_path: Path) -> None:
    """What makes traces survive a crash: each record is written through before any send."""
    from weave.durability.wal_consumer import JSONLWALConsumer
    from weave.durability.wal_directory_manager import FileWALDirectoryManager
    from weave.durability.wal_writer import JSONLWALWriter

    manager = FileWALDirectoryManager(str(tmp_path / "wal"))
    writer = JSONLWALWriter(manager)
    writer.write({"type": "call_start", "req": {"start": {"id": "c1", "op_name": "rollout"}}})
    [path] = manager.list_files()  # the writer is still open: as after a crash
    consumer = JSONLWALConsumer(path)
    try:
        [entry] = list(consumer.read_pending())
        assert entry.record["req"]["start"]["id"] == "c1"
    finally:
        consumer.close()
        writer.close()


# --------------------------------------------------------------------------- real wandb, offline

ENTRY = """
import json, sys
from pathlib import Path
import wandb
from codreamer.config import Settings
from codreamer.tracking import init_tracking

from codreamer.analysis.failures import Failure, FailureStore
from codreamer.analysis.wandb_log import log_failures


class Failures:  # the failure layer's `log_to_wandb(run, step)` contract, over the real wandb_log (no art)
    def __init__(self, run_dir):
        self.run_dir = run_dir
    def log_to_wandb(self, run, step=None):
        return log_failures(self.run_dir, "run-x", run, step)
    def add(self, iteration, n):
        FailureStore(self.run_dir).store(Failure(
            failure_id=f"f{iteration}-{n}", run_id="run-x", iteration=iteration, step=iteration,
            scenario_id="outreach-p001", input_hash="in-hash", output_hash="out-hash", category="timeout",
            categories=["timeout"], source="exception", agent_state={"turns": 2, "auto_finalized": True},
        ))

runs, mode = Path(sys.argv[1]), sys.argv[2]
settings = Settings(runs_dir=runs, wandb_mode=None if mode == "auto" else mode)
run_dir = runs / "run-x"
session = init_tracking(settings, run_dir, "run-x", resumed=False)
failures, logged = Failures(run_dir), []
for step in (1, 2):
    session.log_metrics({"train/reward_mean": step / 10, "eval/reward_mean": 0.3, "llm/calls": 4, "run_id": "run-x"}, step)
    for n in range(step):  # iteration 1: one failure, iteration 2: two more
        failures.add(step, n)
    logged.append(session.log_failures(failures))  # after each iteration, at its step
logged.append(session.log_failures(failures))  # at close: nothing new, no table, no artifact
session.finish("finished")
again = init_tracking(Settings(runs_dir=runs, wandb_mode="online"), run_dir, "run-x", resumed=True)
again.log_metrics({"train/reward_mean": 0.9}, 3)
again.finish("finished")
ids = [session.wandb_run_id, again.wandb_run_id]
print(json.dumps({"modes": [session.mode, again.mode], "ids": ids, "failures": all(logged)}))
"""


def _wandb_records(path: Path) -> list[Any]:
    """The records of a `.wandb` file: W&B's own format (a 7-byte ':W&B' header, then
    leveldb-log chunks of 32 KiB blocks, each holding a serialised `Record` protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        body, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(pending + body))
            pending = b""
        elif kind in (2, 3):
            pending += body
    return records


def _history(records: list[Any]) -> dict[int, dict[str, str]]:
    rows: dict[int, dict[str, str]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): i.value_json for i in record.history.item}
            rows.setdefault(record.history.step.num, {}).update(items)
    return rows


def test_offline_run_without_a_key_never_prompts_and_keeps_metrics_and_tables(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES and not k.startswith(("WANDB_", "WEAVE_"))}
    env |= {
        "HOME": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
    }
    env |= {
        "CODREAMER_JUDGE_API_KEY": "env-sentinel-judge-key",
        "CODREAMER_EVENTS_SECRET": "env-sentinel-events-secret",
    }
    done = subprocess.run(
        [sys.executable, "-c", ENTRY, str(tmp_path / "runs"), "auto", "--argv-sentinel-secret"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["modes"] == ["offline", "offline"] and result["failures"] is True
    assert result["ids"][0] == result["ids"][1]
    assert "API key" not in done.stderr and "wandb login" not in done.stderr.lower()

    wandb_dir = tmp_path / "runs" / "run-x" / "wandb"
    first, second = sorted(wandb_dir.glob("offline-run-*"))
    # wandb names a folder offline-run-<time>-<id>, adding "-1" when a second one starts in the same second
    assert result["ids"][0] in first.name and result["ids"][0] in second.name
    records = _wandb_records(next(first.glob("*.wandb")))
    history = _history(records)
    assert history[1]["train/reward_mean"] == "0.1" and history[2]["train/reward_mean"] == "0.2"
    assert history[2]["llm/calls"] == "4" and "run_id" not in history[2]
    # ART's names alongside ours, on ART's x-axis (`training_step`, defined as ART's model.log does)
    assert history[2]["train/reward"] == "0.2" and history[2]["val/reward"] == "0.3"
    assert history[2]["training_step"] == "2"
    defined = {(m.name or m.glob_name, m.step_metric) for r in records if r.WhichOneof("record_type") == "metric"
               for m in [r.metric]}  # fmt: skip
    assert {("train/*", "training_step"), ("val/*", "training_step")} <= defined
    # a failure table per iteration, at its step, with the failures new in it (hashes, agent state)
    tables = {
        step: {
            k.removeprefix("failures/table/"): json.loads(v) for k, v in row.items() if k.startswith("failures/table/")
        }
        for step, row in history.items()
    }
    assert [tables[1]["nrows"], tables[2]["nrows"]] == [1, 2] and tables[1]["path"] != tables[2]["path"]
    assert history[1]["failures/count"] == "1" and history[2]["failures/count"] == "3"
    assert history[2]["failures/logged"] == "2"
    table_file = first / "files" / tables[2]["path"]
    table = json.loads(table_file.read_text())
    row = dict(zip(table["columns"], table["data"][0], strict=True))
    assert row["input_hash"] == "in-hash" and row["output_hash"] == "out-hash" and row["iteration"] == 2
    assert json.loads(row["agent_state"]) == {"auto_finalized": True, "turns": 2}
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    versions = [a for a in artifacts if a.name == "failures-run-x"]  # (wandb stores each table as one too)
    assert [json.loads(a.metadata)["iterations"] for a in versions] == [[1], [2]]  # one version per iteration
    assert {"exit"} <= {r.WhichOneof("record_type") for r in records}
    assert _history(_wandb_records(next(second.glob("*.wandb"))))[3]["train/reward_mean"] == "0.9"
    sessions = [json.loads(line) for line in (wandb_dir.parent / TRACKING_FILE).read_text().splitlines()]
    assert [s["mode"] for s in sessions] == ["offline", "offline"] and sessions[1]["resumed"] is True
    assert sessions[0]["wandb_dir"] == str(first)
    # W&B keeps neither the process arguments nor the environment's secrets (its metadata is off)
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"argv-sentinel-secret" not in data and b"env-sentinel" not in data, path


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"weave_project": "team/x"}, "team/x"),  # the entity given stays, never prefixed again
        ({"weave_project": "team/x", "wandb_entity": "alice"}, "team/x"),
        ({"weave_project": "x"}, "team-x/x"),  # the W&B run's entity
        ({"weave_project": "x", "wandb_entity": "alice"}, "alice/x"),
    ],
)
def test_weave_project_takes_project_or_entity_slash_project(values: dict[str, Any], expected: str) -> None:
    wandb, weave = RecordingWandbClient(), RecordingWeaveClient()
    session = _open(Path(os.getcwd()), wandb, weave, wandb_api_key=KEY, **values)
    assert [init[0] for init in weave.inits] == [expected] and session.weave_project == expected


def test_weave_project_from_the_environment_keeps_its_entity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEAVE_PROJECT", "team/x")
    wandb, weave = RecordingWandbClient(), RecordingWeaveClient()
    settings = Settings(_env_file=None, wandb_api_key=KEY)  # type: ignore[call-arg]
    session = init_tracking(settings, Path(os.getcwd()) / "r", "r", wandb_client=wandb, weave_client=weave)
    assert weave.inits[0][0] == "team/x" and session.weave
    assert tracking.weave_project_name("/team/x/", None) == "team/x"


def test_art_metric_names_are_logged_alongside_ours_on_arts_step_axis(tmp_path: Path) -> None:
    wandb, weave = RecordingWandbClient(), RecordingWeaveClient()
    session = _open(tmp_path, wandb, weave, wandb_api_key=KEY)
    record = {
        "step": 4, "train/reward_mean": 0.4, "train/reward_std": 0.1, "train/trajectories": 6.0,
        "train/exceptions": 2.0, "eval/reward_mean": 0.35, "eval/reward_std": 0.05, "eval/reward_count": 9,
        "eval/exceptions": 1, "eval/reward_ci_low": float("nan"),
    }  # fmt: skip
    session.log_metrics(record, step=4)
    session.log_metrics({"train/reward_mean": 0.5}, step=5)
    run = wandb.runs[0]
    (first, step), (second, _) = run.logged
    assert step == 4 and first["training_step"] == 4 and second["training_step"] == 5
    assert first["train/reward"] == 0.4 and first["train/reward_std_dev"] == 0.1
    assert first["train/exception_rate"] == 0.25 and first["val/exception_rate"] == 0.1
    assert first["val/reward"] == 0.35 and first["val/reward_std_dev"] == 0.05
    assert first["train/reward_mean"] == 0.4 and "eval/reward_ci_low" not in first  # ours kept, NaN left out
    # defined once, as ART's model.log does: training_step is the x-axis of train/* and val/*
    assert run.defined == [("training_step", None), ("train/*", "training_step"), ("val/*", "training_step")]
    assert tracking.art_metrics({"iteration": 1}, 1) == {}  # nothing of ART's: no axis point either
