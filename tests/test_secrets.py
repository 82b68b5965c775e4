"""Secrets: settings never print them, the suppression key and the embedded server's password are
generated per deployment into its home (private files), and every process of it agrees on them."""

from __future__ import annotations

import multiprocessing
import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from dispatch.campaign import CampaignSpec
from dispatch.config import Secret, Settings, load_settings
from dispatch.credentials import MASK, home_secret, redact_url
from dispatch.errors import ConfigError
from dispatch.plan.planner import Planner
from dispatch.rules.suppression import SUPPRESSION_KEY_FILE, SuppressionStore, hasher_for
from dispatch.send.broker import build_broker, enqueue_batch
from dispatch.send.control import CampaignControl
from dispatch.store.connect import resolve_redis
from dispatch.store.embedded import PASSWORD_FILE, ensure_embedded, find_embedded, stop_embedded
from loadtest.cluster import LocalCluster, settings_env


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _secret_env(home: Path) -> tuple[dict[str, str], list[str]]:
    values = {
        name: f"{name.lower()}-{secrets.token_hex(8)}"
        for name in (
            "SMS_AUTH_TOKEN",
            "EMAIL_API_KEY",
            "PUSH_ACCESS_TOKEN",
            "WEBHOOK_SECRET",
            "API_TOKEN",
            "API_KEY_PEPPER",
            "SUPPRESSION_KEY",
            "RECEIPT_WEBHOOK_SECRET",
        )
    }
    password = f"redispw{secrets.token_hex(8)}"
    env = {f"DISPATCH_{name}": value for name, value in values.items()}
    env.update(DISPATCH_HOME=str(home), DISPATCH_REDIS_URL=f"redis://app:{password}@db.internal:6380/0")
    return env, [*values.values(), password]


# --- secrets never print -----------------------------------------------------------------------


def test_settings_repr_str_and_format_show_no_secret(tmp_path: Path) -> None:
    env, hidden = _secret_env(tmp_path)
    settings = load_settings(env)
    for shown in (repr(settings), str(settings), f"{settings}", f"{settings!r}", f"{settings.sms_auth_token:>20}"):
        for value in hidden:
            assert value not in shown
    assert MASK in repr(settings) and "db.internal:6380" in repr(settings)  # the host stays visible
    assert repr(settings.email_api_key) == repr(MASK) and str(settings.webhook_secret) == MASK
    assert settings.sms_auth_token.reveal() == env["DISPATCH_SMS_AUTH_TOKEN"]
    assert redact_url(env["DISPATCH_REDIS_URL"]) == f"redis://app:{MASK}@db.internal:6380/0"
    # a directly built Settings wraps plain text too; equal secrets compare equal
    assert Settings(sms_auth_token="t0ken-value").sms_auth_token == Secret("t0ken-value")  # type: ignore[arg-type]
    assert "t0ken-value" not in repr(Settings(sms_auth_token="t0ken-value"))  # type: ignore[arg-type]


def test_child_processes_get_the_real_secrets_not_their_masks(tmp_path: Path) -> None:
    env, _ = _secret_env(tmp_path)
    settings = load_settings(env)
    assert load_settings(settings_env(settings)) == settings
    assert settings_env(settings)["DISPATCH_API_KEY_PEPPER"] == env["DISPATCH_API_KEY_PEPPER"]


def test_worker_start_up_logs_show_no_secret(tmp_path: Path, redis_url: str) -> None:
    env, hidden = _secret_env(tmp_path)
    env["DISPATCH_REDIS_URL"] = redis_url  # a reachable server (its password is hidden too)
    password = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs.get("password")
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")} | env
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatch.cli", "worker", "--threads", "1"],
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode(errors="replace")
        if not line:
            break
        lines.append(line)
        if "started with" in line:
            break
    proc.terminate()
    rest, _ = proc.communicate(timeout=30)
    output = "".join(lines) + rest.decode(errors="replace")
    assert "started with" in output, output
    for value in [*hidden, *([password] if password else [])]:
        assert value not in output


# --- the suppression key -----------------------------------------------------------------------


def test_generated_suppression_key_is_private_random_and_shared_by_the_deployment(tmp_path: Path) -> None:
    settings = load_settings({"DISPATCH_HOME": str(tmp_path)})
    hasher = hasher_for(settings)
    assert len(hasher.key) == 64 and hasher.key != b""  # never unkeyed
    key_file = tmp_path / SUPPRESSION_KEY_FILE
    assert _mode(key_file) == 0o600
    assert key_file.read_text().strip().encode() == hasher.key
    assert hasher_for(load_settings({"DISPATCH_HOME": str(tmp_path)})) == hasher  # another process, same key
    other = tmp_path / "other-deployment"
    assert hasher_for(load_settings({"DISPATCH_HOME": str(other)})).key != hasher.key
    # the setting, when given, wins over the file
    given = load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_SUPPRESSION_KEY": "k" * 64})
    assert hasher_for(given).key == b"k" * 64


def test_unsafe_key_files_and_keys_are_refused(tmp_path: Path) -> None:
    settings = load_settings({"DISPATCH_HOME": str(tmp_path)})
    hasher_for(settings)
    (tmp_path / SUPPRESSION_KEY_FILE).chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by others.*chmod 600"):
        hasher_for(settings)
    (tmp_path / SUPPRESSION_KEY_FILE).chmod(0o600)
    (tmp_path / SUPPRESSION_KEY_FILE).write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        hasher_for(settings)
    with pytest.raises(ConfigError, match=r"DISPATCH_SUPPRESSION_KEY.*64 bytes"):
        load_settings({"DISPATCH_SUPPRESSION_KEY": "k" * 65})


def _read_secret(path: str) -> str:
    return home_secret(Path(path)).reveal()


def test_processes_starting_at_once_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "race" / "shared.key"
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        values = pool.map(_read_secret, [str(path)] * 24)
    assert len(set(values)) == 1 and values[0] == path.read_text().strip()
    assert [p.name for p in path.parent.iterdir()] == ["shared.key"]  # no temporary file left


def test_planner_and_worker_subprocess_hash_with_the_same_generated_key(cluster_settings: Settings) -> None:
    assert not cluster_settings.suppression_key  # nothing configured: the generated key
    rows = [{"id": f"r{i}", "phone": f"+447400{i:06d}", "first_name": "Ann"} for i in range(40)]
    with LocalCluster(cluster_settings, workers=1) as cluster:
        assert cluster.target is not None
        client = redis.Redis.from_url(cluster.target.app_url)
        broker = build_broker(cluster_settings, cluster.target.broker_url)
        try:
            store = SuppressionStore(client, hasher=hasher_for(cluster_settings))
            store.add("sms", ["+447400000001"])  # before planning: the planner drops it
            plan = Planner.for_settings(client, cluster_settings).plan(
                CampaignSpec(id="key-agree", channel="sms", body="Hi $first_name", quiet_hours=None), rows
            )
            assert plan.accepted == 39 and plan.rejected == {"suppressed": 1}
            store.add("sms", ["+447400000002"])  # after planning: only the worker can drop it
            control = CampaignControl(client, lambda cid, n, d: enqueue_batch(broker, cid, n, d))
            control.start("key-agree")
            deadline = time.monotonic() + 90
            while not control.status("key-agree").complete and time.monotonic() < deadline:
                time.sleep(0.1)
            status = control.status("key-agree")
            stats = cluster.mock_stats()
        finally:
            broker.close()
            client.close()
    assert status.complete, status.as_dict()
    assert status.counters["suppressed"] == 1
    assert stats["accepted"] == status.counters["sent"] == 38


# --- the embedded server's password and files --------------------------------------------------


def test_embedded_server_needs_its_password_and_keeps_its_files_private(tmp_path: Path) -> None:
    data = tmp_path / "valkey-data"
    data.mkdir(mode=0o755)
    (data / "left-by-an-old-version.aof").write_text("x")
    (data / "left-by-an-old-version.aof").chmod(0o644)
    server, started = ensure_embedded(tmp_path)
    try:
        assert started
        password = (tmp_path / PASSWORD_FILE).read_text().strip()
        assert len(password) == 64 and server.password.reveal() == password
        anonymous = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            anonymous.set("admin-key", "minted")
        anonymous.close()
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        client.close()
        assert password not in repr(server) and password not in server.shown_url
        target = resolve_redis(load_settings({"DISPATCH_HOME": str(tmp_path)}))
        assert target.app_url == server.url and password not in repr(target)
        time.sleep(1.2)  # appendfsync everysec: the AOF exists on disk
        assert _mode(data) == 0o700
        files = [p for p in data.rglob("*") if p.is_file()]
        assert len(files) >= 2 and all(_mode(p) == 0o600 for p in files), {p.name: oct(_mode(p)) for p in files}
        assert all(_mode(p) == 0o700 for p in data.rglob("*") if p.is_dir())
        for name in (PASSWORD_FILE, "valkey.log", "valkey.pid"):
            assert _mode(tmp_path / name) == 0o600, name
        assert password not in (tmp_path / "valkey.log").read_text()
        assert password not in (tmp_path / "valkey.json").read_text()
        with open(f"/proc/{server.pid}/cmdline", "rb") as handle:  # not visible to ps
            assert password.encode() not in handle.read()
    finally:
        assert stop_embedded(tmp_path)
    again, _ = ensure_embedded(tmp_path, port=server.port)
    try:
        assert again.url == server.url  # the same password after a restart: URLs stay valid
        assert redis.Redis.from_url(again.url).get("k") == b"v"
    finally:
        stop_embedded(tmp_path)


def test_a_server_started_without_a_password_is_restarted_with_one(tmp_path: Path) -> None:
    """A server left running by an older version (no requirepass) is shut down and started again
    with the password, on the same data."""
    ensure_embedded(tmp_path)
    assert stop_embedded(tmp_path)
    old, _ = ensure_embedded(tmp_path)
    redis.Redis.from_url(old.url).set("kept", "1")
    redis.Redis.from_url(old.url).config_set("requirepass", "")  # as an older version ran it
    assert find_embedded(tmp_path) is None
    try:
        server, started = ensure_embedded(tmp_path)
        assert started and server.pid != old.pid
        assert redis.Redis.from_url(server.url).get("kept") == b"1"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
    finally:
        stop_embedded(tmp_path)
