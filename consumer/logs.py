"""structlog set-up: JSON lines to stdout in production, readable console output in a terminal.

Our loggers and the standard library's (aiokafka, psycopg, ...) end in one handler whose structlog
ProcessorFormatter renders both through the same processors, so with JSON configured every line is one
JSON object with level, logger, timestamp and event, tracebacks included.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

# Where our loggers live (get_logger names); libraries stay at WARNING.
OWN_LOGGER = "cdc_embedder"


class DemoteExpectedWaits(logging.Filter):
    """Lowers to INFO what aiokafka logs as a failure while a topic does not exist yet.

    aiokafka's cluster metadata logs ERROR "Topic ... not found in cluster metadata" whenever a metadata
    answer lacks a topic it asked for (a producer's or consumer's topic that Debezium has not created
    yet), and a WARNING while a new topic elects its leaders. Both are the normal wait that the service
    logs itself, and an ERROR would page someone. A demoted record is kept only where its logger is
    enabled for INFO, as if it had been logged at INFO.
    """

    LOGGER = "aiokafka.cluster"
    MESSAGES = frozenset(
        {
            "Topic %s not found in cluster metadata",  # UnknownTopicOrPartition in a metadata answer
            "Topic %s is not available during auto-create initialization",  # LeaderNotAvailable
        }
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.INFO or record.name != self.LOGGER or record.msg not in self.MESSAGES:
            return True
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


_DEMOTE = DemoteExpectedWaits()


def configure_logging(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=True)
    )
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    # the console renderer formats tracebacks itself
    final += [structlog.processors.format_exc_info, renderer] if as_json else [renderer]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)  # libraries: their warnings and errors only
    logging.getLogger(OWN_LOGGER).setLevel(level)
    logging.getLogger(DemoteExpectedWaits.LOGGER).addFilter(_DEMOTE)
    logging.captureWarnings(True)  # Python warnings (torch, transformers) as log lines too
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    """A structlog logger; `name` is under OWN_LOGGER ("cdc_embedder.service"), or it logs WARNING up."""
    return structlog.get_logger(name)
