"""The API benchmark's load generator: a minimal keep-alive HTTP/1.1 client, against a real
aiohttp server on a real socket; and the API benchmark itself, end to end on a small rate."""

from __future__ import annotations

import csv
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from loadtest import bench_api
from loadtest.http_lite import LiteHttp, LiteHttpError


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, int, list[int]]]:
    peers: list[int] = []  # the client port of every request: one per connection reused

    async def echo(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        body = await request.read()
        headers = {"X-Seen-Key": request.headers.get("Idempotency-Key", "")}
        return web.Response(status=201, body=body, headers=headers)

    async def missing(request: web.Request) -> web.Response:
        return web.json_response({"title": "no such thing"}, status=404)

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"part")
        await response.write_eof()
        return response

    async def hang_up(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/echo", echo)
    app.router.add_get("/missing", missing)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/hang-up", hang_up)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield "127.0.0.1", port, peers
    finally:
        await runner.cleanup()


async def test_requests_reuse_one_keep_alive_connection_and_bodies_come_back_whole(
    server: tuple[str, int, list[int]],
) -> None:
    host, port, peers = server
    client = LiteHttp(host, port)
    try:
        small = await client.request("POST", "/echo", {"Idempotency-Key": "k-1"}, b'{"a":1}')
        large_body = bytes(range(256)) * 8192  # 2 MiB: many reads on both sides
        large = await client.request("POST", "/echo", {}, large_body)
        missing = await client.request("GET", "/missing")
    finally:
        client.close()
    assert small == (201, b'{"a":1}')
    assert large == (201, large_body)
    assert missing[0] == 404 and b"no such thing" in missing[1]
    assert len(peers) == 2 and peers[0] == peers[1], "the second request opened a new connection"


async def test_concurrent_requests_get_their_own_answers(server: tuple[str, int, list[int]]) -> None:
    import asyncio

    host, port, peers = server
    client = LiteHttp(host, port)
    try:
        answers = await asyncio.gather(*(client.request("POST", "/echo", {}, b"%d" % i) for i in range(50)))
    finally:
        client.close()
    assert answers == [(201, b"%d" % i) for i in range(50)]
    assert 1 < len(set(peers)) <= 50  # in flight at once: one connection each


async def test_what_it_does_not_speak_is_an_error_not_a_wrong_answer(server: tuple[str, int, list[int]]) -> None:
    host, port, _ = server
    client = LiteHttp(host, port)
    try:
        with pytest.raises(LiteHttpError, match="Content-Length"):
            await client.request("GET", "/chunked")
        with pytest.raises(LiteHttpError, match="closed"):
            await client.request("GET", "/hang-up")
        assert (await client.request("POST", "/echo", {}, b"after"))[1] == b"after"  # a fresh connection
    finally:
        client.close()


@pytest.mark.slow
def test_api_bench_runs_end_to_end_and_writes_its_timeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    timeline = tmp_path / "timeline.csv"
    args = ["--rate", "100", "--seconds", "1", "--campaign", "300", "--workers", "1", "--timeline", str(timeline)]
    assert bench_api.main(args) == 0
    out = capsys.readouterr().out
    assert "errors 0" in out and "errors 1" not in out
    with timeline.open() as handle:
        rows = list(csv.DictReader(handle))
    phases = {row["phase"] for row in rows}
    assert {"baseline GET /healthz", "POST /v1/messages idle", "POST /v1/messages + campaign"} <= phases
    assert sum(row["phase"] == "POST /v1/messages idle" for row in rows) == 100
    # every queued message reached the mock once: "N messages accepted of N queued", 0 duplicates
    match = re.search(r"mock provider: (\d+) messages accepted of (\d+) queued .*, (\d+) duplicates", out)
    assert match, out
    accepted, queued, duplicates = (int(group) for group in match.groups())
    assert accepted == queued > 300 * 0.9 and duplicates == 0
