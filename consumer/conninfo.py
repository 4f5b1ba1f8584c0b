"""Postgres connection strings as users give them: a postgresql:// URL or libpq's key=value conninfo.

Both forms reach every place a database is named (the consumer's pools, Debezium's connector config,
logs), so what is read from them, added to them or masked in them is done here, once, for both.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict, make_conninfo

URL_SCHEMES = ("postgresql://", "postgres://")  # libpq's; anything else is key=value conninfo


def check(dsn: str) -> None:
    """Raise ValueError unless libpq accepts `dsn`, without quoting it."""
    try:
        conninfo_to_dict(dsn)
    except ProgrammingError:
        # libpq's message may quote a fragment of the string, which may be the password
        raise ValueError(
            "is neither a postgresql:// URL nor a key=value connection string libpq accepts"
        ) from None


def with_sslmode(dsn: str, sslmode: str | None) -> str:
    if not sslmode:
        return dsn
    if not dsn.startswith(URL_SCHEMES):
        return make_conninfo(dsn, sslmode=sslmode)
    return dsn + ("&" if "?" in dsn else "?") + f"sslmode={sslmode}"


def parts(dsn: str) -> dict[str, str]:
    """Host, port, user, password and database name, as Debezium's connector config wants them."""
    params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}  # URL or conninfo, decoded
    return {
        "hostname": params.get("host") or "127.0.0.1",
        "port": params.get("port") or "5432",
        "user": params.get("user", ""),
        "password": params.get("password", ""),
        "dbname": params.get("dbname") or "postgres",
    }


def redacted(dsn: str) -> str:
    """`dsn` for logs: passwords (wherever they are given) masked."""
    if not dsn.startswith(URL_SCHEMES):
        params = conninfo_to_dict(dsn)
        if "password" in params:
            params["password"] = "***"
        return make_conninfo("", **params)
    split = urlsplit(dsn)
    netloc = split.netloc
    if split.password is not None:
        netloc = netloc.replace(f":{split.password}@", ":***@")
    query = urlencode(
        [
            (k, "***" if k.lower() == "password" else v)
            for k, v in parse_qsl(split.query, keep_blank_values=True)
        ],
        safe="*",
    )
    return split._replace(netloc=netloc, query=query).geturl()
