"""CDC_DATABASE_URL as libpq key=value conninfo: redacted, given an sslmode, split for Debezium."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from consumer.settings import SettingsError, load_settings

CONNINFO = "host=db.example.com port=6543 user=app password='p w\\'d=x' dbname=vectors"


def test_conninfo_password_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_DATABASE_URL", CONNINFO)
    redacted = load_settings().redacted_dsn()
    assert "p w" not in redacted and "d=x" not in redacted
    assert conninfo_to_dict(redacted) == {
        "host": "db.example.com",
        "port": "6543",
        "user": "app",
        "password": "***",
        "dbname": "vectors",
    }


def test_conninfo_without_password_keeps_every_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_DATABASE_URL", "host=db dbname=app application_name='my app'")
    redacted = load_settings().redacted_dsn()
    assert conninfo_to_dict(redacted) == {"host": "db", "dbname": "app", "application_name": "my app"}


@pytest.mark.parametrize("given", [None, "disable"])
def test_sslmode_setting_applies_to_conninfo(monkeypatch: pytest.MonkeyPatch, given: str | None) -> None:
    conninfo = CONNINFO + (f" sslmode={given}" if given else "")
    monkeypatch.setenv("CDC_DATABASE_URL", conninfo)
    monkeypatch.setenv("CDC_DATABASE_SSLMODE", "verify-full")
    s = load_settings()
    assert conninfo_to_dict(s.dsn) == conninfo_to_dict(CONNINFO) | {"sslmode": "verify-full"}
    assert "p w" not in s.redacted_dsn()
    assert conninfo_to_dict(s.redacted_dsn())["sslmode"] == "verify-full"


def test_database_parts_of_conninfo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_DATABASE_URL", CONNINFO)
    assert load_settings().database_parts() == {
        "hostname": "db.example.com",
        "port": "6543",
        "user": "app",
        "password": "p w'd=x",
        "dbname": "vectors",
    }


def test_database_parts_of_a_minimal_conninfo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_DATABASE_URL", "user=reader")
    assert load_settings().database_parts() == {
        "hostname": "127.0.0.1",
        "port": "5432",
        "user": "reader",
        "password": "",
        "dbname": "postgres",
    }


@pytest.mark.parametrize(
    "value",
    [
        "host=db password=sec ret",  # an unquoted space: libpq's message would quote "ret"
        "host=db passwrd=secret",
        "host='db password=secret",
        "postgresql://app:secret@db/app?sslmod=require",
    ],
)
def test_malformed_database_url_is_refused_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CDC_DATABASE_URL", value)
    with pytest.raises(SettingsError, match="CDC_DATABASE_URL: ") as info:
        load_settings()
    assert "secret" not in str(info.value) and '"ret"' not in str(info.value)
