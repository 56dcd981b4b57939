"""An HTTP endpoint where an email tool (or a relay) posts online outcomes as they happen.

`POST /events` takes one OnlineOutcome object or a list of them, as `Content-Type:
application/json`. The sender signs the send time together with the raw body, with the shared
secret (at least 32 bytes, `CODREAMER_EVENTS_SECRET`):

    X-CoDreamer-Timestamp: <unix time in seconds>
    X-CoDreamer-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">

(`signed_headers(body, secret)` builds both.) A request whose timestamp is more than the
tolerance (`--events-tolerance-s`, default 300 s) away from the server's clock is refused, so a
captured request cannot be replayed later; within the window the event-id dedupe makes a
replay count once. Checks run cheapest first: size (413), Content-Type (415), timestamp and
signature (401), JSON (400), then every item is validated (400, naming the item index and
field) before anything is written, so a batch is all or nothing. Every bad body gets a 4xx.
Accepted events go through `EventLog.append_new`: a retried delivery counts once, and the
reply says how many were new and how many were duplicates.

The secret is never logged, and never part of an error message.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from loguru import logger
from pydantic import ValidationError

from codreamer.events.log import EventLog
from codreamer.events.models import OnlineOutcome
from codreamer.events.outbox import KnownTrajectories

SIGNATURE_HEADER = "X-CoDreamer-Signature"
TIMESTAMP_HEADER = "X-CoDreamer-Timestamp"
SIGNATURE_PREFIX = "sha256="
MAX_ITEM_ERRORS = 20
MIN_SECRET_BYTES = 32
DEFAULT_TOLERANCE_S = 300.0

_LOG_KEY = web.AppKey("event_log", EventLog)
_SECRET_KEY = web.AppKey("secret", bytes)
_LOCK_KEY = web.AppKey("append_lock", asyncio.Lock)
_MAX_BODY_KEY = web.AppKey("max_body_bytes", int)
_TOLERANCE_KEY = web.AppKey("tolerance_s", float)
_CLOCK_KEY: web.AppKey[Callable[[], float]] = web.AppKey("clock")
_KNOWN_KEY: web.AppKey[KnownTrajectories | None] = web.AppKey("known_trajectories")
MAX_UNKNOWN_LISTED = 20


def _mac(secret: bytes, timestamp: str, body: bytes) -> str:
    return hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: str, timestamp: int | str) -> str:
    """The `X-CoDreamer-Signature` value for `body` sent at `timestamp` (unix seconds)."""
    return SIGNATURE_PREFIX + _mac(secret.encode(), str(timestamp), body)


def signed_headers(body: bytes, secret: str, timestamp: int | None = None) -> dict[str, str]:
    """Every header a sender needs: Content-Type, timestamp (default: now) and signature."""
    stamp = str(int(time.time()) if timestamp is None else int(timestamp))
    return {"Content-Type": "application/json", TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(body, secret, stamp)}


def check_secret(secret: str | None) -> None:
    """ValueError (with what to do) for a missing secret or one shorter than MIN_SECRET_BYTES."""
    if not secret:
        raise ValueError(
            "the events webhook needs a shared secret to verify senders: set CODREAMER_EVENTS_SECRET "
            "in the environment or in .env"
        )
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(
            f"CODREAMER_EVENTS_SECRET is {len(secret.encode())} bytes; use at least {MIN_SECRET_BYTES} "
            "(e.g. the output of: python -c 'import secrets; print(secrets.token_hex(32))')"
        )


def _authentication_problem(request: web.Request, body: bytes) -> str | None:
    """None when the timestamp and signature are good and the timestamp is in the window."""
    stamp = (request.headers.get(TIMESTAMP_HEADER) or "").strip()
    if not stamp.isascii() or not stamp.isdigit() or len(stamp) > 12:
        return f"missing or bad {TIMESTAMP_HEADER} header (the send time, in unix seconds)"
    header = (request.headers.get(SIGNATURE_HEADER) or "").strip()
    if not header.startswith(SIGNATURE_PREFIX):
        return (
            f'missing or bad {SIGNATURE_HEADER} header (expected {SIGNATURE_PREFIX}<hex hmac of "<timestamp>.<body>">)'
        )
    expected = _mac(request.app[_SECRET_KEY], stamp, body)
    if not hmac.compare_digest(expected.encode(), header[len(SIGNATURE_PREFIX) :].lower().encode()):
        return f'bad {SIGNATURE_HEADER} (expected {SIGNATURE_PREFIX}<hex hmac of "<timestamp>.<body>">)'
    tolerance = request.app[_TOLERANCE_KEY]
    if abs(request.app[_CLOCK_KEY]() - int(stamp)) > tolerance:
        return (
            f"{TIMESTAMP_HEADER} is more than {tolerance:g} s from the server's time (a replay, or a clock that is off)"
        )
    return None


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _validate(payload: Any) -> tuple[list[OnlineOutcome], list[str]]:
    """Every item validated; errors as `item 3: field step: ...` (all items checked)."""
    items = payload if isinstance(payload, list) else [payload]
    outcomes, errors = [], []
    for index, item in enumerate(items):
        try:
            outcomes.append(OnlineOutcome.model_validate(item))
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                loc = ".".join(str(part) for part in error["loc"])
                errors.append(f"item {index}: field {loc}: {error['msg']}" if loc else f"item {index}: {error['msg']}")
    return outcomes, errors


async def _read_body(request: web.Request) -> bytes | web.Response:
    limit = request.app[_MAX_BODY_KEY]
    if request.content_length is not None and request.content_length > limit:
        return _error(413, f"body over {limit} bytes")
    try:
        return await request.read()  # aiohttp stops reading at client_max_size (chunked bodies too)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"body over {limit} bytes")


async def _post_events(request: web.Request) -> web.Response:
    body = await _read_body(request)
    if isinstance(body, web.Response):
        return body
    if not _is_json(request.content_type):
        return _error(415, f"Content-Type must be application/json, not {request.content_type}")
    problem = _authentication_problem(request, body)
    if problem is not None:
        logger.warning("webhook: rejected a request from {}: {}", request.remote, problem)
        return _error(401, problem)
    try:
        payload = json.loads(body)
    except RecursionError:
        return _error(400, "body is not JSON: nested too deeply")
    except ValueError as exc:  # JSONDecodeError, bytes that are not UTF-8, a 5,000-digit number
        return _error(400, f"body is not JSON: {exc}")
    if not isinstance(payload, dict | list):
        return _error(400, "body must be an outcome object or a list of them")
    outcomes, errors = _validate(payload)
    if errors:
        details = errors[:MAX_ITEM_ERRORS]
        return _error(400, "invalid outcome(s); nothing was written", details=details, invalid_fields=len(errors))
    async with request.app[_LOCK_KEY]:  # one EventLog, one writer thread at a time
        result = await asyncio.to_thread(request.app[_LOG_KEY].append_new, outcomes)
    logger.info("webhook: {} event(s) accepted, {} duplicate(s)", result.accepted, result.duplicates)
    reply: dict[str, Any] = {"accepted": result.accepted, "duplicates": result.duplicates}
    known = request.app[_KNOWN_KEY]
    if known is not None:
        unknown = await asyncio.to_thread(known.unknown, [o.trajectory_id for o in outcomes])
        if unknown:  # kept in the log all the same: the email may be in an outbox not written yet
            logger.warning("webhook: {} event(s) for trajectory ids in no outbox: {}", len(unknown), unknown[:5])
        reply |= {"unknown_trajectories": len(unknown), "unknown_trajectory_ids": unknown[:MAX_UNKNOWN_LISTED]}
    return web.json_response(reply)


def build_webhook_app(
    log: EventLog,
    secret: str,
    max_body_bytes: int = 1_000_000,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    clock: Callable[[], float] = time.time,
    known: KnownTrajectories | None = None,
) -> web.Application:
    """The aiohttp application serving `POST /events` into `log`; ValueError for a weak secret.

    With `known` (the project's outboxes), the reply also counts and lists the accepted events'
    trajectory ids that no outbox holds (`unknown_trajectories`): reported, and stored anyway."""
    check_secret(secret)
    if not tolerance_s > 0:
        raise ValueError(f"the timestamp tolerance must be > 0 seconds, got {tolerance_s}")
    app = web.Application(client_max_size=max_body_bytes)
    app[_LOG_KEY] = log
    app[_SECRET_KEY] = secret.encode()
    app[_LOCK_KEY] = asyncio.Lock()
    app[_MAX_BODY_KEY] = max_body_bytes
    app[_TOLERANCE_KEY] = float(tolerance_s)
    app[_CLOCK_KEY] = clock
    app[_KNOWN_KEY] = known
    app.router.add_post("/events", _post_events)
    return app


async def serve_events(
    log: EventLog,
    secret: str | None,
    host: str = "127.0.0.1",
    port: int = 8787,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    known: KnownTrajectories | None = None,
) -> None:
    """Serve the webhook until cancelled. Refuses to start without a secret of 32 bytes or more."""
    check_secret(secret)
    runner = web.AppRunner(build_webhook_app(log, secret or "", tolerance_s=tolerance_s, known=known))
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        logger.info("webhook: listening on http://{}:{}/events, writing to {}", host, port, log.path)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
