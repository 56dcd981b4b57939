"""An HTTP endpoint where an email tool (or a relay) posts online outcomes as they happen.

`POST /events` takes one OnlineOutcome object or a list of them. The sender signs the raw body
with the shared secret: header `X-CoDreamer-Signature: sha256=<hex HMAC-SHA256>`. Checks run
cheapest first: size (413), signature (401), JSON (400), then every item is validated (400,
naming the item index and field) before anything is written, so a batch is all or nothing.
Accepted events go through `EventLog.append_new`: a retried delivery counts once, and the
reply says how many were new and how many were duplicates.

The secret is never logged, and never part of an error message.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any

from aiohttp import web
from loguru import logger
from pydantic import ValidationError

from codreamer.events.log import EventLog
from codreamer.events.models import OnlineOutcome

SIGNATURE_HEADER = "X-CoDreamer-Signature"
SIGNATURE_PREFIX = "sha256="
MAX_ITEM_ERRORS = 20

_LOG_KEY = web.AppKey("event_log", EventLog)
_SECRET_KEY = web.AppKey("secret", bytes)
_LOCK_KEY = web.AppKey("append_lock", asyncio.Lock)
_MAX_BODY_KEY = web.AppKey("max_body_bytes", int)


def sign(body: bytes, secret: str) -> str:
    """The header value a sender puts in `X-CoDreamer-Signature` for `body`."""
    return SIGNATURE_PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _signature_ok(body: bytes, header: str | None, secret: bytes) -> bool:
    if not header or not header.startswith(SIGNATURE_PREFIX):
        return False
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), header[len(SIGNATURE_PREFIX) :].strip().lower().encode())


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
    if not _signature_ok(body, request.headers.get(SIGNATURE_HEADER), request.app[_SECRET_KEY]):
        logger.warning("webhook: rejected a request from {} (missing or bad signature)", request.remote)
        return _error(401, f"missing or bad {SIGNATURE_HEADER} header (expected {SIGNATURE_PREFIX}<hex hmac of the body>)")
    try:
        payload = json.loads(body)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
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
    return web.json_response({"accepted": result.accepted, "duplicates": result.duplicates})


def build_webhook_app(log: EventLog, secret: str, max_body_bytes: int = 1_000_000) -> web.Application:
    """The aiohttp application serving `POST /events` into `log`."""
    if not secret:
        raise ValueError("the webhook needs a shared secret to verify signatures; none was given")
    app = web.Application(client_max_size=max_body_bytes)
    app[_LOG_KEY] = log
    app[_SECRET_KEY] = secret.encode()
    app[_LOCK_KEY] = asyncio.Lock()
    app[_MAX_BODY_KEY] = max_body_bytes
    app.router.add_post("/events", _post_events)
    return app


async def serve_events(log: EventLog, secret: str | None, host: str = "127.0.0.1", port: int = 8787) -> None:
    """Serve the webhook until cancelled. Refuses to start without a secret."""
    if not secret:
        raise ValueError("refusing to serve the events webhook without a shared secret: senders could not be verified")
    runner = web.AppRunner(build_webhook_app(log, secret))
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        logger.info("webhook: listening on http://{}:{}/events, writing to {}", host, port, log.path)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
