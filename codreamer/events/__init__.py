"""Online outcomes of sent emails: the model, the durable event log, and ways in (file ingest, webhook)."""

from codreamer.events.log import AppendResult, EventLog, MalformedLine, RefreshStats
from codreamer.events.models import FLAG_NAMES, OnlineOutcome, OutcomeSummary

__all__ = [
    "FLAG_NAMES",
    "AppendResult",
    "EventLog",
    "MalformedLine",
    "OnlineOutcome",
    "OutcomeSummary",
    "RefreshStats",
]
