"""Starting a run's tracking: the W&B run (online, else offline), then Weave (online only).

`init_tracking` is the one entry point (the run lifecycle, `codreamer.pipeline.run`, calls
it once per run, before the first op). Each library call is bounded in time (`bounded`); a
server that is down, slow or refuses the key degrades the session to offline with a warning,
never a hang, a prompt or a crash. `tracking.jsonl` in the run directory gets one line per
session saying where its data went.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loguru import logger

from codreamer.config import Settings
from codreamer.redaction import is_secret_name
from codreamer.storage import append_jsonl
from codreamer.tracking import process
from codreamer.tracking.clients import WandbClient, WandbLibrary, WeaveClient, WeaveLibrary, bounded, short
from codreamer.tracking.modes import Mode, ModeDecision, choose_mode, wandb_run_id
from codreamer.tracking.payloads import compact_inputs, compact_payload
from codreamer.tracking.session import TrackingSession

TRACKING_FILE = "tracking.jsonl"
DEFAULT_WANDB_BASE_URL = "https://api.wandb.ai"


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
        return None, short(exc)


def _go_online(settings: Settings, run_dir: Path, run_id: str, client: WandbClient) -> tuple[Any | None, str | None]:
    """Probe the server (bounded), then start the online run; (run, None) or (None, why not)."""
    key = settings.wandb_api_key.get_secret_value() if settings.wandb_api_key else ""
    if os.environ.get("WANDB_API_KEY") != key:
        process.set_env("WANDB_API_KEY", key)  # Weave reads the key from the environment only
    base_url = os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_BASE_URL)
    timeout = settings.tracking_timeout_s
    done, problem, error = bounded(lambda: client.probe(base_url, min(timeout, 5.0)), timeout, "wandb-probe")
    if not done or error is not None or problem:
        return None, f"{base_url} unreachable ({problem or (error and short(error)) or 'timed out'})"
    return _start_wandb(client, _wandb_kwargs(settings, run_dir, run_id, "online"))


def weave_project_name(project: str, entity: str | None) -> str:
    """The name `weave.init` gets: `entity/project` as given, else `project` under the W&B entity.

    Weave takes both forms (`project` goes to the key's default entity); a name that already
    has its entity keeps it, so `WEAVE_PROJECT=team/x` stays `team/x`, never `alice/team/x`.
    """
    name = project.strip().strip("/")
    if "/" in name or not entity:
        return name
    return f"{entity}/{name}"


def _start_weave(settings: Settings, run: Any, client: WeaveClient) -> tuple[str | None, str | None]:
    """Weave with its write-ahead log, bounded in time; (project, None) or (None, why not)."""
    project = weave_project_name(settings.weave_project, settings.wandb_entity or getattr(run, "entity", None))
    os.environ.setdefault("WEAVE_ENABLE_WAL", "true")
    os.environ.setdefault("WEAVE_PRINT_CALL_LINK", "false")
    os.environ.setdefault("WEAVE_HTTP_TIMEOUT", f"{max(settings.tracking_timeout_s, 10.0):g}")
    process.set_weave_disabled(False)
    if process.STATE.weave_project == project:
        return project, None
    done, _, error = bounded(
        lambda: client.init(project, postprocess_inputs=compact_inputs, postprocess_output=compact_payload),
        settings.tracking_timeout_s,
        "weave-init",
    )
    if not done or error is not None:
        process.set_weave_disabled(True)
        return None, "timed out" if not done else short(error or "")
    process.STATE.weave_project = project
    return project, None


def _open_online(
    settings: Settings, run: Any, decision: ModeDecision, weave_client: WeaveClient, **common: Any
) -> TrackingSession:
    session = TrackingSession("online", False, run, decision.reason, **common)
    if not decision.weave:
        process.set_weave_disabled(True)
        return session
    session.weave_project, problem = _start_weave(settings, run, weave_client)
    if session.weave_project is not None:
        session.weave, session.weave_client = True, weave_client
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
        process.set_weave_disabled(True)
        return TrackingSession("disabled", False, None, decision.reason, **common)
    common["wandb_run_id"] = wandb_run_id(settings.project, run_id)
    reason, degraded = decision.reason, decision.degraded
    if decision.mode == "online":
        run, problem = _go_online(settings, run_dir, run_id, wandb_client)
        if run is not None:
            return _open_online(settings, run, decision, weave_client, **common)
        reason, degraded = f"W&B online failed: {problem}", True
        bounded(wandb_client.reset, settings.tracking_timeout_s, "wandb-reset")
    process.set_weave_disabled(True)
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
        append_jsonl(session.run_dir / TRACKING_FILE, [record])
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
    """Start this run's tracking in the mode the settings give (package docstring); idempotent.

    With `run_dir` and `run_id`: opens the W&B run (online, else offline) and Weave (online
    only), writes one line to the log saying what is and is not recorded, and returns the
    session; a second call for the same run returns the same open session. Without them it
    only settles the process-wide switches (WEAVE_DISABLED, WANDB_SILENT) and returns a
    session with no W&B run. Never prompts, never raises for tracking trouble, never waits
    longer than about `tracking_timeout_s` per service.
    """
    decision = choose_mode(settings, weave_disabled=process.weave_disabled_by_user())
    process.prepare_environment(decision.mode)
    if run_dir is None or run_id is None:
        if not decision.weave:
            process.set_weave_disabled(True)
        return TrackingSession(decision.mode, False, None, decision.reason, degraded=decision.degraded)
    run_dir = Path(run_dir)
    key = (str(run_dir.resolve()), run_id)
    existing = process.STATE.sessions.get(key)
    if existing is not None and not existing.finished:
        return existing
    run_dir.mkdir(parents=True, exist_ok=True)
    session = _open_session(
        settings, run_dir, run_id, decision, wandb_client or WandbLibrary(), weave_client or WeaveLibrary()
    )
    process.STATE.sessions[key] = session
    _record_session(session, resumed)
    logger.log("WARNING" if session.degraded else "INFO", session.describe() + (" (resumed)" if resumed else ""))
    return session
