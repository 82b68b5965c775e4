"""The real PostgreSQL the tests use, or a skip with the reason."""

from __future__ import annotations

from typing import Any

import pytest


def connect_test_postgres() -> tuple[Any, str]:
    """(connection, user) to the PostgreSQL at 127.0.0.1:5432, database ``test`` (trust auth, as
    user postgres or root); skips the calling test when psycopg is missing or no server answers."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg (extra 'postgres') is not installed")
    last: Exception | None = None
    for user in ("postgres", "root"):
        try:
            return psycopg.connect(host="127.0.0.1", port=5432, dbname="test", user=user, connect_timeout=3), user
        except psycopg.OperationalError as exc:
            last = exc
    pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 (database 'test', trust auth): {last}")
