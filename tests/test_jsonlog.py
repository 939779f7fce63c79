"""The agent's JSON log: stdlib records from the agent's parts, as operators read them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from agent.accesslog import JsonLog, JsonLogHandler
from meshd.logevents import log_event


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    logger = logging.getLogger("meshd.test.jsonlog")
    handler = JsonLogHandler(JsonLog(out, level="debug"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_logged_event_is_one_line_with_its_name_and_fields(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = logged
    log_event(logger, logging.WARNING, "cert_failed", service="web", reason="no bundle")
    [line] = lines(out)
    assert line["event"] == "cert_failed"  # not the JSON text of the message
    assert (line["service"], line["reason"]) == ("web", "no bundle")
    assert (line["level"], line["logger"]) == ("warning", "meshd.test.jsonlog")


def test_the_message_is_the_same_event_as_json_for_plain_log_output() -> None:
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("meshd.test.jsonlog.plain")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log_event(logger, logging.INFO, "started", port=8501, datacenter="dc1")
        log_event(logger, logging.DEBUG, "below the level")
    finally:
        logger.removeHandler(handler)
    [record] = records  # the control plane prints "%(message)s": one JSON line
    assert json.loads(record.getMessage()) == {
        "event": "started",
        "port": 8501,
        "datacenter": "dc1",
    }


def test_an_event_cannot_set_the_time_level_or_logger(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = logged
    log_event(logger, logging.ERROR, "x", ts=1, level="debug", logger="meshd.other", n=2)
    [line] = lines(out)
    assert (line["event"], line["level"], line["logger"], line["n"]) == (
        "x", "error", "meshd.test.jsonlog", 2,
    )  # fmt: skip
    assert line["ts"] != 1


def test_message_text_is_never_read_back_as_an_event(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = logged
    forged = json.dumps({"event": "cert_failed", "level": "info"})
    logger.warning(forged)  # e.g. peer-controlled text that reached a message
    logger.warning("%s", forged)
    logger.info("plain words")
    assert [line["event"] for line in lines(out)] == ["message"] * 3
    assert [line["message"] for line in lines(out)] == [forged, forged, "plain words"]
    assert {line["level"] for line in lines(out)} == {"warning", "info"}


def test_the_agents_own_code_logs_only_named_events() -> None:
    """Every stdlib log call in the agent and the core it loads goes through log_event, so
    no line's event is free text (the handler's "message" fallback is for libraries)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    plain = []
    for package in ("agent", "meshd"):
        for path in sorted((root / package).rglob("*.py")):
            if "server" in path.relative_to(root).parts:
                continue  # the control plane prints messages as they are
            for number, text in enumerate(path.read_text().splitlines(), 1):
                stripped = text.strip()
                if stripped.startswith(("log.debug(", "log.info(", "log.warning(", "log.error(")):
                    plain.append(f"{path.relative_to(root)}:{number}: {stripped}")
    assert plain == []
