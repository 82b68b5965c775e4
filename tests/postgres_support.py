"""The real PostgreSQL the tests use: a database of their own, or a skip with the reason.

Each use creates a fresh database (``dispatch_test_<random>``) on the server at 127.0.0.1:5432
(trust auth, as user postgres or root) and drops it afterwards, so the tests never create or
drop tables in a database that someone else owns."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

#: Databases the tests connect to first, only to create and drop their own.
_MAINTENANCE_DBS = ("postgres", "template1")


def _connect_admin(psycopg: Any) -> tuple[Any, str]:
    last: Exception | None = None
    for user in ("postgres", "root"):
        for dbname in _MAINTENANCE_DBS:
            try:
                conn = psycopg.connect(
                    host="127.0.0.1", port=5432, dbname=dbname, user=user, connect_timeout=3, autocommit=True
                )
                return conn, user
            except psycopg.OperationalError as exc:
                last = exc
    pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 (trust auth as postgres or root): {last}")


@contextmanager
def own_postgres_database() -> Iterator[tuple[Any, str, str]]:
    """(connection, user, database name) of a database created for the caller and dropped after;
    skips the calling test when psycopg is missing or no server answers."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg (extra 'postgres') is not installed")
    admin, user = _connect_admin(psycopg)
    dbname = f"dispatch_test_{secrets.token_hex(6)}"
    try:
        admin.execute(f'CREATE DATABASE "{dbname}"')
        try:
            conn = psycopg.connect(host="127.0.0.1", port=5432, dbname=dbname, user=user, connect_timeout=3)
            try:
                yield conn, user, dbname
            finally:
                conn.close()
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    finally:
        admin.close()
