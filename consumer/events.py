"""Decoding Debezium change events (JsonConverter, schemas off) into `Change` values.

Decoding never raises anything but `EventError`, so one malformed message can be dead-lettered with
its reason while the rest of its batch goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from consumer.errors import ErrorClass, EventError

# Debezium's stand-in for a TOASTed column that an UPDATE did not change; the real text must be read.
UNAVAILABLE_PLACEHOLDER = "__debezium_unavailable_value"
TEXT_SEPARATOR = "\n\n"

# A row's primary key as the text Postgres prints for each key column (`col::text`). Keys decoded from
# Debezium's JSON and keys read back from Postgres (uuid.UUID, Decimal, int) only compare equal in one
# canonical form, and the text form is the one both sides can produce without knowing the types.
Key = tuple[str, ...]


class Op(StrEnum):
    CREATE = "c"
    READ = "r"  # a row of the initial snapshot
    UPDATE = "u"
    DELETE = "d"
    TRUNCATE = "t"  # the whole table was emptied; the event has no key
    TOMBSTONE = "tombstone"  # the null-valued record after a delete, for log compaction

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    Op.CREATE: "create",
    Op.READ: "snapshot",
    Op.UPDATE: "update",
    Op.DELETE: "delete",
    Op.TRUNCATE: "truncate",
    Op.TOMBSTONE: "tombstone",
}
UNKNOWN_OP_LABEL = "unknown"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record was read; for retried records, where it was first read."""

    topic: str
    partition: int
    offset: int

    def as_log(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


@dataclass(frozen=True, slots=True)
class Change:
    key: Key  # () for a truncate
    op: Op
    position: int  # the change's WAL position (LSN): per row, later changes have larger ones
    # None for deletes, truncates, tombstones and rows whose text must be read from the source;
    # "" for a row whose text columns are all empty (a valid state: the row has no vector)
    text: str | None
    source_ts_ms: int | None
    origin: Origin

    @property
    def is_delete(self) -> bool:
        return self.op is Op.DELETE

    @property
    def is_snapshot(self) -> bool:
        """A row read by a snapshot (initial, blocking or incremental), not a change streamed from the WAL."""
        return self.op is Op.READ

    @property
    def needs_text_lookup(self) -> bool:
        return self.text is None and self.op in (Op.CREATE, Op.READ, Op.UPDATE)


def supersedes(position: int, snapshot: bool, over_position: int, over_snapshot: bool) -> bool:
    """Whether a change (or snapshot row) at `position` is newer than one at `over_position`.

    Streamed changes of a row are ordered by LSN: row locks make a row's changes commit in the order of
    their LSNs. A snapshot row is not: it carries the position where the snapshot began (or where an
    incremental snapshot's window closed), and a transaction still open when the snapshot read the row
    wrote its change at a lower LSN but committed after the read. So a streamed change is newer than any
    snapshot row, and a snapshot row only newer than an older snapshot row.
    """
    if not snapshot:
        return over_snapshot or position > over_position
    return over_snapshot and position > over_position


def _position(source: Any, op: Op) -> int:
    """The change's WAL position: source.lsn, or for a row of an incremental snapshot (whose lsn is
    null) the position of the snapshot window it was read in, the last of source.sequence."""
    position = source.get("lsn") if isinstance(source, dict) else None
    if position is None and op is Op.READ and isinstance(source, dict):
        try:
            sequence = orjson.loads(source.get("sequence") or "null")
            position = int(sequence[-1]) if isinstance(sequence, list) and sequence else None
        except (orjson.JSONDecodeError, TypeError, ValueError):
            position = None
    if isinstance(position, bool) or not isinstance(position, int):
        raise EventError(ErrorClass.INVALID_EVENT, "source.lsn is missing: not a Postgres change event")
    return position


def _load(raw: bytes | None, what: str) -> Any:
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventError(ErrorClass.INVALID_JSON, f"{what} is not valid JSON: {exc}") from None


def key_text(value: Any) -> str | None:
    """A key column's value from Debezium's JSON as Postgres prints it, None if it is not a key value.

    Integers are numbers, and uuid, text and numeric (decimal.handling.mode=string) are strings that
    Debezium takes from Postgres' own output, so the text form matches `col::text` exactly.
    """
    if isinstance(value, int | str) and not isinstance(value, bool):
        return str(value)
    return None


def _key(raw_key: bytes | None, key_columns: tuple[str, ...]) -> Key:
    key = _load(raw_key, "key")
    if isinstance(key, dict) and "payload" in key and "schema" in key:
        key = key["payload"]  # JsonConverter with schemas.enable=true
    if not isinstance(key, dict):
        raise EventError(
            ErrorClass.INVALID_EVENT, f"key is not an object of {', '.join(key_columns)}: {key!r}"
        )
    parts = tuple(key_text(key.get(column)) for column in key_columns)
    if any(part is None for part in parts):
        raise EventError(ErrorClass.INVALID_EVENT, f"key lacks a scalar {', '.join(key_columns)}: {key!r}")
    return tuple(p for p in parts if p is not None)


def join_text(row: dict[str, Any], text_columns: tuple[str, ...], template: str | None = None) -> str | None:
    """The text to embed: the columns joined (or put into the template), or None when one must be read
    from the source; "" when the row has no text to embed."""
    values: dict[str, str] = {}
    for column in text_columns:
        if column not in row:
            raise EventError(ErrorClass.MISSING_TEXT, f"row has no column {column!r}")
        value = row[column]
        if value == UNAVAILABLE_PLACEHOLDER:
            return None
        values[column] = "" if value is None else value if isinstance(value, str) else str(value)
    if template is not None:
        return template.format_map(values).strip()
    return TEXT_SEPARATOR.join(v.strip() for v in values.values() if v.strip())


def source_row_text(values: Sequence[Any], text_columns: tuple[str, ...], template: str | None = None) -> str:
    """The text of a row read from the source table, its text columns' values in order.

    The one place that turns a source row into text, for the sink's TOAST look-ups and the audit alike,
    so that both hash exactly what a change event of the row would have.
    """
    return join_text(dict(zip(text_columns, values, strict=True)), text_columns, template) or ""


def decode(
    raw_key: bytes | None,
    raw_value: bytes | None,
    origin: Origin,
    key_columns: tuple[str, ...],
    text_columns: tuple[str, ...],
    template: str | None = None,
) -> Change:
    envelope = _load(raw_value, "value")
    if envelope is None:
        return Change(_key(raw_key, key_columns), Op.TOMBSTONE, -1, None, None, origin)
    if isinstance(envelope, dict) and "payload" in envelope and "schema" in envelope:
        envelope = envelope["payload"]
    if not isinstance(envelope, dict):
        raise EventError(ErrorClass.INVALID_EVENT, f"value is not a Debezium envelope: {type(envelope)}")
    try:
        op = Op(str(envelope.get("op")))
    except ValueError:
        raise EventError(ErrorClass.UNKNOWN_OPERATION, f"unknown op {envelope.get('op')!r}") from None
    if op is Op.TOMBSTONE:
        raise EventError(ErrorClass.UNKNOWN_OPERATION, "op 'tombstone' is not a Debezium operation")
    source = envelope.get("source")
    position = _position(source, op)
    ts = source.get("ts_ms") if isinstance(source, dict) else None
    source_ts_ms = ts if isinstance(ts, int) and not isinstance(ts, bool) else None
    if op is Op.TRUNCATE:  # a truncate event has no key: it is about the whole table
        return Change((), op, position, None, source_ts_ms, origin)
    key = _key(raw_key, key_columns)
    if op is Op.DELETE:
        return Change(key, op, position, None, source_ts_ms, origin)
    after = envelope.get("after")
    if not isinstance(after, dict):
        raise EventError(ErrorClass.INVALID_EVENT, f"op {op.value!r} without an 'after' row")
    return Change(key, op, position, join_text(after, text_columns, template), source_ts_ms, origin)


def op_label(raw_value: bytes | None) -> str:
    """The operation label of an undecodable record, for its metric, as far as it can be told."""
    try:
        envelope = orjson.loads(raw_value) if raw_value is not None else None
    except orjson.JSONDecodeError:
        return UNKNOWN_OP_LABEL
    if envelope is None:
        return Op.TOMBSTONE.label
    if isinstance(envelope, dict) and "payload" in envelope and "schema" in envelope:
        envelope = envelope["payload"]
    try:
        return Op(str(envelope.get("op"))).label if isinstance(envelope, dict) else UNKNOWN_OP_LABEL
    except ValueError:
        return UNKNOWN_OP_LABEL
