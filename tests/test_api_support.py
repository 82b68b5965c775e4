"""Shared helpers of the API tests: a live app on 127.0.0.1 port 0 and a caller that checks every
response against the published OpenAPI document (so each API test also keeps the document true)."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis
import redis.asyncio as aredis
from aiohttp import web
from postgres_support import own_postgres_database

from dispatch.api.app import SEALER, ApiLimits, build_app, make_runner
from dispatch.api.auth import SCOPES, ApiKeyStore
from dispatch.api.openapi import openapi_document, response_errors
from dispatch.api.pipelined import PipelinedRedis
from dispatch.config import Settings, load_settings
from dispatch.send.control import EnqueueFn
from dispatch.store.connect import with_db

__all__ = ["PG_PASSWORD", "Api", "Reply", "api_settings", "postgres_table", "running_api"]

#: The password written into test DSNs (the test server trusts local connections and ignores it):
#: it must never show up in an answer or a log line.
PG_PASSWORD = "pw-" + secrets.token_hex(8)


def api_settings(redis_url: str, home: Path, **extra: str) -> Settings:
    env = {
        "DISPATCH_HOME": str(home),
        "DISPATCH_REDIS_URL": with_db(redis_url, 0),
        "DISPATCH_BROKER_DB": "1",
        "DISPATCH_BATCH_SIZE": "50",
    }
    env.update(extra)
    return load_settings(env)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Api:
    base: str
    session: aiohttp.ClientSession
    tokens: dict[str, str]
    enqueued: list[tuple[str, int, int]]
    document: dict[str, Any] = field(default_factory=openapi_document)
    #: (method, path, status) of every call, for the coverage check
    seen: list[tuple[str, str, int]] = field(default_factory=list)
    app: web.Application | None = None
    #: The API's clock for triggered messages (their per-hour campaign, their not-before).
    clock: Callable[[], float] = time.time

    async def flush(self) -> None:
        """Seal and enqueue the triggered messages accepted so far (the sealer lingers ~50 ms)."""
        assert self.app is not None
        await self.app[SEALER].flush()

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = "write",
        json: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        check: bool = True,
    ) -> Reply:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {self.tokens.get(token, token)}"
        kwargs: dict[str, Any] = {"headers": all_headers}
        if json is not None:
            kwargs["data"] = orjson.dumps(json)
            all_headers.setdefault("Content-Type", "application/json")
        elif data is not None:
            kwargs["data"] = data
        async with self.session.request(method, self.base + path, **kwargs) as response:
            body = await response.read()
            reply = Reply(response.status, dict(response.headers), body)
        self.seen.append((method, path.split("?", maxsplit=1)[0], reply.status))
        if check:
            errors = response_errors(
                self.document,
                method,
                path.split("?", maxsplit=1)[0],
                reply.status,
                content_type=reply.headers.get("Content-Type", ""),
                body=body,
            )
            assert not errors, (errors, body[:500])
        return reply


@asynccontextmanager
async def running_api(
    settings: Settings,
    app_client: aredis.Redis,
    sync_client: redis.Redis,
    *,
    enqueue: EnqueueFn | Callable[..., None] | None = None,
    limits: ApiLimits | None = None,
    record_enqueues: bool = True,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Api]:
    enqueued: list[tuple[str, int, int]] = []

    def recording(cid: str, n: int, delay: int) -> None:
        enqueued.append((cid, n, delay))

    chosen = enqueue if enqueue is not None else (recording if record_enqueues else None)
    # provider signatures cover the callback URL, so the app must know its port before it starts
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert settings.redis_url is not None
    pipelined = PipelinedRedis(settings.redis_url)
    app = build_app(
        settings,
        pipelined=pipelined,
        app_client=app_client,
        sync_client=sync_client,
        enqueue=chosen,
        limits=limits,
        public_base_url=f"http://127.0.0.1:{port}",
        clock=clock,
    )
    runner: web.AppRunner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host = "127.0.0.1"
    store = ApiKeyStore(sync_client)
    tokens = {scope: store.create(scope, f"test-{scope}")[0] for scope in SCOPES}
    try:
        async with aiohttp.ClientSession() as session:
            yield Api(f"http://{host}:{port}", session, tokens, enqueued, app=app, clock=clock)
    finally:
        await runner.cleanup()
        await pipelined.aclose()


@contextmanager
def postgres_table(rows: Sequence[Mapping[str, str]]) -> Iterator[tuple[str, str]]:
    """(DSN with a password, table name) of a real table holding ``rows`` (columns from the first
    row, all text) in a database of the test's own on the PostgreSQL at 127.0.0.1:5432 (see
    postgres_support); the test is skipped when none answers. The database is dropped afterwards."""
    with own_postgres_database() as (conn, user, dbname):
        table = f"dispatch_audience_{secrets.token_hex(4)}"
        columns = list(rows[0])
        with conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {table} ({', '.join(f'{c} text' for c in columns)})")
            marks = ", ".join(["%s"] * len(columns))
            cur.executemany(f"INSERT INTO {table} VALUES ({marks})", [[row[c] for c in columns] for row in rows])
        conn.commit()
        yield f"postgresql://{user}:{PG_PASSWORD}@127.0.0.1:5432/{dbname}", table
