"""SQL fragments over a source key of any arity and types: keys travel as one text array per column.

A key is the tuple of its columns' text form (`consumer.events.Key`), so a batch's keys are sent as
`%(k0)s::text[], %(k1)s::text[], ...` and cast back to each column's type where they meet a table.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import sql

from consumer.events import Key
from consumer.schema import TableInfo


def key_params(prefix: str, keys: Sequence[Key], arity: int) -> dict[str, list[str]]:
    """The parameters `unnest_keys(prefix, arity)` reads: one list per key column."""
    columns = list(zip(*keys, strict=True)) if keys else [()] * arity
    return {f"{prefix}{i}": list(values) for i, values in enumerate(columns)}


def unnest_keys(prefix: str, arity: int) -> sql.Composable:
    return sql.SQL(", ").join(sql.Placeholder(f"{prefix}{i}") + sql.SQL("::text[]") for i in range(arity))


def key_aliases(arity: int) -> sql.Composable:
    """The column names of `unnest_keys` in `AS u(...)`: k0, k1, ..."""
    return sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(arity))


def key_match(table: str, info: TableInfo, unnested: str = "u") -> sql.Composable:
    """`table`'s key equals the unnested key, each column cast to its type."""
    return sql.SQL(" AND ").join(
        sql.SQL("{}.{} = {}.{}::{}").format(
            sql.Identifier(table),
            sql.Identifier(c),
            sql.Identifier(unnested),
            sql.Identifier(f"k{i}"),
            sql.SQL(t),
        )
        for i, (c, t) in enumerate(info.keys)
    )


def key_text(table: str, info: TableInfo) -> sql.Composable:
    """`table`'s key columns in their text form, as a key is compared in Python."""
    return sql.SQL(", ").join(
        sql.SQL("{}.{}::text").format(sql.Identifier(table), sql.Identifier(c)) for c in info.key_columns
    )


def key_casts(info: TableInfo, unnested: str = "u") -> sql.Composable:
    """The unnested key's columns cast to the key's types, in key order (an INSERT's values)."""
    return sql.SQL(", ").join(
        sql.SQL("{}.{}::{}").format(sql.Identifier(unnested), sql.Identifier(f"k{i}"), sql.SQL(t))
        for i, t in enumerate(info.key_types)
    )


def key_names(info: TableInfo) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, info.key_columns))
