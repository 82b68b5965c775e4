"""Start and stop a whole local deployment: Redis, the mock provider and worker processes.

Used by ``dispatch demo``, the load tests and the end-to-end tests, so all of them run the same
real processes the way an operator would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp
import orjson

from dispatch.config import Secret, Settings
from dispatch.send.broker import QUEUE, build_broker
from dispatch.store.connect import RedisTarget, resolve_redis
from dispatch.store.embedded import stop_embedded

__all__ = ["LocalCluster", "fetch_mock_stats", "settings_env"]

#: How long the mock provider may take to write its URL.
MOCK_START_TIMEOUT_S = 20.0


def fetch_mock_stats(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/_mock/stats", timeout=10) as response:
        data: dict[str, Any] = orjson.loads(response.read())
        return data


def settings_env(settings: Settings) -> dict[str, str]:
    """``DISPATCH_*`` variables that rebuild ``settings`` in another process."""
    env: dict[str, str] = {}
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, Secret):
            text = value.reveal()  # the child needs the secret itself, not its mask
        else:
            text = str(value)
        env[f"DISPATCH_{item.name.upper()}"] = text
    return env


@dataclass
class LocalCluster:
    """Embedded (or configured) Redis + mock provider subprocess + N worker subprocesses."""

    settings: Settings
    workers: int
    mock_args: list[str] = field(default_factory=list)
    worker_env: dict[str, str] = field(default_factory=dict)
    #: One /metrics port per worker (by start order); empty = no endpoints.
    metrics_ports: list[int] = field(default_factory=list)
    #: Where each worker's stderr goes (``worker-<n>.log``); None: inherited.
    log_dir: Path | None = None
    target: RedisTarget | None = None
    mock_url: str = ""
    _mock: subprocess.Popen[bytes] | None = None
    _workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        home = self.settings.home.resolve()
        home.mkdir(parents=True, exist_ok=True)
        self.target = resolve_redis(self.settings)
        self._start_mock(0)
        for _ in range(self.workers):
            self.add_worker()

    def _start_mock(self, port: int) -> None:
        ready = self.settings.home.resolve() / f"mock-{os.getpid()}.url"
        ready.unlink(missing_ok=True)
        self._mock = subprocess.Popen(
            [
                sys.executable, "-m", "loadtest.mock_provider", "--port", str(port), "--ready-file", str(ready),
                "--account-sid", self.settings.sms_account_sid, "--auth-token", self.settings.sms_auth_token.reveal(),
                *self.mock_args,
            ],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + MOCK_START_TIMEOUT_S
        while not ready.exists():
            if self._mock.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the mock provider did not start")
            time.sleep(0.02)
        self.mock_url = ready.read_text().strip()

    def restart_mock(self, *, kill: bool = True) -> None:
        """Stop the mock provider (SIGKILL, a crash, or SIGTERM) and start it again on the same port
        with the same ``mock_args``, so running workers keep their base URLs. Its ledger starts
        empty unless ``mock_args`` has ``--ledger FILE`` (then it is read back from the file)."""
        port = urlsplit(self.mock_url).port
        if port is None:
            raise RuntimeError("the mock provider is not running")
        self._stop_mock(kill=kill)
        self._start_mock(port)

    def env(self) -> dict[str, str]:
        """Environment of the cluster's processes: every setting of ``settings``, pointed at this
        cluster's Redis and mock provider."""
        assert self.target is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
        env.update(settings_env(self.settings))
        env.update(
            DISPATCH_HOME=str(self.settings.home.resolve()),
            DISPATCH_REDIS_URL=self.target.app_url,
            DISPATCH_SMS_BASE_URL=self.mock_url,
            DISPATCH_EMAIL_BASE_URL=self.mock_url,
            DISPATCH_PUSH_BASE_URL=self.mock_url,
            DISPATCH_WEBHOOK_URL=f"{self.mock_url}/webhook",
        )
        env.pop("DISPATCH_METRICS_PORT", None)  # one port per worker: see add_worker
        env.update(self.worker_env)
        return env

    def add_worker(self) -> subprocess.Popen[bytes]:
        env = self.env()
        position = len(self._workers)
        if position < len(self.metrics_ports):
            env["DISPATCH_METRICS_PORT"] = str(self.metrics_ports[position])
        stderr: Any = None
        if self.log_dir is not None:
            stderr = (self.log_dir / f"worker-{position}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatch.cli", "worker"], env=env, stdin=subprocess.DEVNULL, stderr=stderr
        )
        if stderr is not None:
            stderr.close()  # the child holds its own descriptor
        self._workers.append(proc)
        return proc

    @property
    def worker_processes(self) -> list[subprocess.Popen[bytes]]:
        return list(self._workers)

    def mock_stats(self) -> dict[str, Any]:
        return fetch_mock_stats(self.mock_url)

    def wait_drained(self, timeout_s: float = 60.0) -> None:
        """Return once the broker holds no message: none queued, delayed or held by a worker
        (dramatiq's qsize counts unacked messages). The event a test waits for before asserting
        that something did *not* happen (a duplicate send): no fixed sleep guesses it."""
        assert self.target is not None
        broker = build_broker(self.settings, self.target.broker_url)
        try:
            broker.join(QUEUE, interval=50, timeout=int(timeout_s * 1000))
        finally:
            broker.close()

    async def set_faults(self, faults: dict[str, Any]) -> None:
        async with aiohttp.ClientSession() as session, session.post(f"{self.mock_url}/_mock/faults", json=faults) as r:
            r.raise_for_status()

    def _stop_mock(self, *, kill: bool) -> None:
        if self._mock is not None:
            if self._mock.poll() is None:
                self._mock.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    self._mock.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._mock.kill()
                    self._mock.wait()
            self._mock = None

    def stop(self) -> None:
        for proc in self._workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._workers:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._workers.clear()
        self._stop_mock(kill=False)
        if self.target is not None and self.target.started_embedded:
            with contextlib.suppress(Exception):
                stop_embedded(self.settings.home)
        self.target = None
