"""Wrong input and unreachable servers through the real CLI: one line on stderr, a non-zero exit,
never a traceback, never a secret; and the Redis URL schemes the settings accept actually work."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from dispatch.campaign import CampaignSpec
from dispatch.cli import main as cli_main
from dispatch.errors import PlanError
from dispatch.store import keys
from dispatch.store.embedded import valkey_binary
from loadtest.audience import generate_rows

#: Generous: the machine is shared and slow; every wait below ends as soon as its condition holds.
DEADLINE_S = 60.0


def _env(redis_url: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    return {**env, "DISPATCH_REDIS_URL": redis_url, "DISPATCH_HOME": str(home)}


def _cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatch.cli", *argv],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )


def _refused(result: subprocess.CompletedProcess[str], *named: str) -> str:
    """The run failed with exactly one line on stderr that names ``named``; returns that line."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


def _plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str, campaign: str, count: int) -> None:
    monkeypatch.setenv("DISPATCH_REDIS_URL", redis_url)
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path))
    audience = tmp_path / f"{campaign}.csv"
    with audience.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "phone", "first_name"])
        writer.writeheader()
        writer.writerows(generate_rows(count, seed=7))
    spec = tmp_path / f"{campaign}.json"
    spec.write_bytes(orjson.dumps({"id": campaign, "channel": "sms", "body": "Hi $first_name"}))
    assert cli_main(["plan", str(spec), "--audience", str(audience), "--json"]) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_rate_refuses_a_negative_or_non_numeric_rate_and_keeps_the_cap(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plan(tmp_path, monkeypatch, redis_url, "rated", 20)
    env = _env(redis_url, tmp_path)
    assert _cli("rate", "rated", "40", env=env).returncode == 0
    for typo in ("-5", "fast", "nan", "1e-400"):
        _refused(_cli("rate", "rated", typo, env=env), f"'{typo}'")
        assert redis_client.hget(keys.control("rated"), "rate") == b"40.0"  # the cap is still there
    removed = _cli("rate", "rated", "unlimited", env=env)
    assert removed.returncode == 0 and "unlimited" in removed.stdout
    assert redis_client.hget(keys.control("rated"), "rate") == b""
    assert _cli("rate", "rated", "25", env=env).returncode == 0
    assert _cli("rate", "rated", "0", env=env).returncode == 0  # the documented zero still removes it
    assert redis_client.hget(keys.control("rated"), "rate") == b""


@pytest.mark.parametrize(
    ("line", "named"),
    [('rate = "fast"', ("rate", "'fast'")), ('batch_size = "big"', ("batch_size", "'big'"))],
)
def test_campaign_file_with_a_wrong_type_is_a_one_line_error(
    redis_url: str, tmp_path: Path, line: str, named: tuple[str, ...]
) -> None:
    campaign = tmp_path / "c.toml"
    campaign.write_text(f'id = "typed"\nchannel = "sms"\nbody = "Hi $first_name"\n{line}\n')
    audience = tmp_path / "a.csv"
    audience.write_text("id,phone,first_name\n1,+14155550100,Ann\n")
    _refused(_cli("plan", str(campaign), "--audience", str(audience), env=_env(redis_url, tmp_path)), *named)


@pytest.mark.parametrize(
    ("field", "value"),
    [("rate", True), ("rate", float("inf")), ("rate", "200"), ("batch_size", 1.5), ("batch_size", True)],
)
def test_campaign_spec_types_are_checked(field: str, value: object) -> None:
    with pytest.raises(PlanError, match=field):
        CampaignSpec.from_mapping({"id": "t", "channel": "sms", "body": "Hi", field: value})
    with pytest.raises(PlanError, match=field):
        CampaignSpec(id="t", channel="sms", body="Hi", **{field: value})  # type: ignore[arg-type]
    assert CampaignSpec.from_mapping({"id": "t", "channel": "sms", "body": "Hi", "batch_size": 100.0}).batch_size == 100


def test_api_nobody_listens_on_is_a_one_line_error_without_secrets(tmp_path: Path, redis_url: str) -> None:
    port = _free_port()
    env = _env(redis_url, tmp_path)
    url = f"http://operator:hunter2@127.0.0.1:{port}/?key=also-secret"
    line = _refused(_cli("--api", url, "--token", "dsp_secret_token", "status", "c1", env=env), f"127.0.0.1:{port}")
    for secret in ("hunter2", "also-secret", "dsp_secret_token", "operator"):
        assert secret not in line
    _refused(_cli("--api", f"127.0.0.1:{port}", "--token", "dsp_x", "status", "c1", env=env), f"127.0.0.1:{port}")


def test_bad_output_file_is_a_one_line_error(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _plan(tmp_path, monkeypatch, redis_url, "exported", 5)
    target = tmp_path / "no-such-dir" / "out.jsonl"
    _refused(_cli("export", "exported", "--output", str(target), env=_env(redis_url, tmp_path)), str(target))


def test_export_into_a_closed_pipe_exits_quietly(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plan(tmp_path, monkeypatch, redis_url, "piped", 5000)  # ~700 kB of JSONL: far more than a pipe holds
    process = subprocess.Popen(
        [sys.executable, "-m", "dispatch.cli", "export", "piped"],
        env=_env(redis_url, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    assert orjson.loads(process.stdout.readline())["batch"] == 0  # `| head -1`
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=DEADLINE_S) == 1  # the export did not finish: not 0
    assert stderr == ""


@contextlib.contextmanager
def _valkey_on_a_unix_socket(directory: Path) -> Iterator[Path]:
    """A real valkey-server listening only on a unix socket (``--port 0``: no TCP)."""
    sock = directory / "valkey.sock"
    server = subprocess.Popen(
        [str(valkey_binary()), "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            try:
                with redis.Redis(unix_socket_path=str(sock)) as client:
                    client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and server.poll() is None, "valkey-server did not start"
                time.sleep(0.05)
        yield sock
    finally:
        server.terminate()
        server.wait(timeout=DEADLINE_S)


def test_serve_and_commands_over_a_unix_socket_url(tmp_path: Path) -> None:
    with _valkey_on_a_unix_socket(tmp_path) as sock:
        env = _env(f"unix://{sock}", tmp_path)
        created = _cli("apikey", "create", "--scope", "read", env=env)
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip()
        with redis.Redis(unix_socket_path=str(sock), db=0) as app_db:
            assert app_db.dbsize() > 0  # the key went to the application database on that socket
        port = _free_port()
        serve = subprocess.Popen(
            [sys.executable, "-m", "dispatch.cli", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert serve.stdout is not None and serve.stderr is not None
        try:
            line = serve.stdout.readline()  # blocks until it listens, or ends
            assert "listening" in line, serve.stderr.read() if serve.poll() is not None else line
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/campaigns/nope", headers={"Authorization": f"Bearer {token}"}
            )
            # the key is looked up on the pipelined connection over the socket: 404, not 401/500
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(request, timeout=DEADLINE_S)
            assert answer.value.code == 404
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=DEADLINE_S)
