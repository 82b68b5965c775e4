from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from dispatch.cli import main
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
        assert target.started_embedded and target.embedded_home == tmp_path.resolve()
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


def test_a_command_that_starts_the_embedded_server_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dispatch plan`` (any command that needs Redis) may start the embedded server, which keeps
    running: one line on stderr says so, where its data is and how to stop it; later commands
    find it and say nothing. ``dispatch redis status`` names the home it looked in."""
    home = tmp_path / "home"
    for name in ("DISPATCH_REDIS_URL", "DISPATCH_API_URL", "DISPATCH_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DISPATCH_HOME", str(home))
    monkeypatch.setenv("DISPATCH_CPU_SPEED_PROBE", "false")
    (tmp_path / "c.toml").write_text('id = "c1"\nchannel = "sms"\nbody = "hi"\nquiet_hours = false\n')
    (tmp_path / "a.csv").write_text("id,phone\n1,+447400123456\n")
    try:
        assert main(["plan", str(tmp_path / "c.toml"), "--audience", str(tmp_path / "a.csv")]) == 0
        err = capsys.readouterr().err
        notices = [line for line in err.splitlines() if "started an embedded Valkey server" in line]
        assert len(notices) == 1, err
        assert f"DISPATCH_HOME={home}" in notices[0] and str(home / "valkey-data") in notices[0]
        assert "dispatch redis stop" in notices[0]
        assert main(["status", "c1"]) == 0
        assert "embedded" not in capsys.readouterr().err  # found running: nothing to say
        assert main(["redis", "status"]) == 0
        assert f"DISPATCH_HOME={home}" in capsys.readouterr().out
    finally:
        stop_embedded(home)
    assert main(["redis", "status"]) == 1
    assert f"not running (DISPATCH_HOME={home})" in capsys.readouterr().out


def test_embedded_server_killed_comes_back_on_its_port_with_its_data(tmp_path: Path) -> None:
    """A crashed embedded server restarts on the same port: workers holding its URL reconnect on
    their own; what it had written to its AOF is still there."""
    server, _ = ensure_embedded(tmp_path)
    try:
        client = redis.Redis.from_url(server.url)
        client.set("kept", b"1")
        client.execute_command("BGREWRITEAOF")  # on disk now, whatever the fsync timing
        _wait_until(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0)
        client.close()
        os.kill(server.pid, signal.SIGKILL)
        _wait_until(lambda: find_embedded(tmp_path) is None)
        again, started = ensure_embedded(tmp_path)
        assert started and again.port == server.port and again.pid != server.pid
        client = redis.Redis.from_url(server.url)  # the old URL
        assert client.get("kept") == b"1"
        client.close()
    finally:
        stop_embedded(tmp_path)


def _wait_until(condition: Callable[[], bool], within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
