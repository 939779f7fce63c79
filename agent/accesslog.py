"""JSON-lines logging: one access-log line per proxied connection, plus agent events.

Lines go to stderr (journald captures them under systemd). Values are JSON-encoded, so a
peer-controlled string can never inject a line break; nothing secret is ever passed here.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

from meshd.logevents import event_of

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class JsonLog:
    """A minimal structured logger writing one JSON object per line."""

    def __init__(self, stream: IO[str] | None = None, *, level: str = "info") -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._threshold = _LEVELS.get(level, 20)
        # Lines written by a data-path worker say which (``[proxy] workers``).
        self._context: dict[str, Any] = {}

    def for_worker(self, worker: int) -> JsonLog:
        """The same log, every line marked ``"worker": worker``."""
        log = JsonLog(self._stream)
        log._threshold, log._context = self._threshold, {"worker": worker}
        return log

    def _write(self, record: dict[str, Any]) -> None:
        try:
            self._stream.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            # A closed or full log stream must never take the data path down with it.
            pass

    def event(self, event: str, *, level: str = "info", **fields: Any) -> None:
        """Log an agent event (``{"ts":…, "level":…, "event":…, …fields}``)."""
        if _LEVELS.get(level, 20) < self._threshold:
            return
        record = {"ts": round(time.time(), 6), "level": level, "event": event}
        self._write({**record, **self._context, **fields})

    def access(self, **fields: Any) -> None:
        """Log one finished connection (``"event": "access"``)."""
        record = {"ts": round(time.time(), 6), "level": "info", "event": "access"}
        self._write({**record, **self._context, **fields})


class JsonLogHandler(logging.Handler):
    """Routes the stdlib ``logging`` records of the agent's parts into the JSON log.

    A record made by :func:`meshd.logevents.log_event` becomes its event with its fields;
    they cannot set ``ts``, ``level`` or ``logger``. Any other record (the agent's own code
    logs only events; this is for what a library might log under ``meshd.*``) becomes the
    event ``"message"`` with the text in ``"message"``: event names stay a closed set that
    operators can filter on.
    """

    def __init__(self, log: JsonLog) -> None:
        super().__init__()
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        event, fields = event_of(record) or ("message", {"message": record.getMessage()})
        fields = {k: v for k, v in fields.items() if k not in _RESERVED}
        fields["logger"] = record.name
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        self._log.event(event, level=level if level in _LEVELS else "error", **fields)


_RESERVED = frozenset({"ts", "level", "event", "logger"})


def install_json_logging(log: JsonLog, level: str) -> None:
    """Send every ``meshd.*`` stdlib log record through *log* as JSON lines."""
    root = logging.getLogger("meshd")
    root.handlers[:] = [JsonLogHandler(log)]
    root.setLevel(level.upper())
    root.propagate = False
