"""Every failure a change event can meet, and whether retrying can help. The one place that decides."""

from __future__ import annotations

from enum import StrEnum

import psycopg


class ErrorClass(StrEnum):
    # permanent: the event itself is wrong; retrying cannot help, so it is dead-lettered at once
    INVALID_JSON = "invalid_json"
    INVALID_EVENT = "invalid_event"
    UNKNOWN_OPERATION = "unknown_operation"
    MISSING_TEXT = "missing_text"
    EMPTY_TEXT = "empty_text"
    TEXT_REFUSED = "text_refused"
    DATABASE_REJECTED = "database_rejected"  # the row itself breaks a statement (not an outage)
    # transient: the world is wrong for now; retried with backoff, dead-lettered after the last attempt
    MODEL_ERROR = "model_error"
    MODEL_OUT_OF_MEMORY = "model_out_of_memory"
    DATABASE_UNAVAILABLE = "database_unavailable"
    TIMEOUT = "timeout"

    @property
    def permanent(self) -> bool:
        return self in _PERMANENT


_PERMANENT = frozenset(
    {
        ErrorClass.INVALID_JSON,
        ErrorClass.INVALID_EVENT,
        ErrorClass.UNKNOWN_OPERATION,
        ErrorClass.MISSING_TEXT,
        ErrorClass.EMPTY_TEXT,
        ErrorClass.TEXT_REFUSED,
        ErrorClass.DATABASE_REJECTED,
    }
)


class OperatorError(RuntimeError):
    """A failure the operator fixes by changing a setting or starting a service; its message says which.

    The CLI prints it without a traceback.
    """


class EventError(Exception):
    """A failure tied to one event, with its class."""

    def __init__(self, error_class: ErrorClass, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class


def classify(exc: BaseException) -> ErrorClass:
    """Map any exception raised while handling an event to its class."""
    if isinstance(exc, EventError):
        return exc.error_class
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return ErrorClass.MODEL_OUT_OF_MEMORY
    if isinstance(exc, TimeoutError):
        return ErrorClass.TIMEOUT
    if isinstance(exc, psycopg.OperationalError | psycopg.errors.AdminShutdown | OSError):
        return ErrorClass.DATABASE_UNAVAILABLE
    return ErrorClass.MODEL_ERROR


def is_database_outage(exc: BaseException) -> bool:
    """An error that says Postgres is unreachable (not that one statement is wrong)."""
    return isinstance(exc, psycopg.OperationalError | psycopg.errors.AdminShutdown | OSError | TimeoutError)
