"""consumer.events: decoding Debezium change events (JsonConverter) into `Change` values."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from consumer.errors import ErrorClass, EventError
from consumer.events import (
    TEXT_SEPARATOR,
    UNAVAILABLE_PLACEHOLDER,
    UNKNOWN_OP_LABEL,
    Change,
    Op,
    Origin,
    decode,
    join_text,
    op_label,
)
from tests.unit.debezium_events import LSN, TS_MS, source_block

ORIGIN = Origin("cdc.public.documents", 2, 417)
TEXT_COLUMNS = ("title", "body")


def envelope(
    op: Any,
    after: dict[str, Any] | None = None,
    before: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "before": before,
        "after": after,
        "source": source_block() if source is None else source,
        "transaction": None,
        "op": op,
        "ts_ms": TS_MS + 40,
        "ts_us": (TS_MS + 40) * 1000,
        "ts_ns": (TS_MS + 40) * 1_000_000,
    }


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def row(id_: int = 1, title: Any = "t", body: Any = "b") -> dict[str, Any]:
    return {"id": id_, "title": title, "body": body, "created_at": 1_718_000_000_000_000}


KEY = dumps({"id": 1})


def run(value: bytes | None, key: bytes | None = KEY, key_columns: tuple[str, ...] = ("id",)) -> Change:
    return decode(key, value, ORIGIN, key_columns, TEXT_COLUMNS)


def error_of(value: bytes | None, key: bytes | None = KEY) -> EventError:
    with pytest.raises(EventError) as info:
        run(value, key)
    return info.value


# --- the operations -------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "expected"), [("c", Op.CREATE), ("r", Op.READ), ("u", Op.UPDATE)])
def test_create_snapshot_update(op: str, expected: Op) -> None:
    before = row(title="old") if op == "u" else None
    snapshot = {"snapshot": "true"} if op == "r" else {}
    change = run(dumps(envelope(op, after=row(), before=before, source=source_block(**snapshot))))
    assert change == Change(("1",), expected, LSN, "t" + TEXT_SEPARATOR + "b", TS_MS, ORIGIN)
    assert change.is_delete is False
    assert change.is_snapshot is (op == "r")
    assert change.needs_text_lookup is False


def test_delete() -> None:
    change = run(dumps(envelope("d", after=None, before={"id": 1, "title": None, "body": None})))
    assert change == Change(("1",), Op.DELETE, LSN, None, TS_MS, ORIGIN)
    assert change.is_delete is True
    assert change.needs_text_lookup is False


def test_tombstone() -> None:
    change = run(None)
    assert change == Change(("1",), Op.TOMBSTONE, -1, None, None, ORIGIN)
    assert change.is_delete is False
    assert change.needs_text_lookup is False


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("doc-7", "doc-7"),  # text
        ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),  # uuid
        ("12.50", "12.50"),  # numeric, decimal.handling.mode=string
        (-9_007_199_254_740_993, "-9007199254740993"),  # bigint past a double's precision
    ],
)
def test_key_is_the_text_postgres_prints(value: Any, text: str) -> None:
    change = run(dumps(envelope("c", after=row())), key=dumps({"id": value}))
    assert change.key == (text,)


def test_composite_key_in_the_configured_order() -> None:
    key = dumps({"tenant": "acme", "id": 7})
    change = run(dumps(envelope("c", after=row())), key=key, key_columns=("tenant", "id"))
    assert change.key == ("acme", "7")
    with pytest.raises(EventError) as info:
        run(dumps(envelope("c", after=row())), key=dumps({"id": 7}), key_columns=("tenant", "id"))
    assert info.value.error_class is ErrorClass.INVALID_EVENT


def test_incremental_snapshot_row_takes_its_window_position_from_the_sequence() -> None:
    """Debezium 3 sends rows of an incremental snapshot with source.lsn null (seen on the real stack)."""
    source = source_block(lsn=None, snapshot="incremental", sequence='["29415744","29415744"]')
    change = run(dumps(envelope("r", after=row(), source=source)))
    assert (change.op, change.position, change.is_snapshot) == (Op.READ, 29415744, True)
    for sequence in (None, "[]", "[null]", "nonsense"):
        bad = source_block(lsn=None, snapshot="incremental", sequence=sequence)
        assert error_of(dumps(envelope("r", after=row(), source=bad))).error_class is ErrorClass.INVALID_EVENT
    # a streamed change must carry its own lsn
    assert error_of(dumps(envelope("u", after=row(), source=source))).error_class is ErrorClass.INVALID_EVENT


def test_truncate_has_no_key_and_the_table_position() -> None:
    value = {"before": None, "after": None, "source": source_block(), "op": "t", "ts_ms": TS_MS}
    change = run(dumps(value), key=None)
    assert change == Change((), Op.TRUNCATE, LSN, None, TS_MS, ORIGIN)
    assert change.needs_text_lookup is False


def test_schemas_enabled_envelope_and_key() -> None:
    value = {
        "schema": {"type": "struct", "name": "cdc.public.documents.Envelope", "fields": []},
        "payload": envelope("u", after=row(title="with schema", body="")),
    }
    key = {"schema": {"type": "struct", "fields": [{"field": "id", "type": "int64"}]}, "payload": {"id": 9}}
    change = run(dumps(value), key=dumps(key))
    assert (change.key, change.op, change.position, change.text) == (("9",), Op.UPDATE, LSN, "with schema")


def test_text_is_stripped_and_joined_and_non_strings_converted() -> None:
    change = run(dumps(envelope("c", after=row(title="  Title \n", body=42))))
    assert change.text == "Title\n\n42"


@pytest.mark.parametrize(("title", "body", "text"), [("", "only body", "only body"), ("t", None, "t")])
def test_empty_column_is_left_out(title: Any, body: Any, text: str) -> None:
    assert run(dumps(envelope("c", after=row(title=title, body=body)))).text == text


@pytest.mark.parametrize(("ts", "expected"), [(TS_MS, TS_MS), (None, None), (True, None), ("123", None)])
def test_source_timestamp(ts: Any, expected: int | None) -> None:
    assert run(dumps(envelope("c", after=row(), source=source_block(ts_ms=ts)))).source_ts_ms == expected


# --- TOAST -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["title", "body"])
@pytest.mark.parametrize("op", ["u", "c", "r"])
def test_toast_placeholder_needs_a_lookup(column: str, op: str) -> None:
    after = row() | {column: UNAVAILABLE_PLACEHOLDER}
    change = run(dumps(envelope(op, after=after)))
    assert change.text is None
    assert change.needs_text_lookup is True
    assert change.position == LSN


def test_join_text_placeholder_and_errors() -> None:
    assert join_text({"title": "a", "body": UNAVAILABLE_PLACEHOLDER}, TEXT_COLUMNS) is None
    assert join_text({"title": "a", "body": "b"}, TEXT_COLUMNS) == "a\n\nb"
    with pytest.raises(EventError) as info:
        join_text({"title": "a"}, TEXT_COLUMNS)
    assert info.value.error_class is ErrorClass.MISSING_TEXT


# --- what is refused, and with which class -------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"{not json", b"\xff\xfe\x00\x13garbage", b"", b'{"op": "c",', b"\x00\x00\x00\x00\x05Avro!"],
    ids=["truncated", "binary", "empty", "cut", "avro-magic"],
)
def test_invalid_json_value(value: bytes) -> None:
    error = error_of(value)
    assert error.error_class is ErrorClass.INVALID_JSON
    assert str(error).startswith("value is not valid JSON")


@pytest.mark.parametrize("value", [b"[1, 2]", b"42", b'"c"', b"true"])
def test_non_object_json_value(value: bytes) -> None:
    assert error_of(value).error_class is ErrorClass.INVALID_EVENT


@pytest.mark.parametrize(
    ("key", "error_class"),
    [
        (None, ErrorClass.INVALID_EVENT),
        (b"not json", ErrorClass.INVALID_JSON),
        (b"\xff\xfe", ErrorClass.INVALID_JSON),
        (dumps({"uuid": 1}), ErrorClass.INVALID_EVENT),
        (dumps({"id": None}), ErrorClass.INVALID_EVENT),
        (dumps({"id": True}), ErrorClass.INVALID_EVENT),
        (dumps({"id": 1.5}), ErrorClass.INVALID_EVENT),
        (dumps({"id": [1]}), ErrorClass.INVALID_EVENT),
        (dumps([1]), ErrorClass.INVALID_EVENT),
        (dumps(1), ErrorClass.INVALID_EVENT),
    ],
)
def test_bad_key(key: bytes | None, error_class: ErrorClass) -> None:
    error = error_of(dumps(envelope("c", after=row())), key=key)
    assert error.error_class is error_class


@pytest.mark.parametrize("op", ["x", "m", "C", "", None, 1, "tombstone"])
def test_unknown_op(op: Any) -> None:
    error = error_of(dumps(envelope(op, after=row())))
    assert error.error_class is ErrorClass.UNKNOWN_OPERATION


def test_missing_op() -> None:
    value = envelope("c", after=row())
    del value["op"]
    assert error_of(dumps(value)).error_class is ErrorClass.UNKNOWN_OPERATION


@pytest.mark.parametrize(
    "source",
    [
        {k: v for k, v in source_block().items() if k != "lsn"},
        source_block(lsn=None),
        source_block(lsn="24023128"),
        source_block(lsn=True),
        source_block(lsn=1.5),
        "not a block",
    ],
    ids=["absent", "null", "string", "bool", "float", "not-a-dict"],
)
@pytest.mark.parametrize("op", ["c", "d"])
def test_missing_lsn(source: Any, op: str) -> None:
    value = envelope(op, after=row())
    value["source"] = source
    error = error_of(dumps(value))
    assert error.error_class is ErrorClass.INVALID_EVENT
    assert "source.lsn" in str(error)


def test_missing_source_block() -> None:
    value = envelope("c", after=row())
    del value["source"]
    assert error_of(dumps(value)).error_class is ErrorClass.INVALID_EVENT


@pytest.mark.parametrize("after", [None, "row", [1]])
def test_create_without_after_row(after: Any) -> None:
    value = envelope("c")
    value["after"] = after
    assert error_of(dumps(value)).error_class is ErrorClass.INVALID_EVENT


@pytest.mark.parametrize("missing", ["title", "body"])
def test_missing_text_column(missing: str) -> None:
    after = row()
    del after[missing]
    error = error_of(dumps(envelope("u", after=after)))
    assert error.error_class is ErrorClass.MISSING_TEXT
    assert repr(missing) in str(error)


@pytest.mark.parametrize(("title", "body"), [("", ""), ("   ", "\n\t "), (None, None), ("", None), (" ", "")])
def test_empty_text_is_a_state_of_the_row_not_an_error(title: Any, body: Any) -> None:
    change = run(dumps(envelope("u", after=row(title=title, body=body))))
    assert change.text == ""
    assert change.needs_text_lookup is False


def test_every_decoding_error_is_permanent() -> None:
    samples: list[tuple[bytes | None, bytes | None]] = [
        (KEY, b"{nope"),
        (KEY, b"[1]"),
        (KEY, dumps(envelope("x", after=row()))),
        (KEY, dumps(envelope("c", after={"id": 1}))),
        (None, dumps(envelope("c", after=row()))),
    ]
    classes = set()
    for key, value in samples:
        with pytest.raises(EventError) as info:
            decode(key, value, ORIGIN, ("id",), TEXT_COLUMNS)
        classes.add(info.value.error_class)
        assert info.value.error_class.permanent
    assert classes == {
        ErrorClass.INVALID_JSON,
        ErrorClass.INVALID_EVENT,
        ErrorClass.UNKNOWN_OPERATION,
        ErrorClass.MISSING_TEXT,
    }


# --- op labels -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "label"),
    [
        (Op.CREATE, "create"),
        (Op.READ, "snapshot"),
        (Op.UPDATE, "update"),
        (Op.DELETE, "delete"),
        (Op.TRUNCATE, "truncate"),
        (Op.TOMBSTONE, "tombstone"),
    ],
)
def test_op_label_property(op: Op, label: str) -> None:
    assert op.label == label


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (dumps(envelope("c", after=row())), "create"),
        (dumps(envelope("r", after=row())), "snapshot"),
        (dumps(envelope("u", after=row())), "update"),
        (dumps(envelope("d")), "delete"),
        (None, "tombstone"),
        (b"\xff\xfegarbage", UNKNOWN_OP_LABEL),
        (b"{not json", UNKNOWN_OP_LABEL),
        (b"[1, 2]", UNKNOWN_OP_LABEL),
        (dumps(envelope("x")), UNKNOWN_OP_LABEL),
        (dumps({"before": None}), UNKNOWN_OP_LABEL),
    ],
)
def test_op_label(value: bytes | None, label: str) -> None:
    assert op_label(value) == label


def test_op_label_schemas_enabled_envelope() -> None:
    assert op_label(dumps({"schema": {"type": "struct"}, "payload": envelope("u", after=row())})) == "update"
