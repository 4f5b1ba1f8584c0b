"""Debezium change events as the Postgres connector writes them (JsonConverter, schemas off)."""

from __future__ import annotations

from typing import Any

LSN = 24_023_128
TS_MS = 1_718_000_000_123


def source_block(lsn: Any = LSN, ts_ms: Any = TS_MS, **extra: Any) -> dict[str, Any]:
    """The `source` block of a Debezium 2.x Postgres connector event."""
    block = {
        "version": "2.7.3.Final",
        "connector": "postgresql",
        "name": "cdc",
        "ts_ms": ts_ms,
        "snapshot": "false",
        "db": "cdc",
        "sequence": f'[null,"{lsn}"]',
        "schema": "public",
        "table": "documents",
        "txId": 771,
        "lsn": lsn,
        "xmin": None,
    }
    block.update(extra)
    return block
