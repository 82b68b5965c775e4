"""A pipelined Redis connection for the API's hot path (auth lookup, triggered-message script).

redis-py's asyncio client costs ~50-60 us of CPU per command here, and more under load (the
blocking pool's condition, per-read timeouts, argument filtering, observability hooks), which is
a third of a ``POST /v1/messages``. :class:`PipelinedRedis` keeps one connection per process and
writes every command at once, matching replies to callers in order (Redis answers in order), so
any number of concurrent requests share it without a pool: ~5-12 us per command. It speaks RESP2
through hiredis' reader (installed with ``redis[hiredis]``) and does only what the hot path needs:
:meth:`PipelinedRedis.hget` and :meth:`PipelinedRedis.evalsha` (with ``SCRIPT LOAD`` on
``NOSCRIPT``). Everything else keeps using redis-py.

It connects the way redis-py reads the URL (``redis.asyncio.connection.parse_url``): ``redis://``
over TCP, ``rediss://`` over TLS with redis-py's ``ssl_*`` query options and defaults (certificate
and host name checked), ``unix://`` to a socket path (database in ``?db=``).

Failures: a lost connection fails every waiting command with ``redis.ConnectionError`` (the same
error redis-py raises, so callers need nothing new) and the next command reconnects; a command
waits at most ``timeout_s`` for its reply, after which the connection is dropped (a reply that
never came would leave every later reply matched to the wrong caller). Error replies become
``redis.ResponseError``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import ssl
from typing import Any, Final

import hiredis
import redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

__all__ = ["PipelinedRedis"]

#: Bytes read from the socket per call.
_READ_SIZE: Final = 256 * 1024


def _encode(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        else:
            data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class PipelinedRedis:
    """One shared, pipelined connection (see the module docstring). Use from one event loop."""

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        options = parse_url(url)  # ValueError for a scheme redis-py does not know
        kind = options.pop("connection_class", None)
        self._path: str | None = options.get("path") if kind is UnixDomainSocketConnection else None
        self._ssl: ssl.SSLContext | None = None
        if kind is SSLConnection:
            self._ssl = SSLConnection(**options).ssl_context.get()  # redis-py's options and defaults
        self._host = options.get("host") or "127.0.0.1"
        self._port = int(options.get("port") or 6379)
        self._db = int(options.get("db") or 0)
        self._password: str | None = options.get("password")
        self._username: str | None = options.get("username")
        self._timeout = timeout_s
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock | None = None
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._scripts: dict[str, bytes] = {}
        #: commands written in this loop iteration, sent with one syscall at its end
        self._outgoing: list[bytes] = []

    async def _connect(self) -> asyncio.StreamWriter:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is not None:
                return self._writer
            try:
                if self._path is not None:
                    stream, writer = await asyncio.open_unix_connection(self._path)
                else:
                    stream, writer = await asyncio.open_connection(self._host, self._port, ssl=self._ssl)
            except OSError as exc:
                raise redis.ConnectionError(f"cannot connect to Redis: {exc}") from exc
            self._writer = writer
            # the reader owns this connection's queue of waiters: after a drop, replies still
            # buffered from the old connection can never reach the new connection's callers
            self._reader_task = asyncio.create_task(
                self._read(stream, writer, self._waiting), name="dispatch-api-redis-reader"
            )
            setup: list[asyncio.Future[Any]] = []
            if self._password:
                auth = (self._username, self._password) if self._username else (self._password,)
                setup.append(self._send(writer, ("AUTH", *auth)))
            if self._db:
                setup.append(self._send(writer, ("SELECT", self._db)))
            for future in setup:
                await self._wait(future)
            return writer

    def _send(self, writer: asyncio.StreamWriter, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(future)
        if not self._outgoing:
            loop.call_soon(self._flush, writer)
        self._outgoing.append(_encode(args))
        return future

    def _flush(self, writer: asyncio.StreamWriter) -> None:
        if self._writer is not writer:
            return  # dropped since: its commands failed already, and a new connection flushes its own
        data, self._outgoing = b"".join(self._outgoing), []
        writer.write(data)

    async def _read(
        self,
        stream: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        waiting: collections.deque[asyncio.Future[Any]],
    ) -> None:
        parser = hiredis.Reader()
        error: BaseException = redis.ConnectionError("Redis closed the connection")
        try:
            while self._writer is writer and (data := await stream.read(_READ_SIZE)):
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future = waiting.popleft()
                    if not future.done():
                        future.set_result(reply)
        except (OSError, IndexError, hiredis.ProtocolError) as exc:
            error = redis.ConnectionError(f"Redis connection lost: {exc}")
        finally:
            self._drop(writer, error)

    def _drop(self, writer: asyncio.StreamWriter, error: BaseException) -> None:
        if self._writer is not writer:
            return
        self._writer = None
        self._outgoing.clear()
        writer.close()
        waiting, self._waiting = self._waiting, collections.deque()
        for future in waiting:
            if not future.done():
                future.set_exception(error)

    async def _wait(self, future: asyncio.Future[Any]) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                reply = await future  # a cancelled future is skipped by the reader: order holds
        except TimeoutError:
            if self._writer is not None:
                self._drop(self._writer, redis.TimeoutError("Redis did not answer in time"))
            raise redis.TimeoutError("Redis did not answer in time") from None
        if isinstance(reply, hiredis.ReplyError):
            raise redis.ResponseError(str(reply))
        return reply

    async def execute(self, *args: Any) -> Any:
        writer = self._writer or await self._connect()
        return await self._wait(self._send(writer, args))

    async def hget(self, name: str, key: str) -> bytes | None:
        reply: bytes | None = await self.execute("HGET", name, key)
        return reply

    async def evalsha(self, source: str, keys: list[Any], args: list[Any]) -> Any:
        """Run a script by its SHA1, loading it on the first ``NOSCRIPT``."""
        sha = self._scripts.get(source)
        if sha is None:
            sha = self._scripts[source] = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest().encode()
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except redis.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.execute("SCRIPT", "LOAD", source)
        return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    async def aclose(self) -> None:
        if self._writer is not None:
            self._drop(self._writer, redis.ConnectionError("closed"))
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            self._reader_task = None
