"""TEST DOUBLE: a loopback HTTP server that RECORDS what Weave's own client sends.

Not a Weave trace server: it stores nothing, queries nothing, and answers each request with
the smallest body Weave's client accepts (a digest for objects and files, ids for calls).
Every JSON request is kept in `requests` as (path, body). `weave_client(server)` builds
Weave's real `WeaveClient` over Weave's real HTTP binding (`RemoteHTTPTraceServer`, with
batching, as `weave.init` does) pointed at this server, and makes it the global client, so
ops and `client.server.call_start/call_end` go through Weave's own code up to the wire.

What a real server does that this one does not: authentication, project creation and
permission checks, validation of ids/op names/refs, merging call starts and ends (and
duplicates of them) by call id, storing files and objects, and the UI.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class RecordingWeaveServer:
    """TEST DOUBLE: records the Weave client's requests; answers minimally (module docstring)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                return None

            def _reply(self, body: Any, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                with recorder._lock:
                    recorder.requests.append((self.path, None))
                self._reply(recorder.answer(self.path, None))

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = {"_bytes": len(raw)}  # multipart file uploads
                with recorder._lock:
                    recorder.requests.append((self.path, body))
                self._reply(recorder.answer(self.path, body))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def answer(self, path: str, body: Any) -> Any:
        """The smallest answer Weave's client accepts for `path`."""
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:32]
        if path.endswith("/call/start"):
            start = (body or {}).get("start", {})
            return {"id": start.get("id") or str(uuid.uuid4()), "trace_id": start.get("trace_id") or str(uuid.uuid4())}
        if path.endswith("/call/upsert_batch"):
            return {"res": [{"req": item, "res": {}} for item in (body or {}).get("batch", [])]}
        if path.endswith(("/obj/create", "/file/create", "/table/create")):
            return {"digest": digest}
        if path.endswith("/server_info"):
            return {"min_required_weave_python_version": "0.0.0"}
        return {}

    def calls(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(call starts, call ends) received, whichever endpoint carried them."""
        starts: list[dict[str, Any]] = []
        ends: list[dict[str, Any]] = []
        for path, body in list(self.requests):
            if not isinstance(body, dict):
                continue
            if path.endswith("/call/start"):
                starts.append(body["start"])
            elif path.endswith("/call/end"):
                ends.append(body["end"])
            elif path.endswith("/call/upsert_batch"):
                for item in body.get("batch", []):
                    req = item.get("req", {})
                    if item.get("mode") == "start":
                        starts.append(req["start"])
                    elif item.get("mode") == "end":
                        ends.append(req["end"])
            elif path.endswith(("/calls/complete", "/call/complete")):
                for call in body.get("batch", body.get("calls", [])):
                    starts.append(call)
                    ends.append(call)
        return starts, ends

    def __enter__(self) -> RecordingWeaveServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def weave_client(server: RecordingWeaveServer, project: str = "team/codreamer") -> Iterator[Any]:
    """Weave's own client over its own HTTP binding, pointed at `server`, as the global client."""
    from weave.trace.context import weave_client_context
    from weave.trace.weave_client import WeaveClient
    from weave.trace_server_bindings.remote_http_trace_server import RemoteHTTPTraceServer

    from codreamer.tracking import compact_inputs, compact_payload

    entity, name = project.split("/")
    saved = {name: os.environ.get(name) for name in ("WEAVE_ENABLE_WAL", "WEAVE_DISABLED")}
    os.environ["WEAVE_ENABLE_WAL"] = "false"  # straight to the wire, never to ~/.weave/wal
    # An earlier run in this process (an offline loop test) may have left ops switched off.
    os.environ["WEAVE_DISABLED"] = "false"
    client = WeaveClient(
        entity,
        name,
        RemoteHTTPTraceServer(server.url, should_batch=True),
        ensure_project_exists=False,
        postprocess_inputs=compact_inputs,
        postprocess_output=compact_payload,
    )
    weave_client_context.set_weave_client_global(client)
    try:
        yield client
    finally:
        client.flush()
        weave_client_context.set_weave_client_global(None)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
