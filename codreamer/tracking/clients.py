"""The boundary to the wandb and weave libraries: what CoDreamer needs of them, nothing more.

`WandbClient` / `WeaveClient` are the interfaces; `WandbLibrary` / `WeaveLibrary` the real
libraries (imported only when a run is started); tests replace them with recording doubles.
`NO_WEAVE` is the stand-in a session holds when Weave is not running, so that closing a
session needs no mode check. `bounded` runs a library call that may hang on the network.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlparse


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

    def init(
        self, project: str, *, postprocess_inputs: Callable[..., Any], postprocess_output: Callable[..., Any]
    ) -> None:
        import weave

        weave.init(project, postprocess_inputs=postprocess_inputs, postprocess_output=postprocess_output)

    def flush(self) -> None:
        import weave

        client = weave.get_client()
        if client is not None:
            client.flush()


class NoWeave:
    """Weave that is not running: nothing to start, nothing to flush."""

    def init(
        self, project: str, *, postprocess_inputs: Callable[..., Any], postprocess_output: Callable[..., Any]
    ) -> None:
        return None

    def flush(self) -> None:
        return None


NO_WEAVE = NoWeave()


def bounded(fn: Callable[[], Any], timeout_s: float, name: str) -> tuple[bool, Any, BaseException | None]:
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


def short(exc: BaseException | str) -> str:
    """One line of at most 200 characters: what a warning says of a library's error."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:200]
