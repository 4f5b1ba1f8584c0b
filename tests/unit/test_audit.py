"""consumer.ops.audit and ops.repair without a database: how a key is classified, what is reported, and
the key condition a repair's snapshot asks Debezium for."""

from __future__ import annotations

import asyncio

import pytest

from consumer.databases import Databases
from consumer.events import source_row_text
from consumer.ops.audit import Auditor, AuditReport, AuditTarget, Drift, Finding, VectorRow, audit, classify
from consumer.ops.repair import FILTER_CHARS, key_filter
from consumer.schema import TableInfo
from consumer.sink import text_hash

MODEL = "thenlper/gte-small"
TARGET = AuditTarget(
    ("public", "documents"),
    ("public", "document_embeddings"),
    TableInfo(("id",), ("bigint",)),
    ("title", "body"),
    MODEL,
    max_text_chars=20,
)
TEXT = source_row_text(["A title", " a body "], TARGET.text_columns)


def vector(
    text: str = TEXT, model: str | None = MODEL, deleted: bool = False, has_vector: bool = True
) -> VectorRow:
    return VectorRow(text_hash(model or "", text), model, deleted, has_vector and not deleted, position=7)


@pytest.mark.parametrize(
    ("text", "row", "expected"),
    [
        (TEXT, vector(), None),
        (TEXT, None, Drift.MISSING),
        (TEXT, vector(deleted=True), Drift.MISSING),  # a tombstone of a row that exists
        (TEXT, vector(has_vector=False), Drift.MISSING),  # cleared, though it has text now
        (TEXT, vector(text="older text"), Drift.STALE),
        (TEXT, vector(model="another/model"), Drift.WRONG_MODEL),
        ("", None, None),  # no text, no vector: correct
        ("", vector(has_vector=False), None),
        ("", vector(), Drift.STALE),  # a vector of text the row no longer has
        ("x" * 21, vector(text="x" * 21), Drift.STALE),  # over the limit: must have no vector
        ("x" * 21, None, None),
        (None, vector(deleted=True), None),  # a tombstone is no orphan
        (None, vector(), Drift.ORPHANED),
        (None, vector(has_vector=False), Drift.ORPHANED),
        (None, None, None),
    ],
)
def test_classify(text: str | None, row: VectorRow | None, expected: Drift | None) -> None:
    assert classify(text, row, TARGET) is expected


def test_the_hash_is_the_consumers_of_the_joined_text() -> None:
    assert TEXT == "A title\n\na body"
    assert (
        classify(TEXT, VectorRow(text_hash(MODEL, "A title\n\na body"), MODEL, False, True, 1), TARGET)
        is None
    )


def test_the_report_counts_every_kind_and_samples_keys() -> None:
    report = AuditReport(
        [Finding((str(i),), Drift.MISSING, None) for i in range(12)]
        + [Finding(("x",), Drift.ORPHANED, None)],
        source_rows=40,
        embeddable_rows=30,
        settled=2,
    )
    assert report.counts() == {Drift.MISSING: 12, Drift.ORPHANED: 1, Drift.STALE: 0, Drift.WRONG_MODEL: 0}
    lines = report.describe(sample=3)
    assert lines[0].startswith("audited 40 source rows (30 with text to embed)")
    assert "2 changes in flight settled" in lines[0]
    assert lines[1:] == [
        "missing      12  e.g. 0, 1, 2",
        "orphaned     1  e.g. x",
        "stale        0",
        "wrong_model  0",
    ]


class Scripted:
    """A connection answering each query with the next scripted rows."""

    def __init__(self, *answers: list[tuple[object, ...]]) -> None:
        self.answers = list(answers)

    async def execute(self, *_: object) -> Scripted:
        return self

    async def fetchall(self) -> list[tuple[object, ...]]:
        return self.answers.pop(0)


def stored(text: str) -> tuple[object, ...]:
    return (text_hash(MODEL, text), MODEL, False, True, 7)


def test_drift_that_resolves_within_the_settle_delay_is_in_flight_not_drift() -> None:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    conn = Scripted(
        [("1", "A title", " a body "), ("2", "new", "text")],  # the source's only range
        [("1", *stored(TEXT))],  # its vectors: row 2's event is not applied yet
        [("2", "new", "text")],  # after the delay: row 2 again ...
        [("2", *stored("new\n\ntext"))],  # ... and its vector, now there
    )
    report = asyncio.run(audit(Databases(conn, conn), TARGET, 100, settle_s=10, sleep=sleep))  # type: ignore[arg-type]
    assert slept == [10] and report.findings == [] and report.settled == 1 and report.source_rows == 2


def test_drift_that_stays_is_reported_and_no_drift_means_no_delay() -> None:
    async def sleep(_: float) -> None:
        return None

    conn = Scripted(
        [("1", "A title", "x")], [("1", *stored(TEXT))], [("1", "A title", "x")], [("1", *stored(TEXT))]
    )
    report = asyncio.run(audit(Databases(conn, conn), TARGET, 100, settle_s=10, sleep=sleep))  # type: ignore[arg-type]
    assert [(f.key, f.kind) for f in report.findings] == [(("1",), Drift.STALE)] and report.settled == 0

    async def never(_: float) -> None:
        raise AssertionError("slept without drift")

    empty = Scripted([], [])
    report = asyncio.run(audit(Databases(empty, empty), TARGET, 100, settle_s=10, sleep=never))  # type: ignore[arg-type]
    assert report.findings == [] and report.source_rows == 0


def test_ranges_follow_each_other_until_a_short_one() -> None:
    seen: list[int] = []
    conn = Scripted([("1", "a", ""), ("2", "b", "")], [], [("3", "c", "")], [])
    report = asyncio.run(Auditor(Databases(conn, conn), TARGET).scan(2, seen.append))  # type: ignore[arg-type]
    assert seen == [2, 1] and report.counts()[Drift.MISSING] == 3


def test_a_repairs_key_condition_selects_ranges_of_keys_and_fits_the_signal() -> None:
    assert key_filter(None, TARGET, [("1",), ("5",)]) == (
        "((\"id\") BETWEEN ('1'::bigint) AND ('1'::bigint)"
        " OR (\"id\") BETWEEN ('5'::bigint) AND ('5'::bigint))"
    )
    keys = [(str(i),) for i in range(10_000)]
    condition = key_filter(None, TARGET, keys)
    assert len(condition) <= FILTER_CHARS
    assert condition.startswith("((\"id\") BETWEEN ('0'::bigint)") and condition.endswith("('9999'::bigint))")
    composite = AuditTarget(
        TARGET.source, TARGET.target, TableInfo(("tenant", "n"), ("text", "bigint")), ("body",), MODEL, 10
    )
    assert key_filter(None, composite, [("a'b", "7")]) == (
        "((\"tenant\", \"n\") BETWEEN ('a''b'::text, '7'::bigint) AND ('a''b'::text, '7'::bigint))"
    )


def test_the_consumers_audit_exports_gauges_at_start_and_stops_with_the_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from consumer import metrics
    from consumer.ops import audit as module
    from consumer.settings import Settings

    class Connection:
        async def __aenter__(self) -> Connection:
            return self

        async def __aexit__(self, *_: object) -> None:
            return None

    async def connect(*_: object, **__: object) -> Connection:
        return Connection()

    async def audited(*_: object) -> tuple[AuditTarget, AuditReport]:
        stop.set()  # one audit, then the consumer stops
        return TARGET, AuditReport([Finding(("9",), Drift.ORPHANED, None)], seconds=1.5)

    monkeypatch.setattr(module.psycopg.AsyncConnection, "connect", connect)
    monkeypatch.setattr(module, "audit_pipeline", audited)
    stop = asyncio.Event()
    asyncio.run(module.audit_periodically([Settings(audit_interval_s=3600)], stop))
    assert metrics.DRIFT_ROWS.labels(pipeline="documents", kind="orphaned")._value.get() == 1
    assert metrics.DRIFT_ROWS.labels(pipeline="documents", kind="missing")._value.get() == 0
    assert metrics.AUDIT_SECONDS.labels(pipeline="documents")._value.get() == 1.5
    assert metrics.AUDIT_TIMESTAMP.labels(pipeline="documents")._value.get() > 0

    never = asyncio.Event()
    asyncio.run(module.audit_periodically([Settings(audit_interval_s=0)], never))  # 0: no audit, returns
