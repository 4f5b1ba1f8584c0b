"""Decoding Debezium change events (JsonConverter, schemas off) into `Change` values.

Decoding never raises anything but `EventError`, so one malformed message can be dead-lettered with
its reason while the rest of its batch goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from consumer.errors import ErrorClass, EventError

# Debezium's stand-in for a TOASTed column that an UPDATE did not change; the real text must be read.
UNAVAILABLE_PLACEHOLDER = "__debezium_unavailable_value"
TEXT_SEPARATOR = "\n\n"

Key = int | str


class Op(StrEnum):
    CREATE = "c"
    READ = "r"  # a row of the initial snapshot
    UPDATE = "u"
    DELETE = "d"
    TOMBSTONE = "tombstone"  # the null-valued record after a delete, for log compaction

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    Op.CREATE: "create",
    Op.READ: "snapshot",
    Op.UPDATE: "update",
    Op.DELETE: "delete",
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
    key: Key
    op: Op
    position: int  # the change's WAL position (LSN): per row, later changes have larger ones
    text: str | None  # None for deletes, tombstones and rows whose text must be read from the source
    source_ts_ms: int | None
    origin: Origin

    @property
    def is_delete(self) -> bool:
        return self.op is Op.DELETE

    @property
    def needs_text_lookup(self) -> bool:
        return self.text is None and self.op in (Op.CREATE, Op.READ, Op.UPDATE)


def _load(raw: bytes | None, what: str) -> Any:
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventError(ErrorClass.INVALID_JSON, f"{what} is not valid JSON: {exc}") from None


def _key(raw_key: bytes | None, key_column: str) -> Key:
    key = _load(raw_key, "key")
    if isinstance(key, dict) and "payload" in key and "schema" in key:
        key = key["payload"]  # JsonConverter with schemas.enable=true
    value = key.get(key_column) if isinstance(key, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise EventError(ErrorClass.INVALID_EVENT, f"key has no scalar {key_column!r}: {key!r}")
    return value


def join_text(row: dict[str, Any], text_columns: tuple[str, ...]) -> str | None:
    """The text to embed: the configured columns joined, or None when one must be read from the source."""
    parts = []
    for column in text_columns:
        if column not in row:
            raise EventError(ErrorClass.MISSING_TEXT, f"row has no column {column!r}")
        value = row[column]
        if value == UNAVAILABLE_PLACEHOLDER:
            return None
        if value is not None and not isinstance(value, str):
            value = str(value)
        if value and value.strip():
            parts.append(value.strip())
    if not parts:
        raise EventError(ErrorClass.EMPTY_TEXT, f"columns {', '.join(text_columns)} are all empty")
    return TEXT_SEPARATOR.join(parts)


def decode(
    raw_key: bytes | None,
    raw_value: bytes | None,
    origin: Origin,
    key_column: str,
    text_columns: tuple[str, ...],
    max_text_chars: int,
) -> Change:
    key = _key(raw_key, key_column)
    envelope = _load(raw_value, "value")
    if envelope is None:
        return Change(key, Op.TOMBSTONE, -1, None, None, origin)
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
    position = source.get("lsn") if isinstance(source, dict) else None
    if isinstance(position, bool) or not isinstance(position, int):
        raise EventError(ErrorClass.INVALID_EVENT, "source.lsn is missing: not a Postgres change event")
    ts = source.get("ts_ms") if isinstance(source, dict) else None
    source_ts_ms = ts if isinstance(ts, int) and not isinstance(ts, bool) else None
    if op is Op.DELETE:
        return Change(key, op, position, None, source_ts_ms, origin)
    after = envelope.get("after")
    if not isinstance(after, dict):
        raise EventError(ErrorClass.INVALID_EVENT, f"op {op.value!r} without an 'after' row")
    text = join_text(after, text_columns)
    if text is not None and len(text) > max_text_chars:
        raise EventError(
            ErrorClass.TEXT_REFUSED,
            f"text has {len(text)} characters, over CDC_MAX_TEXT_CHARS={max_text_chars}",
        )
    return Change(key, op, position, text, source_ts_ms, origin)


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
