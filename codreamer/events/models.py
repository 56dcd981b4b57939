"""What happened to a sent email, one event at a time, and per trajectory.

An `OnlineOutcome` is one event about one sent email (the email a trajectory ended with):
it was opened, replied to, bounced... Email tools report these one kind at a time and more
than once, so an outcome's flags are only ever *added* to a trajectory: `OutcomeSummary` is
the OR of every flag over all of a trajectory's events. `event_id` is the idempotency key:
the same event delivered twice (webhook retries, a file ingested twice) counts once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field, field_validator

FLAG_NAMES: tuple[str, ...] = ("opened", "replied", "bounced", "unsubscribed", "meeting_booked")
"""The outcome flags, in bit order: flag `FLAG_NAMES[i]` is bit `1 << i` of a flag mask."""

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class OnlineOutcome(BaseModel):
    """One event about one sent email. Timestamps are stored in UTC (naive input is UTC)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: str = Field(min_length=1, description="Idempotency key: a repeated id counts once.")
    trajectory_id: str
    prospect_id: str
    step: int = Field(ge=0, description="Training step of the policy that wrote the email.")
    timestamp: datetime
    opened: bool = False
    replied: bool = False
    bounced: bool = False
    unsubscribed: bool = False
    meeting_booked: bool = False
    source: str = Field(default="unknown", description='Who reported it: "simulator", "ingest", "webhook"...')

    @field_validator("timestamp")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        """Email tools often export naive times in UTC; one zone makes first/last comparable."""
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    @property
    def flag_mask(self) -> int:
        """The flags as a bit mask (see `FLAG_NAMES`), the form the event log aggregates."""
        return sum(1 << bit for bit, name in enumerate(FLAG_NAMES) if getattr(self, name))


class OutcomeSummary(BaseModel):
    """Everything known about one trajectory's email: the OR of its events' flags."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trajectory_id: str
    opened: bool = False
    replied: bool = False
    bounced: bool = False
    unsubscribed: bool = False
    meeting_booked: bool = False
    event_count: int = Field(ge=1)
    first_timestamp: datetime
    last_timestamp: datetime

    @classmethod
    def from_totals(cls, trajectory_id: str, flags: int, count: int, first_us: int, last_us: int) -> OutcomeSummary:
        """Build from the log's compact aggregate (flag mask, count, first/last in epoch microseconds)."""
        flag_values = {name: bool(flags >> bit & 1) for bit, name in enumerate(FLAG_NAMES)}
        return cls(
            trajectory_id=trajectory_id,
            event_count=count,
            first_timestamp=from_epoch_us(first_us),
            last_timestamp=from_epoch_us(last_us),
            **flag_values,
        )


def to_epoch_us(moment: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime (exact: no float rounding)."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def from_epoch_us(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)
