"""The API's pipelined hot-path connection against a real Redis: replies matched in order under
concurrency, error replies, script loading on NOSCRIPT, database selection, a killed connection
failing its waiters and the next command reconnecting; the short auth cache of ``dispatch serve``."""

from __future__ import annotations

import asyncio

import pytest
import redis

from dispatch.api.auth import KEYS_HASH, ApiKeyStore, AsyncApiKeyLookup, hash_token
from dispatch.api.pipelined import PipelinedRedis
from dispatch.store.connect import with_db

SCRIPT = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"


async def test_concurrent_commands_get_their_own_replies(redis_url: str, redis_client: redis.Redis) -> None:
    redis_client.hset("h", mapping={str(i): f"v{i}" for i in range(500)})
    hot = PipelinedRedis(redis_url)
    try:
        replies = await asyncio.gather(*(hot.hget("h", str(i)) for i in range(500)))
        assert replies == [f"v{i}".encode() for i in range(500)]
        assert await hot.hget("h", "missing") is None
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            await hot.execute("LPUSH", "h", "x")
        assert await hot.hget("h", "7") == b"v7"  # an error reply keeps the order intact
    finally:
        await hot.aclose()


async def test_scripts_load_on_noscript_and_the_database_is_selected(redis_url: str, redis_client: redis.Redis) -> None:
    redis_client.script_flush()
    hot = PipelinedRedis(with_db(redis_url, 1))
    other = redis.Redis.from_url(with_db(redis_url, 1))
    try:
        other.delete("n")
        assert await hot.evalsha(SCRIPT, ["n"], ["a"]) == [b"n", b"a", 1]
        assert await hot.evalsha(SCRIPT, ["n"], [b"\x00\xff"]) == [b"n", b"\x00\xff", 2]
        assert other.get("n") == b"2" and redis_client.get("n") is None
    finally:
        other.delete("n")
        other.close()
        await hot.aclose()


async def test_a_lost_connection_fails_its_waiters_and_the_next_command_reconnects(
    redis_url: str, redis_client: redis.Redis
) -> None:
    hot = PipelinedRedis(redis_url)
    try:
        await hot.execute("CLIENT", "SETNAME", "hot-path")
        blocked = asyncio.ensure_future(hot.execute("BLPOP", "never", 0))
        await asyncio.sleep(0.05)
        assert redis_client.client_kill_filter(_type="normal", skipme=True) >= 1
        with pytest.raises(redis.ConnectionError):
            await blocked
        assert await hot.execute("PING") == b"PONG"
        timing_out = PipelinedRedis(redis_url, timeout_s=0.2)
        with pytest.raises(redis.TimeoutError):
            await timing_out.execute("BLPOP", "never", 1)
        assert await timing_out.execute("PING") == b"PONG"  # a new connection: no stray reply
        await timing_out.aclose()
    finally:
        await hot.aclose()


async def test_the_auth_cache_keeps_valid_keys_briefly_and_never_unknown_ones(
    redis_url: str, redis_client: redis.Redis
) -> None:
    store = ApiKeyStore(redis_client)
    hot = PipelinedRedis(redis_url)
    now = [1000.0]
    lookup = AsyncApiKeyLookup(hot, cache_s=0.3, clock=lambda: now[0])
    try:
        token, key = store.create("write")
        assert await lookup.lookup(token) == key
        assert store.revoke(key.id)
        now[0] += 0.29
        assert await lookup.lookup(token) == key  # trusted for cache_s after a lookup
        now[0] += 0.02
        assert await lookup.lookup(token) is None
        late = "dsp_" + "B" * 43
        assert await lookup.lookup(late) is None
        redis_client.hset(KEYS_HASH, hash_token(late), key.to_json())  # the key is created now
        assert await lookup.lookup(late) == key  # a miss was not cached
    finally:
        await hot.aclose()
