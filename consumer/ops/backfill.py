"""`cdc-embedder backfill`: ask Debezium for an incremental snapshot of some rows of the source table.

The rows then flow through the same path as live changes, while those keep flowing: each arrives as a
snapshot row, which fills a key that has no vector (or one of another model) and costs no model call
where the row's vector is already there (`consumer.sink.admits`). Debezium reads the table in chunks
between watermarks it writes to its signal table, so the source is never locked.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg import sql
from tqdm import tqdm

from consumer.connectors import signal_table_name
from consumer.databases import Databases
from consumer.kafka import client_options, read_whole_topic, stop_groupless
from consumer.schema import source_key
from consumer.settings import Settings
from consumer.targets import with_recorded_model

# English through a WordPiece vocabulary runs about four characters a token; no tokenizer is loaded
# for an estimate, so it is one, and says so.
CHARS_PER_TOKEN = 4
QUIET_S = 60.0  # no snapshot row for this long after the last one: Debezium is done


@dataclass(frozen=True, slots=True)
class BackfillPlan:
    rows: int
    chars: int
    # rows that have a vector of the configured model already: no model call for them (None: not
    # counted, the vectors are in another database)
    current: int | None
    current_chars: int = 0  # their text's size
    price: float | None = None  # USD per million tokens, where the embedder is a priced API

    @property
    def tokens(self) -> int:
        return self.chars // CHARS_PER_TOKEN

    @property
    def tokens_to_embed(self) -> int:
        return (self.chars - self.current_chars) // CHARS_PER_TOKEN

    def describe(self, settings: Settings) -> str:
        cost = (
            f", about ${self.tokens_to_embed * self.price / 1e6:,.2f} at ${self.price:g} per million tokens"
            if self.price is not None
            else ""
        )
        if self.current is None:
            return (
                f"{self.rows} rows of {settings.source_table}: at most {self.tokens:,} tokens to embed{cost} "
                "(the vectors are in another database: rows with a current vector were not counted; they "
                "cost no model call)"
            )
        return (
            f"{self.rows} rows of {settings.source_table}: {self.rows - self.current} to embed, about "
            f"{self.tokens_to_embed:,} tokens{cost} ({self.tokens:,} tokens in all; {self.current} have a "
            f"vector of {settings.model_identity} already and cost no model call)"
        )


def price_of(settings: Settings) -> float | None:
    """USD per million tokens of the pipeline's embedder: None for the local model (no bill)."""
    return settings.openai_spec().price() if settings.embedder == "openai" else None


def _condition(where: str | None) -> sql.Composable:
    # The operator's own SQL, as Debezium takes it (additional-conditions): nothing else is spliced.
    return sql.SQL(where) if where else sql.SQL("true")


async def plan_backfill(dbs: Databases, settings: Settings, where: str | None) -> BackfillPlan:
    """How many rows the snapshot would read, their text's size, and how many have a vector already.

    The last needs the source and the vector table in one database; where the vectors live apart it
    is not counted (`BackfillPlan.current` None).
    """
    settings = await with_recorded_model(dbs.vectors, settings)
    # the condition sees the source table alone, as Debezium's query does
    rows = sql.SQL("(SELECT * FROM {} WHERE {}) s").format(
        sql.Identifier(*settings.source), _condition(where)
    )
    size = sql.SQL(" + ").join(
        sql.SQL("coalesce(length(s.{}::text), 0)").format(sql.Identifier(c))
        for c in settings.text_column_list
    )
    conn = dbs.source
    cur = await conn.execute(sql.SQL("SELECT count(*), coalesce(sum({}), 0) FROM {}").format(size, rows))
    counted = await cur.fetchone()
    assert counted is not None
    price = price_of(settings)
    if dbs.separate:
        return BackfillPlan(int(counted[0]), int(counted[1]), None, 0, price)
    target = sql.Identifier(*settings.target)
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (target.as_string(conn),))
    exists = await cur.fetchone()
    current = current_chars = 0
    if exists and exists[0]:  # before the consumer first started there is no vector table
        info = await source_key(conn, settings)
        join = sql.SQL(" AND ").join(
            sql.SQL("v.{0} = s.{0}").format(sql.Identifier(c)) for c in info.key_columns
        )
        cur = await conn.execute(
            sql.SQL(
                "SELECT count(*), coalesce(sum({}), 0) FROM {} JOIN {} v ON {} "
                "WHERE v.embedding IS NOT NULL AND v.model = %s"
            ).format(size, rows, target, join),
            (settings.model_identity,),
        )
        found = await cur.fetchone()
        current, current_chars = (int(found[0]), int(found[1])) if found else (0, 0)
    return BackfillPlan(int(counted[0]), int(counted[1]), current, current_chars, price)


def snapshot_signal(settings: Settings, where: str | None) -> dict[str, Any]:
    """The `data` of Debezium's execute-snapshot signal for the source table."""
    table = settings.source_table if "." in settings.source_table else f"public.{settings.source_table}"
    data: dict[str, Any] = {"data-collections": [table], "type": "incremental"}
    if where:
        data["additional-conditions"] = [{"data-collection": table, "filter": where}]
    return data


async def request_backfill(conn: psycopg.AsyncConnection[Any], settings: Settings, where: str | None) -> str:
    signal_id = f"backfill-{uuid.uuid4().hex[:24]}"  # the signal table takes ids of 42 characters
    table = sql.Identifier(*signal_table_name(settings).split("."))
    await conn.execute(
        sql.SQL("INSERT INTO {} (id, type, data) VALUES (%s, 'execute-snapshot', %s)").format(table),
        (signal_id, orjson.dumps(snapshot_signal(settings, where)).decode()),
    )
    await conn.commit()
    return signal_id


async def source_end_offsets(settings: Settings) -> dict[TopicPartition, int]:
    """Where the source topic ends now; {} when it does not exist yet (a table nothing changed)."""
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await read_whole_topic(consumer, settings.source_topic)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps) if tps else {}
        return ends
    finally:
        await stop_groupless(consumer)


async def follow_backfill(
    settings: Settings,
    start: dict[TopicPartition, int],
    expected: int,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Count the snapshot rows reaching the source topic from `start`, with a progress bar and an ETA,
    until all `expected` came or none came for QUIET_S; returns how many came.

    Without a start (the topic did not exist), the topic is read from its beginning once it appears.
    """
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False)
    await consumer.start()
    seen, last = 0, clock()
    try:
        with tqdm(total=expected, unit="rows", desc="snapshot rows captured") as bar:
            while seen < expected and clock() - last < QUIET_S:
                if not consumer.assignment():
                    tps = await read_whole_topic(consumer, settings.source_topic)  # from the beginning
                    if not tps:
                        await asyncio.sleep(1)
                        continue
                    for tp in tps:
                        if tp in start:
                            consumer.seek(tp, start[tp])
                batches = await consumer.getmany(timeout_ms=1000)
                read = sum(_is_snapshot_row(r.value) for records in batches.values() for r in records)
                if read:
                    seen, last = seen + read, clock()
                    bar.update(read)
    finally:
        await stop_groupless(consumer)
    return seen


def _is_snapshot_row(value: bytes | None) -> bool:
    try:
        envelope = orjson.loads(value) if value else None
    except orjson.JSONDecodeError:
        return False
    return isinstance(envelope, dict) and envelope.get("op") == "r"
