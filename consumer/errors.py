"""Every failure a change event or a batch can meet, and what helps. The one place that decides.

`classify` maps a failure of one event to its class (retry or dead-letter it); `diagnose` maps a failure
of a whole batch to what the consumer loop does about it: wait out an outage, hold for an operator with
the fix named, isolate the record the database rejects, or rebuild the transactional producer.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import psycopg
from aiokafka import errors as kafka_errors
from aiokafka.errors import KafkaError

from consumer.settings import Settings, env_name


class ErrorClass(StrEnum):
    # permanent: the event itself is wrong; retrying cannot help, so it is dead-lettered at once
    INVALID_JSON = "invalid_json"
    INVALID_EVENT = "invalid_event"
    UNKNOWN_OPERATION = "unknown_operation"
    MISSING_TEXT = "missing_text"
    MODEL_REJECTED = "model_rejected"  # the embedding server refuses this input (400), with its reason
    DATABASE_REJECTED = "database_rejected"  # the row itself breaks a statement (not an outage)
    NO_PIPELINE = "no_pipeline"  # a retry record of a topic no declared pipeline reads (any more)
    TEXT_TOO_LONG = "text_too_long"  # over CDC_MAX_TEXT_CHARS: the row's vectors removed, replayable
    # transient: the world is wrong for now; retried with backoff, dead-lettered after the last attempt
    MODEL_ERROR = "model_error"
    MODEL_OUT_OF_MEMORY = "model_out_of_memory"
    MODEL_UNAVAILABLE = "model_unavailable"  # the embedding server kept failing (5xx, resets) in place
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
        ErrorClass.MODEL_REJECTED,
        ErrorClass.DATABASE_REJECTED,
        ErrorClass.NO_PIPELINE,
        ErrorClass.TEXT_TOO_LONG,
    }
)


class OperatorError(RuntimeError):
    """A failure the operator fixes by changing a setting or starting a service; its message says which.

    The CLI prints it without a traceback.
    """


class EmbedderConfigError(OperatorError):
    """The embedding server refuses our configuration (key, model, dimension): only an operator helps.

    `fix` names the setting; the batch stays uncommitted and is tried again after a pause."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


class Backpressure(Exception):
    """The embedding server rate-limits us: wait `retry_after_s`, then send the same texts again."""

    def __init__(self, retry_after_s: float, message: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TransientEmbedError(Exception):
    """A 5xx, a timeout or a dropped connection of the embedding server: the same request may succeed.

    `unreachable`: no connection could be made at all. Then the server is down, not failing on these
    texts, and the batch is held like one during a database outage; routing its texts through the retry
    topic would dead-letter every change of an outage longer than the retry backoff.
    """

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


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
    if isinstance(exc, TransientEmbedError | Backpressure):
        return ErrorClass.MODEL_UNAVAILABLE
    if isinstance(exc, TimeoutError):
        return ErrorClass.TIMEOUT
    if isinstance(exc, psycopg.OperationalError | psycopg.errors.AdminShutdown | OSError):
        return ErrorClass.DATABASE_UNAVAILABLE
    return ErrorClass.MODEL_ERROR


# --- failures of a whole batch -------------------------------------------------------------------


class Disposition(StrEnum):
    OUTAGE = "outage"  # Postgres or the broker is unreachable for now: hold the batch, pause, retry
    OPERATOR = "operator"  # a setting, grant or table is wrong: hold, pause, not ready, retry until fixed
    RECORD = "record"  # one record's values break the statement: isolate it and dead-letter it
    PRODUCER = "producer"  # the transactional producer cannot go on: rebuild it, then retry the batch


@dataclass(frozen=True, slots=True)
class Diagnosis:
    disposition: Disposition
    cause: str  # what is wrong, with the error's own words
    fix: str = ""  # the setting, grant or table to change (operator errors)
    database: bool = False  # a failure of Postgres, not of Kafka
    unexpected: bool = False  # no known failure: its traceback is worth logging

    @property
    def explained(self) -> str:
        return f"{self.cause}: {self.fix}" if self.fix else self.cause


class RowsRejected(Exception):
    """The database rejected every record of a batch on its own: the table, not the records, is wrong."""

    def __init__(self, first: BaseException) -> None:
        super().__init__(describe(first))


def rebuilt_in_vain(diagnosis: Diagnosis) -> Diagnosis:
    """A rebuilt producer failed the same way: something outside keeps breaking it."""
    return Diagnosis(
        Disposition.OPERATOR,
        f"{diagnosis.cause}, again after the producer was rebuilt",
        "another consumer may use the same transactional id (group, hostname and pid: give each its "
        "own hostname), or a batch outlasts the transaction timeout (60 s: lower "
        f"{env_name('batch_max_events')})",
    )


def describe(exc: BaseException) -> str:
    """The exception's class, SQLSTATE if any and first line: enough for a log line or a header."""
    sqlstate = getattr(exc, "sqlstate", None)
    name = f"{type(exc).__name__} ({sqlstate})" if sqlstate else type(exc).__name__
    first_line = str(exc).strip().split("\n", 1)[0]
    return f"{name}: {first_line}" if first_line else name


def diagnose(exc: BaseException, settings: Settings) -> Diagnosis:
    """What a failure of a whole batch means for the consumer loop, and who fixes it."""
    if isinstance(exc, RowsRejected):
        return Diagnosis(
            Disposition.OPERATOR,
            f"the database rejects every record ({exc})",
            f"check the columns and constraints of {settings.vector_table} against what cdc-embedder "
            f"writes (it creates the table, keyed like {settings.source_table}, when none exists)",
            database=True,
        )
    if isinstance(exc, EmbedderConfigError):
        return Diagnosis(Disposition.OPERATOR, f"the embedding server refuses us ({exc})", exc.fix)
    if isinstance(exc, Backpressure | TransientEmbedError):
        # still rate-limited (or failing) after the pipeline waited in place: pause everything and retry
        return Diagnosis(Disposition.OUTAGE, f"embedding server unavailable ({describe(exc)})")
    if isinstance(exc, KafkaError):
        return _diagnose_kafka(_unwrapped(exc), settings)
    if isinstance(exc, psycopg.Error):
        return _diagnose_database(exc, settings)
    if isinstance(exc, OSError | TimeoutError):  # the pool's sockets and timeouts
        return Diagnosis(Disposition.OUTAGE, f"database unavailable ({describe(exc)})", database=True)
    return Diagnosis(
        Disposition.OPERATOR,
        f"unexpected {describe(exc)}",
        "a bug in cdc-embedder: report it with this log line",
        unexpected=True,
    )


# --- Kafka ---------------------------------------------------------------------------------------

# The producer's transactional state is lost: only a new producer (a new epoch) can go on.
_PRODUCER_FATAL = (
    kafka_errors.ProducerFenced,
    kafka_errors.InvalidProducerEpoch,
    kafka_errors.OutOfOrderSequenceNumber,
    kafka_errors.InvalidTxnState,
    kafka_errors.InvalidProducerIdMapping,
    kafka_errors.UnknownProducerId,
    kafka_errors.TransactionCoordinatorFenced,
    kafka_errors.ProducerClosed,
    # a copy the broker refused as too large: its sequence number is spent, so the producer's next
    # record to that partition would be out of order; a new producer publishes a reference instead
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
)
# The group moved on: retry, and the loop's fencing check drops the batch if its partitions moved.
_REBALANCE = (
    kafka_errors.CommitFailedError,
    kafka_errors.IllegalGenerationError,
    kafka_errors.UnknownMemberIdError,
    kafka_errors.RebalanceInProgressError,
)
_AUTHENTICATION = (
    kafka_errors.AuthenticationFailedError,
    kafka_errors.AuthenticationMethodNotSupported,
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.UnsupportedSaslMechanismError,
    kafka_errors.IllegalSaslStateError,
)


def is_kafka_retriable(exc: BaseException) -> bool:
    """A Kafka failure that passes by itself: aiokafka says so (`retriable`), or no broker answered."""
    if isinstance(exc, kafka_errors.KafkaTimeoutError | kafka_errors.KafkaUnavailableError | TimeoutError):
        return True
    return isinstance(exc, KafkaError | ConnectionError) and getattr(exc, "retriable", True)


def is_producer_fatal(exc: BaseException) -> bool:
    """The transactional producer cannot be used again: a new one must replace it."""
    return isinstance(exc, KafkaError) and isinstance(_unwrapped(exc), _PRODUCER_FATAL)


def _unwrapped(exc: KafkaError) -> KafkaError:
    """aiokafka's sender wraps what killed it in a plain KafkaError; the cause says what it was."""
    while type(exc) is KafkaError and isinstance(exc.__cause__, KafkaError):
        exc = exc.__cause__
    return exc


def _diagnose_kafka(exc: KafkaError, s: Settings) -> Diagnosis:
    said = describe(exc)
    if is_producer_fatal(exc):
        return Diagnosis(Disposition.PRODUCER, f"the transactional producer cannot go on ({said})")
    if is_kafka_retriable(exc) or isinstance(exc, _REBALANCE):
        return Diagnosis(Disposition.OUTAGE, f"Kafka unavailable ({said})")
    group = env_name("consumer_group")
    if isinstance(exc, kafka_errors.TopicAuthorizationFailedError):
        fix = (
            f"grant this principal Read on {s.source_topic} and {s.retry_topic} and Write on "
            f"{s.retry_topic} and {s.dlq_topic} (Kafka ACLs)"
        )
    elif isinstance(exc, kafka_errors.GroupAuthorizationFailedError):
        fix = f"grant this principal Read on the consumer group {s.consumer_group} ({group})"
    elif isinstance(exc, kafka_errors.TransactionalIdAuthorizationFailed):
        fix = f"grant this principal Write and Describe on transactional ids prefixed {s.consumer_group}-"
    elif isinstance(exc, kafka_errors.ClusterAuthorizationFailedError):
        fix = "grant this principal IdempotentWrite on the cluster"
    elif isinstance(exc, _AUTHENTICATION):
        fix = (
            f"check {env_name('kafka_security_protocol')}, {env_name('kafka_sasl_mechanism')}, "
            f"{env_name('kafka_sasl_username')} and {env_name('kafka_sasl_password')}"
        )
    elif isinstance(exc, kafka_errors.InvalidTopicError):
        fix = f"a topic name is invalid: check {env_name('topic_prefix')} and {env_name('source_table')}"
    else:
        fix = "see the broker's log for why it refuses the request"
    return Diagnosis(Disposition.OPERATOR, f"Kafka refuses the consumer ({said})", fix)


# --- Postgres ------------------------------------------------------------------------------------


def _diagnose_database(exc: psycopg.Error, s: Settings) -> Diagnosis:
    said = describe(exc)
    errors = psycopg.errors
    if isinstance(exc, psycopg.DataError | psycopg.IntegrityError):
        return Diagnosis(Disposition.RECORD, said, database=True)
    url = env_name("database_url")
    state = exc.sqlstate or ""
    if isinstance(exc, errors.ReadOnlySqlTransaction):
        cause, fix = (
            "the database is read-only (a standby, after a failover?)",
            f"point {url} at the primary (libpq's target_session_attrs=read-write finds it)",
        )
    elif isinstance(exc, errors.InsufficientPrivilege):
        cause, fix = (
            "the consumer's database role lacks a privilege",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {s.vector_table}, SELECT, INSERT, UPDATE ON "
            f"{s.target[0]}.cdc_embedder_targets and SELECT ON {s.source_table} to the role of {url} "
            "(deploy/sql/roles.sql)",
        )
    elif isinstance(exc, errors.UndefinedTable | errors.InvalidSchemaName):
        cause, fix = (
            "a table is missing",
            f"restore {s.source_table} or {s.vector_table} (cdc-embedder creates the vector table when it "
            f"starts), or fix {env_name('source_table')} and {env_name('vector_table')}",
        )
    elif isinstance(exc, errors.UndefinedColumn):
        cause, fix = (
            "a column is missing",
            f"check the key and text column settings ({env_name('key_columns')}, "
            f"{env_name('text_columns')}) against "
            f"{s.source_table}, and the columns of {s.vector_table}",
        )
    elif isinstance(exc, errors.UndefinedObject | errors.UndefinedFunction):
        cause, fix = "a type or function is missing", "CREATE EXTENSION vector in the database (pgvector)"
    elif state.startswith("28"):
        cause, fix = "the database refuses the credentials", f"fix the user and password in {url}"
    elif state.startswith("3D"):
        cause, fix = "no such database", f"fix the database name in {url}"
    elif isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return Diagnosis(Disposition.OUTAGE, f"database unavailable ({said})", database=True)
    else:
        cause, fix = "the database refuses the consumer's statements", f"see SQLSTATE {state} in its log"
    return Diagnosis(Disposition.OPERATOR, f"{cause} ({said})", fix, database=True)
