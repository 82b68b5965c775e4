"""Shared fixtures: a real Valkey/Redis server for every test session.

Set ``DISPATCH_TEST_REDIS_URL`` to use an existing server (its database and the next one are
flushed before each test that asks for them); otherwise an embedded valkey-server is started on
a free port for the session and stopped after it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis
from test_api_support import api_settings

from dispatch.config import Settings, load_settings
from dispatch.store.connect import with_db
from dispatch.store.embedded import ensure_embedded, stop_embedded


@pytest.fixture(scope="session", autouse=True)
def hermetic_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No test reaches the real user's state: the default ``DISPATCH_HOME``
    (``$XDG_DATA_HOME/dispatch``) lies in the session's temporary directory, and a
    ``DISPATCH_HOME`` of the developer's shell is not inherited."""
    data = tmp_path_factory.mktemp("xdg-data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_DATA_HOME", str(data))
        patch.delenv("DISPATCH_HOME", raising=False)
        yield data


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (database 0 unless the env URL names one) of the session's server."""
    env_url = os.environ.get("DISPATCH_TEST_REDIS_URL")
    if env_url:
        yield env_url
        return
    home: Path = tmp_path_factory.mktemp("valkey-home")
    server, _ = ensure_embedded(home)
    try:
        yield server.url
    finally:
        stop_embedded(home)


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """URL of an empty database (flushed before the test)."""
    client = redis.Redis.from_url(redis_server_url)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server_url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def aredis_client(redis_url: str) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def cluster_settings(redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings for a LocalCluster on the test server: app keys in db 0, the broker in db 1
    (flushed before and after), fast redelivery, small batches."""
    settings = load_settings(
        {
            "DISPATCH_HOME": str(tmp_path),
            "DISPATCH_REDIS_URL": with_db(redis_url, 0),
            "DISPATCH_BROKER_DB": "1",
            "DISPATCH_HEARTBEAT_TIMEOUT_MS": "3000",
            "DISPATCH_BATCH_SIZE": "100",
        }
    )
    broker_db = redis.Redis.from_url(with_db(redis_url, 1))
    broker_db.flushdb()
    try:
        yield settings
    finally:
        broker_db.flushdb()
        broker_db.close()


# --- the API beside real workers (tests/test_api_triggered*.py) --------------------------------


@pytest.fixture
def e2e_settings(redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    """API settings on the test server with the broker in db 1 (flushed before and after)."""
    broker_db = redis.Redis.from_url(with_db(redis_url, 1))
    broker_db.flushdb()
    yield api_settings(redis_url, tmp_path, DISPATCH_HEARTBEAT_TIMEOUT_MS="3000")
    broker_db.flushdb()
    broker_db.close()


@pytest.fixture
async def clients(e2e_settings: Settings) -> AsyncIterator[tuple[aredis.Redis, redis.Redis]]:
    assert e2e_settings.redis_url is not None
    app_client = aredis.Redis.from_url(e2e_settings.redis_url)
    sync_client = redis.Redis.from_url(e2e_settings.redis_url)
    yield app_client, sync_client
    sync_client.close()
    await app_client.aclose()
