"""Structured events through stdlib ``logging``, for code the agent and the control plane share.

``log_event(log, logging.WARNING, "cert_failed", service=..., reason=...)`` logs the message
``{"event": "cert_failed", "service": ..., "reason": ...}``: JSON, so the control plane's
``%(message)s`` output is one JSON line per event. It also attaches the event and its fields
to the record, so the agent's JSON log (:class:`agent.accesslog.JsonLogHandler`) writes one
line with ``"event": "cert_failed"`` and those fields, rather than an event named by the whole
JSON text. Only records made here carry the attachment: no message text, whatever it holds,
is ever read back as an event.
"""

from __future__ import annotations

import json
import logging
from typing import Any

EVENT_ATTR = "meshd_event"


def log_event(log: logging.Logger, level: int, event: str, /, **fields: Any) -> None:
    """Log ``event`` with ``fields`` (JSON-serialisable; others are written with ``str``)."""
    if log.isEnabledFor(level):
        fields.pop("event", None)
        message = json.dumps({"event": event, **fields}, default=str)
        log.log(level, message, extra={EVENT_ATTR: (event, fields)})


def event_of(record: logging.LogRecord) -> tuple[str, dict[str, Any]] | None:
    """The event and fields :func:`log_event` attached to ``record``, or None."""
    attached = getattr(record, EVENT_ATTR, None)
    if (
        isinstance(attached, tuple)
        and len(attached) == 2
        and isinstance(attached[0], str)
        and isinstance(attached[1], dict)
    ):
        return attached[0], dict(attached[1])
    return None
