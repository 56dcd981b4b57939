"""W&B runs and Weave traces: which mode a run records in, and never a hang, a prompt or a crash.

Modes (from `--no-wandb`, `WANDB_MODE` / `--wandb-mode` and `WANDB_API_KEY`):

| settings                                       | mode     | W&B run                            | Weave  |
|------------------------------------------------|----------|------------------------------------|--------|
| `--no-wandb`, or `WANDB_MODE=disabled`          | disabled | none                               | off    |
| `WANDB_MODE=offline`                            | offline  | `<run_dir>/wandb/offline-run-*`    | off    |
| no key, `WANDB_MODE` unset                      | offline  | same                               | off    |
| no key, `WANDB_MODE=online`                     | offline  | same, with a warning               | off    |
| key, `WANDB_MODE` unset or `online`             | online   | `<run_dir>/wandb/run-*` + server   | on     |
| key, but W&B unreachable or slower than timeout | offline  | same as offline, with a warning    | off    |

Decisions, and why:
- Without a key the default is **offline**, not disabled: an offline run costs about a second,
  touches no network (`WANDB_ERROR_REPORTING=false` is set, so not even wandb's Sentry), and
  `wandb sync <run_dir>/wandb/offline-run-*` uploads it later; nothing of the run is lost.
  Online without a key degrades to offline for the same reason, and never prompts.
- Weave needs its server: it is started only online, after the W&B run is up, with Weave's
  write-ahead log on (`WEAVE_ENABLE_WAL`): each call is written to `~/.weave/wal/<entity>/
  <project>/<key hash>/` before it is sent, and the next online process with the same key
  replays what a crashed one left. Records the sender handed over before a network drop are
  retried by Weave's batcher and then kept in its `.weave_client_dropped_items_log.jsonl`
  (in the working directory). `weave.init` runs in a thread bounded by `tracking_timeout_s`;
  past it `WEAVE_DISABLED` is set, so every op stays a plain call even if Weave comes up late.
- Every op's inputs and outputs go through `compact_inputs` / `compact_payload`: token ids,
  logprobs and long numeric lists never reach a trace, strings are capped, secrets masked.
- The W&B run id is derived from the CoDreamer project and run id (`wandb_run_id`) with
  `resume="allow"`, so a resumed run continues the same W&B run (offline segments of one run
  are synced in start order by `wandb sync`). Its files live in `<run_dir>/wandb`.
- W&B records no secret: the settings in its config exclude them, secrets are refused as
  flags (so never in `sys.argv`), and the run collects no system metadata (`x_disable_meta`:
  command line, host, program) and no code; wandb does not record the environment.
- In every mode the run directory keeps the readable record: `iterations.jsonl`,
  `trace.jsonl` (`codreamer.local_trace`, which Weave cannot replace: it has no local-only
  mode) and the failures; `tracking.jsonl` says where each session's W&B data went.

`WandbClient` / `WeaveClient` are the boundary to the two libraries; tests replace them with
recording doubles. ART's `model.log` starts a W&B run of its own whenever `WANDB_API_KEY` is
in the environment: create the model with `report_metrics=[]` so that runs are ours alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

from loguru import logger
from pydantic import BaseModel, SecretStr

from codreamer.config import Settings
from codreamer.local_trace import is_secret_name
from codreamer.pipeline.history import append_record

Mode = Literal["online", "offline", "disabled"]

WANDB_SUBDIR = "wandb"
TRACKING_FILE = "tracking.jsonl"
DEFAULT_WANDB_BASE_URL = "https://api.wandb.ai"
TOP_LEVEL_METRICS = frozenset({"iteration", "peak_rss_mb"})
LARGE_KEYS = frozenset(
    {
        "logprobs", "top_logprobs", "token_logprobs", "token_ids", "prompt_token_ids", "completion_token_ids",
        "input_ids", "logits",
    }  # fmt: skip
)
MAX_TRACE_TEXT = 4000
MAX_TRACE_ITEMS = 50
MAX_NUMBERS = 32
MAX_DEPTH = 8

_SESSIONS: dict[tuple[str, str], TrackingSession] = {}
_OWNED_ENV: dict[str, str | None] = {}  # variables this module changed, with their first value
_weave_project: str | None = None  # the project Weave was initialised with in this process


# --------------------------------------------------------------------------- mode selection


@dataclass(frozen=True)
class ModeDecision:
    """What the settings ask for, before anything is started (online may still degrade)."""

    mode: Mode
    weave: bool
    reason: str
    degraded: bool = False


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _has_key(settings: Settings) -> bool:
    return settings.wandb_api_key is not None and bool(settings.wandb_api_key.get_secret_value().strip())


def choose_mode(settings: Settings, *, weave_disabled: bool = False) -> ModeDecision:
    """The mode table of the module docstring; `weave_disabled` is the user's WEAVE_DISABLED."""
    if not settings.wandb:
        return ModeDecision("disabled", False, "--no-wandb")
    if settings.wandb_mode == "disabled":
        return ModeDecision("disabled", False, "WANDB_MODE=disabled")
    if settings.wandb_mode == "offline":
        return ModeDecision("offline", False, "WANDB_MODE=offline")
    if not _has_key(settings):
        if settings.wandb_mode == "online":
            return ModeDecision("offline", False, "WANDB_MODE=online but no WANDB_API_KEY", degraded=True)
        return ModeDecision("offline", False, "no WANDB_API_KEY")
    if weave_disabled:
        return ModeDecision("online", False, "WANDB_API_KEY set; WEAVE_DISABLED is set")
    return ModeDecision("online", True, "WANDB_API_KEY set")


def wandb_run_id(project: str, run_id: str) -> str:
    """A W&B run id that is the same every time this CoDreamer run is opened (and resumed)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", run_id).strip("-")[:48] or "run"
    digest = hashlib.sha256(f"{project}\0{run_id}".encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


# --------------------------------------------------------------------------- payload shaping


def metrics_for_wandb(record: Mapping[str, Any]) -> dict[str, int | float]:
    """The numeric metrics of a history record: namespaced keys (`train/...`, `eval/...`,
    `llm/...`, `time/...`, `score/...`, ...) and a few top-level numbers; NaN/inf are left out
    (a missing point, not a fake one), booleans count as 0/1, identifiers and `step` are not metrics."""
    out: dict[str, int | float] = {}
    for key, value in record.items():
        if "/" not in key and key not in TOP_LEVEL_METRICS:
            continue
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int | float) and math.isfinite(value):
            out[key] = value
    return out


def _as_mapping(value: Any) -> Mapping[str, Any] | None:
    if isinstance(value, Mapping):
        return value
    if isinstance(value, BaseModel):
        try:
            return value.model_dump(mode="python", exclude_none=True)
        except Exception:  # noqa: BLE001 - an odd model is shown by its type name instead
            return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return None


def _compact_sequence(items: list[Any], depth: int) -> Any:
    if len(items) > MAX_NUMBERS and all(isinstance(i, int | float) for i in items):
        return f"<{len(items)} numbers omitted>"
    shown = [compact_payload(i, depth + 1) for i in items[:MAX_TRACE_ITEMS]]
    if len(items) > MAX_TRACE_ITEMS:
        shown.append(f"<{len(items) - MAX_TRACE_ITEMS} more items omitted>")
    return shown


def compact_payload(value: Any, depth: int = 0) -> Any:
    """What a trace keeps of a value: its readable parts, never token ids, logprobs or secrets.

    Used as Weave's client-level postprocessing, so it also shapes the calls Weave patches
    in by itself (OpenAI, litellm). It builds a new value and never mutates the original.
    """
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, SecretStr):
        return "***"
    if isinstance(value, str):
        return value if len(value) <= MAX_TRACE_TEXT else f"{value[:MAX_TRACE_TEXT]}... <{len(value)} chars>"
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if depth >= MAX_DEPTH:
        return f"<{type(value).__name__}>"
    mapping = _as_mapping(value)
    if mapping is not None:
        return {str(k): _compact_item(str(k), v, depth + 1) for k, v in mapping.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return _compact_sequence(list(value), depth)
    return f"<{type(value).__name__}>"  # clients, backends, tensors: named, never serialised


def _compact_item(name: str, value: Any, depth: int) -> Any:
    if name in LARGE_KEYS:
        return "<omitted>"
    return "***" if value and is_secret_name(name) else compact_payload(value, depth)


def compact_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Weave's client-level input postprocessing: `compact_payload` of each argument."""
    return {str(k): _compact_item(str(k), v, 1) for k, v in inputs.items()}


# --------------------------------------------------------------------------- library boundary


class WandbClient(Protocol):
    """What CoDreamer needs of the wandb library."""

    def probe(self, base_url: str, timeout_s: float) -> str | None:
        """None when the W&B server accepts a connection, else why not."""
        ...

    def init(self, **kwargs: Any) -> Any:
        """`wandb.init(**kwargs)`, with `settings` given as a dict."""
        ...

    def reset(self) -> None:
        """Forget a failed init (wandb keeps its run id busy until its service is torn down)."""
        ...


class WeaveClient(Protocol):
    """What CoDreamer needs of the weave library."""

    def init(
        self, project: str, *, postprocess_inputs: Callable[..., Any], postprocess_output: Callable[..., Any]
    ) -> None: ...

    def flush(self) -> None: ...


class WandbLibrary:
    """The real wandb (imported only when a run is started)."""

    def probe(self, base_url: str, timeout_s: float) -> str | None:
        url = urlparse(base_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "", port), timeout=timeout_s).close()
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def init(self, **kwargs: Any) -> Any:
        import wandb

        settings = wandb.Settings(**kwargs.pop("settings", {}))
        return wandb.init(settings=settings, **kwargs)

    def reset(self) -> None:
        import wandb

        wandb.teardown()


class WeaveLibrary:
    """The real weave."""

    def init(self, project: str, *, postprocess_inputs: Callable[..., Any], postprocess_output: Callable[..., Any]) -> None:
        import weave

        weave.init(project, postprocess_inputs=postprocess_inputs, postprocess_output=postprocess_output)

    def flush(self) -> None:
        import weave

        client = weave.get_client()
        if client is not None:
            client.flush()


def _bounded(fn: Callable[[], Any], timeout_s: float, name: str) -> tuple[bool, Any, BaseException | None]:
    """Run `fn` in a daemon thread for at most `timeout_s`: (finished, value, error).

    A daemon thread, so that a library stuck on the network can never hold the process open.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return False, None, None
    return True, box.get("value"), box.get("error")


def _short(exc: BaseException | str) -> str:
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:200]


# --------------------------------------------------------------------------- environment


def _set_env(name: str, value: str | None) -> None:
    _OWNED_ENV.setdefault(name, os.environ.get(name))
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _weave_disabled_by_user() -> bool:
    return "WEAVE_DISABLED" not in _OWNED_ENV and _truthy(os.environ.get("WEAVE_DISABLED"))


def _set_weave_disabled(disabled: bool) -> None:
    """WEAVE_DISABLED makes every op a plain call (and keeps Weave's 'not initialised' line quiet)."""
    if _weave_disabled_by_user():
        return
    if disabled:
        _set_env("WEAVE_DISABLED", "true")
    elif "WEAVE_DISABLED" in _OWNED_ENV:
        _set_env("WEAVE_DISABLED", _OWNED_ENV["WEAVE_DISABLED"])


def _prepare_environment(mode: Mode) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    if mode != "online":
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # wandb's Sentry is a network call
        # wandb.init starts Weave itself whenever weave is imported (it always is here), and
        # Weave without a key asks for one on the terminal: offline, it must not start at all.
        os.environ["WANDB_DISABLE_WEAVE"] = "true"


# --------------------------------------------------------------------------- the session


@dataclass
class TrackingSession:
    """Where this run's metrics and traces go; `finish` it once (a second call does nothing)."""

    mode: Mode
    weave: bool
    wandb_run: Any | None
    reason: str
    run_id: str | None = None
    run_dir: Path | None = None
    wandb_run_id: str | None = None
    weave_project: str | None = None
    degraded: bool = False
    timeout_s: float = 10.0
    finished: bool = False
    _weave_client: WeaveClient | None = field(default=None, repr=False)

    def log_metrics(self, record: Mapping[str, Any], step: int) -> dict[str, int | float]:
        """Log the numeric metrics of an iteration record at `step`; returns what was logged.

        Never raises: a W&B failure costs a warning, the local history already has the record.
        """
        metrics = metrics_for_wandb(record)
        if self.wandb_run is None or self.finished or not metrics:
            return metrics
        try:
            self.wandb_run.log(metrics, step=int(step))
        except Exception as exc:  # noqa: BLE001 - tracking never stops the loop
            logger.warning("W&B could not log step {}: {}", step, _short(exc))
        return metrics

    def log_failures(self, collector: Any) -> bool:
        """The failure layer's table and artifact (`collector.log_to_wandb(run)`); False without a run."""
        if self.wandb_run is None or self.finished:
            return False
        try:
            return bool(collector.log_to_wandb(self.wandb_run))
        except Exception as exc:  # noqa: BLE001 - the failures stay in the run directory
            logger.warning("W&B could not log the failures table: {}", _short(exc))
            return False

    def finish(self, status: str = "finished") -> None:
        """Close the W&B run (exit code 0 only for 'finished') and flush Weave, each bounded in time."""
        if self.finished:
            return
        self.finished = True
        if self.wandb_run is not None:
            self._finish_wandb(status)
        if self.weave and self._weave_client is not None:
            done, _, error = _bounded(self._weave_client.flush, self.timeout_s, "weave-flush")
            if not done or error is not None:
                logger.warning(
                    "Weave traces not flushed ({}); its write-ahead log keeps them for the next online run",
                    "timed out" if not done else _short(error or ""),
                )

    def _finish_wandb(self, status: str) -> None:
        try:
            self.wandb_run.summary["codreamer/status"] = status
            self.wandb_run.finish(exit_code=0 if status == "finished" else 1)
        except Exception as exc:  # noqa: BLE001 - the run's files stay on disk for `wandb sync`
            logger.warning("W&B run did not finish cleanly ({}); `wandb sync` its directory", _short(exc))
        if self.mode == "offline" and self.run_dir is not None:
            logger.info("W&B offline run kept; upload it with: wandb sync {}/offline-run-*", self.run_dir / WANDB_SUBDIR)

    def describe(self) -> str:
        """One line: what this run records, and what it does not."""
        local = "local history, trace and failures in the run directory"
        if self.mode == "disabled":
            return f"tracking disabled ({self.reason}): recording {local}; no W&B run, no Weave traces"
        where = self.run_dir / WANDB_SUBDIR if self.run_dir is not None else "the run directory"
        if self.mode == "offline":
            return (
                f"W&B offline ({self.reason}): recording {local} and W&B run {self.wandb_run_id} in {where} "
                f"(upload later: wandb sync {where}/offline-run-*); no Weave traces (they need the W&B server)"
            )
        url = getattr(self.wandb_run, "url", None) or self.wandb_run_id
        weave = f"Weave traces in {self.weave_project}" if self.weave else "no Weave traces"
        return f"W&B online ({self.reason}): recording {local}, W&B run {url} (copy in {where}), {weave}"


def _public_config(settings: Settings) -> dict[str, Any]:
    """Settings as the W&B run's config: secrets are excluded by the model, and masked here too."""
    dumped = settings.model_dump(mode="json")
    return {k: v for k, v in dumped.items() if not (is_secret_name(k) and v)}


def _wandb_kwargs(settings: Settings, run_dir: Path, run_id: str, mode: Mode) -> dict[str, Any]:
    timeout = settings.tracking_timeout_s
    return {
        "project": settings.wandb_project or settings.project,
        "entity": settings.wandb_entity,
        "id": wandb_run_id(settings.project, run_id),
        "name": run_id,
        "resume": "allow",
        "dir": str(run_dir),
        "mode": mode,
        "config": _public_config(settings),
        "settings": {
            "init_timeout": timeout,
            "login_timeout": timeout,
            "finish_timeout": 3 * timeout,  # past it the rest stays on disk for `wandb sync`
            "console": "off",  # run.log in the run directory has the logs already
            "silent": True,
            "reinit": "create_new",
            # No system metadata: it holds the process arguments (`sys.argv`, which could carry a
            # secret, and goes into the .wandb file `wandb sync` uploads), host and program; the
            # settings the run used are in its config. No code or diffs either.
            "x_disable_meta": True,
            "save_code": False,
            "disable_code": True,
        },
    }


def _start_wandb(client: WandbClient, kwargs: dict[str, Any]) -> tuple[Any | None, str | None]:
    try:
        return client.init(**kwargs), None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a dead server must not stop training
        return None, _short(exc)


def _go_online(settings: Settings, run_dir: Path, run_id: str, client: WandbClient) -> tuple[Any | None, str | None]:
    """Probe the server (bounded), then start the online run; (run, None) or (None, why not)."""
    key = settings.wandb_api_key.get_secret_value() if settings.wandb_api_key else ""
    if os.environ.get("WANDB_API_KEY") != key:
        _set_env("WANDB_API_KEY", key)  # Weave reads the key from the environment only
    base_url = os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_BASE_URL)
    timeout = settings.tracking_timeout_s
    done, problem, error = _bounded(lambda: client.probe(base_url, min(timeout, 5.0)), timeout, "wandb-probe")
    if not done or error is not None or problem:
        return None, f"{base_url} unreachable ({problem or (error and _short(error)) or 'timed out'})"
    return _start_wandb(client, _wandb_kwargs(settings, run_dir, run_id, "online"))


def _start_weave(settings: Settings, run: Any, client: WeaveClient) -> tuple[str | None, str | None]:
    """Weave with its write-ahead log, bounded in time; (project, None) or (None, why not)."""
    global _weave_project
    entity = settings.wandb_entity or getattr(run, "entity", None)
    project = f"{entity}/{settings.weave_project}" if entity else settings.weave_project
    os.environ.setdefault("WEAVE_ENABLE_WAL", "true")
    os.environ.setdefault("WEAVE_PRINT_CALL_LINK", "false")
    os.environ.setdefault("WEAVE_HTTP_TIMEOUT", f"{max(settings.tracking_timeout_s, 10.0):g}")
    _set_weave_disabled(False)
    if _weave_project == project:
        return project, None
    done, _, error = _bounded(
        lambda: client.init(project, postprocess_inputs=compact_inputs, postprocess_output=compact_payload),
        settings.tracking_timeout_s,
        "weave-init",
    )
    if not done or error is not None:
        _set_weave_disabled(True)
        return None, "timed out" if not done else _short(error or "")
    _weave_project = project
    return project, None


def _open_online(
    settings: Settings, run: Any, decision: ModeDecision, weave_client: WeaveClient, **common: Any
) -> TrackingSession:
    session = TrackingSession("online", False, run, decision.reason, **common)
    if not decision.weave:
        _set_weave_disabled(True)
        return session
    session.weave_project, problem = _start_weave(settings, run, weave_client)
    session.weave, session._weave_client = session.weave_project is not None, weave_client
    if problem:
        session.reason, session.degraded = f"{decision.reason}; Weave not started: {problem}", True
    return session


def _open_session(
    settings: Settings,
    run_dir: Path,
    run_id: str,
    decision: ModeDecision,
    wandb_client: WandbClient,
    weave_client: WeaveClient,
) -> TrackingSession:
    """Online when asked and possible, else offline, else (or when asked) disabled."""
    common: dict[str, Any] = {"run_id": run_id, "run_dir": run_dir, "timeout_s": settings.tracking_timeout_s}
    if decision.mode == "disabled":
        _set_weave_disabled(True)
        return TrackingSession("disabled", False, None, decision.reason, **common)
    common["wandb_run_id"] = wandb_run_id(settings.project, run_id)
    reason, degraded = decision.reason, decision.degraded
    if decision.mode == "online":
        run, problem = _go_online(settings, run_dir, run_id, wandb_client)
        if run is not None:
            return _open_online(settings, run, decision, weave_client, **common)
        reason, degraded = f"W&B online failed: {problem}", True
        _bounded(wandb_client.reset, settings.tracking_timeout_s, "wandb-reset")
    _set_weave_disabled(True)
    run, problem = _start_wandb(wandb_client, _wandb_kwargs(settings, run_dir, run_id, "offline"))
    if run is None:
        common["wandb_run_id"] = None
        reason = f"{reason}; W&B offline failed too: {problem}"
        return TrackingSession("disabled", False, None, reason, degraded=True, **common)
    return TrackingSession("offline", False, run, reason, degraded=degraded, **common)


def _wandb_files_parent(run: Any | None) -> str | None:
    """The W&B run's own directory (`.../wandb/offline-run-*`), the argument `wandb sync` takes."""
    files = getattr(run, "dir", None)
    return str(Path(files).parent) if isinstance(files, str) and files else None


def _record_session(session: TrackingSession, resumed: bool) -> None:
    """tracking.jsonl: where each session of this run sent its data, for `wandb sync` later."""
    if session.run_dir is None:
        return
    record = {
        "started_at": datetime.now(UTC).isoformat(),
        "mode": session.mode,
        "reason": session.reason,
        "resumed": resumed,
        "wandb_run_id": session.wandb_run_id,
        "wandb_dir": _wandb_files_parent(session.wandb_run),
        "wandb_url": getattr(session.wandb_run, "url", None) if session.mode == "online" else None,
        "weave_project": session.weave_project,
    }
    try:
        append_record(session.run_dir / TRACKING_FILE, record)
    except OSError as exc:  # the log line below still says where the data went
        logger.warning("could not write {}: {}", TRACKING_FILE, exc)


def init_tracking(
    settings: Settings,
    run_dir: Path | None = None,
    run_id: str | None = None,
    resumed: bool = False,
    *,
    wandb_client: WandbClient | None = None,
    weave_client: WeaveClient | None = None,
) -> TrackingSession:
    """Start this run's tracking in the mode the settings give (module docstring); idempotent.

    With `run_dir` and `run_id`: opens the W&B run (online, else offline) and Weave (online
    only), writes one line to the log saying what is and is not recorded, and returns the
    session; a second call for the same run returns the same open session. Without them it
    only settles the process-wide switches (WEAVE_DISABLED, WANDB_SILENT) before the first op
    runs and returns a session with no W&B run. Never prompts, never raises for tracking
    trouble, never waits longer than about `tracking_timeout_s` per service.
    """
    decision = choose_mode(settings, weave_disabled=_weave_disabled_by_user())
    _prepare_environment(decision.mode)
    if run_dir is None or run_id is None:
        if not decision.weave:
            _set_weave_disabled(True)
        return TrackingSession(decision.mode, False, None, decision.reason, degraded=decision.degraded)
    run_dir = Path(run_dir)
    key = (str(run_dir.resolve()), run_id)
    existing = _SESSIONS.get(key)
    if existing is not None and not existing.finished:
        return existing
    run_dir.mkdir(parents=True, exist_ok=True)
    session = _open_session(
        settings, run_dir, run_id, decision, wandb_client or WandbLibrary(), weave_client or WeaveLibrary()
    )
    _SESSIONS[key] = session
    _record_session(session, resumed)
    logger.log("WARNING" if session.degraded else "INFO", session.describe() + (" (resumed)" if resumed else ""))
    return session
