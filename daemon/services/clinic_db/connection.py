"""Connecting to the clinic database, and saying in one sentence why it failed."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import make_conninfo

from pbmd.daemon.services.clinic_db.schema import ClinicSchemaError
from pbmd.daemon.services.config import ClinicDbConfig


def server_text(config: ClinicDbConfig) -> str:
    """The server and database, for messages (never the password)."""
    parts = urlsplit(config.url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}@" if parts.username else ""
    return f"{user}{host}{port}/{parts.path.strip('/')}"


async def connect(config: ClinicDbConfig) -> psycopg.AsyncConnection[tuple[Any, ...]]:
    """An autocommit connection (transactions are explicit: ``conn.transaction()``).

    Raises ValueError for a password that cannot be had, psycopg.Error otherwise."""
    conninfo = make_conninfo(config.url, **config.connect_kwargs())
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True)


def describe(exc: BaseException, config: ClinicDbConfig) -> str:
    """Why the clinic database cannot be used, as the technician reads it."""
    where = server_text(config)
    text = " ".join(str(exc).split()) or type(exc).__name__
    low = text.lower()
    if isinstance(exc, ValueError):
        return text
    if isinstance(exc, ClinicSchemaError):
        return f"clinic database {where}: {text}"
    if "password authentication failed" in low or "no password supplied" in low:
        hint = "check the password file or variable of [clinic_db] and the user on the server"
    elif "role" in low and "does not exist" in low:
        hint = "create the user on the server (docs/clinic-db.md) or fix the URL's user"
    elif "database" in low and "does not exist" in low:
        hint = "create the database on the server (docs/clinic-db.md) or fix the URL"
    elif "not currently accepting connections" in low:
        hint = "the server refuses connections to this database for now; replication retries"
    elif "connection refused" in low or "timeout" in low or "could not translate" in low:
        hint = "check that the server runs and is reachable from this workstation"
    elif "ssl" in low or "certificate" in low:
        hint = "check sslmode and sslrootcert of [clinic_db] against the server's certificate"
    elif "permission denied" in low:
        hint = "grant the pbmd user its rights on the database (docs/clinic-db.md)"
    else:
        hint = "replication retries"
    return f"clinic database {where}: {text} ({hint})"
