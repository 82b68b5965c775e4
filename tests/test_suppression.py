"""Suppression store against real Redis: hashes only, batch membership, import/export."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis

from dispatch.rules.suppression import GLOBAL, AddressHasher, AsyncSuppressionStore, SuppressionStore

#: The key of stores tested on their own (a deployment's stores use ``hasher_for(settings)``).
TEST_HASHER = AddressHasher(key=b"test-suppression-key")


def test_add_contains_remove(redis_client: redis.Redis) -> None:
    store = SuppressionStore(redis_client, hasher=TEST_HASHER, chunk=3)
    assert store.add("sms", ["+4915123456789", "+12015550123"]) == 2
    assert store.add("sms", ["+4915123456789"]) == 0
    addrs = ["+4915123456789", "+12015550123", "+441234", "a@b.de"] * 2
    assert store.contains_many("sms", addrs) == [True, True, False, False] * 2
    assert store.contains_many("email", addrs) == [False] * 8
    assert store.remove("sms", ["+12015550123"]) == 1
    assert store.contains_many("sms", ["+12015550123"]) == [False]
    assert store.count("sms") == 1


def test_global_blocklist_applies_to_every_channel(redis_client: redis.Redis) -> None:
    store = SuppressionStore(redis_client, hasher=TEST_HASHER)
    store.add(GLOBAL, ["a@b.de"])
    assert store.contains_many("email", ["a@b.de", "c@d.de"]) == [True, False]
    assert store.contains_many("sms", ["a@b.de"]) == [True]


def test_raw_address_never_stored(redis_client: redis.Redis) -> None:
    store = SuppressionStore(redis_client, hasher=AddressHasher(key=b"secret"))
    store.add("sms", ["+4915123456789"])

    def members(key: bytes) -> list[bytes]:
        kind = redis_client.type(key)
        if kind == b"zset":  # the recent additions: "<channel>:<hash hex>"
            return [bytes(m) for m in redis_client.zrange(key, 0, -1)]
        return [bytes(m) for m in redis_client.smembers(key)]

    dump = b"".join(bytes(k) + b"".join(members(k)) for k in redis_client.keys("*"))
    assert b"4915123456789" not in dump
    assert len(next(iter(redis_client.smembers("dispatch:suppress:sms")))) == 16
    # a different key gives a different hash: the keyed list does not match another key's lookup
    assert SuppressionStore(redis_client, hasher=TEST_HASHER).contains_many("sms", ["+4915123456789"]) == [False]


def test_import_and_export_hashes(redis_client: redis.Redis, tmp_path: Path) -> None:
    src = tmp_path / "optouts.txt"
    src.write_text("# opt-outs\n+49 151 23456789\n\nnot-a-phone\n+1 201 555 0123\n+4915123456789\n")
    store = SuppressionStore(redis_client, hasher=TEST_HASHER, chunk=2)

    def normalize(raw: str) -> str | None:
        digits = raw.replace(" ", "")
        return digits if digits.startswith("+") else None

    result = store.import_file(src, "sms", normalize)
    assert (result.added, result.invalid) == (2, 1)
    exported = sorted(store.export("sms"))
    assert exported == sorted(TEST_HASHER(a).hex() for a in ["+4915123456789", "+12015550123"])
    other = SuppressionStore(redis_client, hasher=TEST_HASHER, prefix="other")
    assert other.import_hashes("sms", exported) == 2
    assert other.contains_many("sms", ["+12015550123"]) == [True]


async def test_async_store(aredis_client: aredis.Redis, redis_client: redis.Redis) -> None:
    astore = AsyncSuppressionStore(aredis_client, hasher=TEST_HASHER)
    assert await astore.add("push", ["tok1", "tok2"]) == 2
    assert await astore.contains_many("push", ["tok1", "tok3"]) == [True, False]
    # the sync store sees the same data
    assert SuppressionStore(redis_client, hasher=TEST_HASHER).contains_many("push", ["tok2"]) == [True]
    assert await astore.remove("push", ["tok1"]) == 1
    assert await astore.contains_many("push", ["tok1"]) == [False]


def test_a_process_with_another_key_is_refused_instead_of_missing_the_opt_outs(
    redis_client: redis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dispatch.config import load_settings
    from dispatch.plan.planner import Planner
    from dispatch.rules.suppression import SuppressionKeyMismatch, check_suppression_key, hasher_for

    ours, theirs = AddressHasher(key=b"deployment-key"), AddressHasher(key=b"another-host-key")
    check_suppression_key(redis_client, ours)  # the first process records the key's id
    SuppressionStore(redis_client, hasher=ours).add("sms", ["+447400000001"])
    check_suppression_key(redis_client, ours)  # the same key: fine, again and again
    with pytest.raises(SuppressionKeyMismatch, match="differs"):
        check_suppression_key(redis_client, theirs)
    assert b"deployment-key" not in (redis_client.get("dispatch:suppress:key-id") or b"")  # an id, not the key
    # a deployment planner with a freshly generated key (another home) is refused the same way
    with pytest.raises(SuppressionKeyMismatch):
        Planner.for_settings(redis_client, load_settings({"DISPATCH_HOME": str(tmp_path)}))
    # a list written before key ids existed: the first process records its key, and says so
    redis_client.flushdb()
    SuppressionStore(redis_client, hasher=theirs).add("sms", ["+447400000001"])
    check_suppression_key(redis_client, hasher_for(load_settings({"DISPATCH_HOME": str(tmp_path)})))
    assert "has no recorded key" in caplog.text
    with pytest.raises(SuppressionKeyMismatch):
        check_suppression_key(redis_client, theirs)
