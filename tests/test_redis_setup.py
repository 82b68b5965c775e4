from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from dispatch.config import load_settings
from dispatch.errors import EvictionPolicyError
from dispatch.store.connect import check_server, resolve_redis
from dispatch.store.embedded import ensure_embedded, find_embedded, stop_embedded


def test_embedded_server_is_shared_and_configured_safely(tmp_path: Path) -> None:
    server, started = ensure_embedded(tmp_path)
    try:
        assert started
        again, started_again = ensure_embedded(tmp_path)
        assert (again.port, again.pid, started_again) == (server.port, server.pid, False)
        client = redis.Redis.from_url(server.url)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        client.close()
    finally:
        assert stop_embedded(tmp_path)
    assert find_embedded(tmp_path) is None
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)


def test_resolve_starts_embedded_and_splits_databases(tmp_path: Path) -> None:
    settings = load_settings({"DISPATCH_HOME": str(tmp_path)})
    target = resolve_redis(settings)
    try:
        assert target.started_embedded
        assert target.app_url.endswith("/0")
        assert target.broker_url.endswith(f"/{settings.broker_db}")
    finally:
        stop_embedded(tmp_path)


def test_eviction_policy_is_refused_with_a_fix(tmp_path: Path) -> None:
    server, _ = ensure_embedded(tmp_path)
    client = redis.Redis.from_url(server.url)
    try:
        client.config_set("maxmemory-policy", "volatile-lru")
        with pytest.raises(EvictionPolicyError) as info:
            check_server(client)
        assert "volatile-lru" in str(info.value)
        assert "CONFIG SET maxmemory-policy noeviction" in str(info.value)
        settings = load_settings({"DISPATCH_REDIS_URL": server.url, "DISPATCH_HOME": str(tmp_path)})
        with pytest.raises(EvictionPolicyError):
            resolve_redis(settings)
        client.config_set("maxmemory-policy", "noeviction")
        check_server(client)
    finally:
        client.close()
        stop_embedded(tmp_path)
