"""consumer.logs: our lines and the standard library's come out alike, one JSON object each."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from consumer.logs import OWN_LOGGER, DemoteExpectedWaits, configure_logging, get_logger

MISSING_TOPIC = "Topic %s not found in cluster metadata"  # aiokafka/cluster.py, at ERROR


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """configure_logging into a buffer; the logging and structlog set-up is restored afterwards."""
    root, own = logging.getLogger(), logging.getLogger(OWN_LOGGER)
    cluster = logging.getLogger(DemoteExpectedWaits.LOGGER)
    saved = (root.handlers[:], root.level, own.level, cluster.filters[:])
    yield io.StringIO()
    root.handlers, cluster.filters = saved[0], saved[3]
    root.setLevel(saved[1])
    own.setLevel(saved[2])
    logging.getLogger("aiokafka").setLevel(logging.NOTSET)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def _lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    text = buffer.getvalue()
    assert text.endswith("\n") or not text
    return [json.loads(line) for line in text.splitlines()]


def test_a_stdlib_record_is_one_json_object(stream: io.StringIO) -> None:
    configure_logging("INFO", "json", stream)
    logging.getLogger("aiokafka.consumer.group_coordinator").warning("heartbeat failed for %s", "g1")
    (line,) = _lines(stream)
    assert line["event"] == "heartbeat failed for g1"
    assert line["level"] == "warning"
    assert line["logger"] == "aiokafka.consumer.group_coordinator"
    assert line["timestamp"].endswith("Z")


def test_a_stdlib_traceback_stays_inside_its_json_line(stream: io.StringIO) -> None:
    configure_logging("INFO", "json", stream)
    try:
        raise ConnectionResetError("peer gone")
    except ConnectionResetError:
        logging.getLogger("psycopg.pool").exception("connection lost")
    (line,) = _lines(stream)
    assert line["level"] == "error" and line["logger"] == "psycopg.pool"
    assert "ConnectionResetError: peer gone" in line["exception"]


def test_our_lines_carry_level_logger_and_timestamp_too(stream: io.StringIO) -> None:
    configure_logging("INFO", "json", stream)
    get_logger(f"{OWN_LOGGER}.test").info("batch", events=3)
    get_logger(f"{OWN_LOGGER}.test").debug("hidden at INFO")
    (line,) = _lines(stream)
    assert {k: line[k] for k in ("event", "events", "level", "logger")} == {
        "event": "batch",
        "events": 3,
        "level": "info",
        "logger": f"{OWN_LOGGER}.test",
    }
    assert "timestamp" in line


def test_libraries_log_warnings_and_up_only(stream: io.StringIO) -> None:
    configure_logging("DEBUG", "json", stream)
    logging.getLogger("aiokafka.conn").info("connected")
    assert _lines(stream) == []


def test_a_missing_topic_is_not_an_error(stream: io.StringIO) -> None:
    configure_logging("INFO", "json", stream)
    logging.getLogger("aiokafka.cluster").error(MISSING_TOPIC, "cdc.public.documents")
    assert _lines(stream) == [], "dropped: aiokafka logs at WARNING and up, and it is INFO now"
    logging.getLogger("aiokafka").setLevel(logging.INFO)
    logging.getLogger("aiokafka.cluster").error(MISSING_TOPIC, "cdc.public.documents")
    (line,) = _lines(stream)
    assert line["level"] == "info"
    assert line["event"] == "Topic cdc.public.documents not found in cluster metadata"


def test_other_aiokafka_errors_stay_errors(stream: io.StringIO) -> None:
    configure_logging("INFO", "json", stream)
    logging.getLogger("aiokafka.cluster").error("Topic %s is not authorized for this client", "t")
    (line,) = _lines(stream)
    assert line["level"] == "error"


def test_configuring_twice_keeps_one_handler(stream: io.StringIO) -> None:
    configure_logging("INFO", "json", stream)
    configure_logging("INFO", "json", stream)
    logging.getLogger("aiokafka.cluster").warning("once")
    assert len(_lines(stream)) == 1
    filters = logging.getLogger(DemoteExpectedWaits.LOGGER).filters
    assert len([f for f in filters if isinstance(f, DemoteExpectedWaits)]) == 1
