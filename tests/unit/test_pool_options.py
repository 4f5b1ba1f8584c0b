"""consumer.sink.open_pool: every connection has a statement timeout and TCP keepalives."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from consumer import sink
from consumer.settings import Settings


class _FakeConnection:
    def __init__(self) -> None:
        self.autocommit = False
        self.statements: list[str] = []

    async def set_autocommit(self, value: bool) -> None:
        self.autocommit = value

    async def execute(self, statement: sql.Composable) -> None:
        assert self.autocommit, "a SET outside autocommit would leave the connection in a transaction"
        self.statements.append(statement.as_string())


@pytest.fixture
def pool_arguments(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What open_pool hands the pool (no connection is made)."""
    captured: dict[str, Any] = {}

    class FakePool:
        check_connection = object()

        def __init__(self, conninfo: str, **kwargs: Any) -> None:
            captured.update(kwargs, conninfo=conninfo)

    async def no_vector_types(conn: object) -> None:
        pass

    monkeypatch.setattr(sink, "AsyncConnectionPool", FakePool)
    monkeypatch.setattr(sink, "register_vector_async", no_vector_types)
    return captured


def _configured(arguments: dict[str, Any]) -> _FakeConnection:
    conn = _FakeConnection()
    asyncio.run(arguments["configure"](conn))
    return conn


def test_sessions_get_the_statement_timeout(pool_arguments: dict[str, Any]) -> None:
    sink.open_pool(Settings(database_statement_timeout_ms=1500))
    conn = _configured(pool_arguments)
    assert conn.autocommit is True
    assert conn.statements == ["SET statement_timeout = 1500"]


def test_default_statement_timeout_is_30s(pool_arguments: dict[str, Any]) -> None:
    sink.open_pool(Settings())
    assert _configured(pool_arguments).statements == ["SET statement_timeout = 30000"]


def test_zero_leaves_the_servers_timeout(pool_arguments: dict[str, Any]) -> None:
    sink.open_pool(Settings(database_statement_timeout_ms=0))
    assert _configured(pool_arguments).statements == []


def test_connections_use_tcp_keepalives(pool_arguments: dict[str, Any]) -> None:
    sink.open_pool(Settings())
    kwargs = pool_arguments["kwargs"]
    assert kwargs["keepalives"] == 1
    assert kwargs["keepalives_idle"] + kwargs["keepalives_interval"] * kwargs["keepalives_count"] <= 120
    assert 0 < kwargs["tcp_user_timeout"] <= 120_000
    assert kwargs["connect_timeout"] > 0
    make_conninfo(pool_arguments["conninfo"], **kwargs)  # libpq knows every option


@pytest.mark.parametrize(
    "url",
    [
        "host=db dbname=app keepalives_idle=5 tcp_user_timeout=9000",
        "postgresql://db/app?keepalives_idle=5&tcp_user_timeout=9000",
    ],
)
def test_keepalives_of_the_connection_string_win(pool_arguments: dict[str, Any], url: str) -> None:
    sink.open_pool(Settings(database_url=url))
    kwargs = pool_arguments["kwargs"]
    assert "keepalives_idle" not in kwargs and "tcp_user_timeout" not in kwargs
    assert kwargs["keepalives"] == 1 and kwargs["keepalives_count"] == 3
