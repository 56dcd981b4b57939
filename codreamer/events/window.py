"""The attribution window: a sent email without a reply for long enough counts as "no reply".

Email tools report what happened, never what did not: silence has to be decided. After
`window_iterations` iterations (or `window_s` seconds) since an outbox entry was sent, an email
whose events say neither "replied" nor "meeting booked" gets one event of its own, source
`window`, with every flag false. Its id is `window-<run id>-<trajectory id>`, so it is written
once (`EventLog` counts an id once, and `no_reply_events` skips ids already in the log). An email
with no event at all thereby gets an online score (unopened); one that was opened keeps it (flags
are OR-ed). A reply arriving after the window still counts: its flags are added as usual.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from codreamer.events.models import OnlineOutcome
from codreamer.events.outbox import OutboxEntry

WINDOW_SOURCE = "window"


def window_event_id(run_id: str, trajectory_id: str) -> str:
    return f"window-{run_id}-{trajectory_id}"


def no_reply_events(
    entries: Sequence[OutboxEntry],
    summaries: Mapping[str, Any],
    seen: Any,
    *,
    iteration: int,
    window_iterations: int | None,
    window_s: float | None,
    now: datetime | None = None,
) -> list[OnlineOutcome]:
    """The "no reply" events due: entries past the window (either limit), without a reply, and
    without a window event yet (`event_id in seen`)."""
    now = now or datetime.now(UTC)
    events = []
    for entry in entries:
        by_iterations = window_iterations is not None and iteration - entry.iteration >= window_iterations
        by_time = window_s is not None and now - entry.sent_at >= timedelta(seconds=window_s)
        if not (by_iterations or by_time):
            continue
        summary = summaries.get(entry.trajectory_id)
        if summary is not None and (summary.replied or summary.meeting_booked):
            continue
        event_id = window_event_id(entry.run_id, entry.trajectory_id)
        if event_id in seen:
            continue
        events.append(
            OnlineOutcome(
                event_id=event_id,
                trajectory_id=entry.trajectory_id,
                prospect_id=entry.prospect_id,
                step=entry.step,
                timestamp=now,
                source=WINDOW_SOURCE,
            )
        )
    return events
