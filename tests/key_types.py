"""Source tables of every key type the pipeline supports, and keys of each, for the real-stack tests.

Keys are made from an integer so that tests can speak of "row 7" whatever the key type; `key_of`
gives the key as the pipeline holds it (the text of each key column) and `sql_key` as psycopg sends it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from consumer.events import Key


@dataclass(frozen=True)
class KeyType:
    name: str
    columns: tuple[tuple[str, str], ...]  # (column, SQL type)

    def key_of(self, n: int) -> Key:
        return tuple(str(v) for v in self.values(n))

    def values(self, n: int) -> tuple[Any, ...]:
        match self.name:
            case "bigint":
                return (n * 1_000_003 - 9_007_199_254_740_993,)  # past a double's precision
            case "uuid":
                return (uuid.UUID(int=n * 0x9E3779B97F4A7C15 % 2**128),)
            case "text":
                return (f"doc/{n} ü",)
            case "numeric":
                return (Decimal(n) + Decimal("0.50"),)
            case "composite":
                return (f"tenant-{n % 3}", n)
        raise ValueError(self.name)

    def create_source(self, conn: psycopg.Connection[Any], schema: str, table: str) -> None:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, title text, body text, PRIMARY KEY ({}))").format(
                sql.Identifier(schema, table),
                sql.SQL(", ").join(
                    sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in self.columns
                ),
                sql.SQL(", ").join(sql.Identifier(c) for c, _ in self.columns),
            )
        )

    def upsert_row(
        self,
        conn: psycopg.Connection[Any],
        schema: str,
        table: str,
        n: int,
        title: str | None,
        body: str | None,
    ) -> None:
        names = [c for c, _ in self.columns]
        conn.execute(
            sql.SQL(
                "INSERT INTO {t} ({keys}, title, body) VALUES ({params}, %s, %s) "
                "ON CONFLICT ({keys}) DO UPDATE SET title = excluded.title, body = excluded.body"
            ).format(
                t=sql.Identifier(schema, table),
                keys=sql.SQL(", ").join(map(sql.Identifier, names)),
                params=sql.SQL(", ").join(sql.Placeholder() * len(names)),
            ),
            (*self.values(n), title, body),
        )

    def match(self) -> sql.Composable:
        """`WHERE` of one row by its key values (placeholders in column order)."""
        return sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c, _ in self.columns)


KEY_TYPES = {
    kt.name: kt
    for kt in (
        KeyType("bigint", (("id", "bigint"),)),
        KeyType("uuid", (("id", "uuid"),)),
        KeyType("text", (("id", "text"),)),
        KeyType("numeric", (("id", "numeric(20,2)"),)),
        KeyType("composite", (("tenant", "text"), ("id", "bigint"))),
    )
}
