"""consumer.errors.diagnose: what a failure of a whole batch means, and which setting or grant fixes it."""

from __future__ import annotations

import psycopg
import psycopg_pool
import pytest
from aiokafka import errors as kafka

from consumer.errors import Disposition, RowsRejected, describe, diagnose, is_kafka_retriable
from consumer.settings import Settings

SETTINGS = Settings()


def sender_died_of(cause: kafka.KafkaError) -> kafka.KafkaError:
    wrapper = kafka.KafkaError("Unexpected error during batch delivery")
    wrapper.__cause__ = cause
    return wrapper


@pytest.mark.parametrize(
    "exc",
    [
        kafka.KafkaConnectionError("connection refused"),
        kafka.RequestTimedOutError(),
        kafka.NodeNotReadyError(),
        kafka.KafkaTimeoutError(),
        kafka.LeaderNotAvailableError(),
        kafka.NotEnoughReplicasError(),
        kafka.NotCoordinatorForGroupError(),
        TimeoutError(),
        ConnectionResetError(),
    ],
)
def test_retriable_kafka_errors(exc: BaseException) -> None:
    assert is_kafka_retriable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        kafka.TopicAuthorizationFailedError(),
        kafka.MessageSizeTooLargeError(),
        kafka.InvalidTopicError(),
        kafka.ProducerFenced(),
        kafka.KafkaError("unexpected"),
    ],
)
def test_permanent_kafka_errors(exc: BaseException) -> None:
    assert not is_kafka_retriable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        kafka.ProducerFenced(),
        kafka.InvalidProducerEpoch(),
        kafka.OutOfOrderSequenceNumber(),
        kafka.InvalidTxnState(),
        sender_died_of(kafka.InvalidTxnState()),
        kafka.MessageSizeTooLargeError(),  # only a broker's refusal gets this far: its sequence is spent
    ],
)
def test_a_lost_transactional_state_rebuilds_the_producer(exc: kafka.KafkaError) -> None:
    assert diagnose(exc, SETTINGS).disposition is Disposition.PRODUCER


@pytest.mark.parametrize(
    "exc",
    [kafka.KafkaConnectionError(), kafka.IllegalGenerationError(), kafka.RebalanceInProgressError()],
)
def test_transient_kafka_errors_are_outages(exc: kafka.KafkaError) -> None:
    diagnosis = diagnose(exc, SETTINGS)
    assert (diagnosis.disposition, diagnosis.database) == (Disposition.OUTAGE, False)


@pytest.mark.parametrize(
    ("exc", "fix"),
    [
        (
            kafka.TopicAuthorizationFailedError(),
            "Read on cdc.public.documents and cdc-embedder.retry and Write on "
            "cdc-embedder.retry and cdc-embedder.dlq",
        ),
        (
            kafka.GroupAuthorizationFailedError(),
            "Read on the consumer group cdc-embedder (CDC_CONSUMER_GROUP)",
        ),
        (kafka.TransactionalIdAuthorizationFailed(), "transactional ids prefixed cdc-embedder-"),
        (kafka.ClusterAuthorizationFailedError(), "IdempotentWrite on the cluster"),
        (kafka.SaslAuthenticationFailed(), "CDC_KAFKA_SASL_USERNAME and CDC_KAFKA_SASL_PASSWORD"),
        (kafka.InvalidTopicError(), "CDC_TOPIC_PREFIX"),
        (kafka.PolicyViolationError(), "the broker's log"),
    ],
)
def test_kafka_refusals_are_operator_errors_naming_the_fix(exc: kafka.KafkaError, fix: str) -> None:
    diagnosis = diagnose(exc, SETTINGS)
    assert diagnosis.disposition is Disposition.OPERATOR
    assert fix in diagnosis.fix


@pytest.mark.parametrize(
    ("exc", "cause", "fix"),
    [
        (
            psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction"),
            "the database is read-only",
            "point CDC_DATABASE_URL at the primary",
        ),
        (
            psycopg.errors.InsufficientPrivilege("permission denied for table document_embeddings"),
            "lacks a privilege",
            "GRANT SELECT, INSERT, UPDATE, DELETE ON public.document_embeddings, SELECT, INSERT, UPDATE ON "
            "public.cdc_embedder_targets and SELECT ON public.documents",
        ),
        (
            psycopg.errors.UndefinedTable('relation "x" does not exist'),
            "a table is missing",
            "CDC_VECTOR_TABLE",
        ),
        (
            psycopg.errors.UndefinedColumn('column "body" does not exist'),
            "a column is missing",
            "CDC_TEXT_COLUMNS",
        ),
        (psycopg.errors.UndefinedObject('type "vector" does not exist'), "type", "CREATE EXTENSION vector"),
        (psycopg.errors.InvalidPassword("password authentication failed"), "credentials", "CDC_DATABASE_URL"),
        (
            psycopg.errors.InvalidCatalogName('database "x" does not exist'),
            "no such database",
            "database name",
        ),
        (psycopg.errors.FeatureNotSupported("no"), "refuses the consumer's statements", "SQLSTATE 0A000"),
    ],
)
def test_database_refusals_are_operator_errors_naming_the_fix(
    exc: psycopg.Error, cause: str, fix: str
) -> None:
    diagnosis = diagnose(exc, SETTINGS)
    assert (diagnosis.disposition, diagnosis.database) == (Disposition.OPERATOR, True)
    assert cause in diagnosis.cause and fix in diagnosis.fix
    assert exc.sqlstate in diagnosis.cause  # the database's own words are kept


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("connection failed"),
        psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
        psycopg_pool.PoolTimeout("couldn't get a connection after 10.00 sec"),
        psycopg.InterfaceError("the connection is closed"),
        ConnectionRefusedError(),
        TimeoutError(),
    ],
)
def test_an_unreachable_database_is_an_outage(exc: BaseException) -> None:
    diagnosis = diagnose(exc, SETTINGS)
    assert (diagnosis.disposition, diagnosis.database) == (Disposition.OUTAGE, True)


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.errors.NotNullViolation('null value in column "embedding"'),
        psycopg.errors.NumericValueOutOfRange("integer out of range"),
        psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"),  # psycopg's own
    ],
)
def test_values_the_database_rejects_belong_to_a_record(exc: psycopg.Error) -> None:
    assert diagnose(exc, SETTINGS).disposition is Disposition.RECORD


def test_a_table_that_rejects_every_record_is_an_operator_error() -> None:
    diagnosis = diagnose(RowsRejected(psycopg.errors.NotNullViolation("null value")), SETTINGS)
    assert diagnosis.disposition is Disposition.OPERATOR
    assert "NotNullViolation (23502)" in diagnosis.cause and "public.document_embeddings" in diagnosis.fix


def test_an_unknown_failure_is_held_with_its_traceback() -> None:
    diagnosis = diagnose(TypeError("'NoneType' object is not subscriptable"), SETTINGS)
    assert (diagnosis.disposition, diagnosis.unexpected) == (Disposition.OPERATOR, True)


def test_describe() -> None:
    assert describe(psycopg.errors.UndefinedTable("relation x\nLINE 1: ...")) == (
        "UndefinedTable (42P01): relation x"
    )
    assert describe(ValueError()) == "ValueError"
