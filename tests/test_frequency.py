"""Frequency cap against real Redis: read-only plan check, atomic idempotent send reservation."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis
import redis.asyncio as aredis

from dispatch.rules.frequency import AsyncFrequencyStore, FrequencyCap, FrequencyStore

CAP = FrequencyCap(limit=2, window=timedelta(hours=1))
T0 = 1_800_000_000.0


async def test_reserve_until_capped_then_window_rolls(aredis_client: aredis.Redis, redis_client: redis.Redis) -> None:
    send = AsyncFrequencyStore(aredis_client, CAP)
    plan = FrequencyStore(redis_client, CAP)
    assert plan.capped_many("sms", ["+1", "+2"], now=T0) == [False, False]
    assert await send.reserve("sms", "+1", "m1", now=T0) is True
    assert await send.reserve("sms", "+1", "m2", now=T0 + 10) is True
    assert await send.reserve("sms", "+1", "m3", now=T0 + 20) is False
    assert plan.capped_many("sms", ["+1", "+2"], now=T0 + 30) == [True, False]
    assert plan.capped_many("email", ["+1"], now=T0 + 30) == [False]
    # one hour after the first send it leaves the window
    assert plan.capped_many("sms", ["+1"], now=T0 + 3600.5) == [False]
    assert await send.reserve("sms", "+1", "m4", now=T0 + 3601) is True
    assert await send.reserve("sms", "+1", "m5", now=T0 + 3602) is False


async def test_reserve_is_idempotent_per_token(aredis_client: aredis.Redis) -> None:
    send = AsyncFrequencyStore(aredis_client, CAP)
    assert await send.reserve_many("sms", [("+1", "m1"), ("+1", "m1"), ("+1", "m1")], now=T0) == [True] * 3
    assert await send.reserve("sms", "+1", "m2", now=T0) is True
    assert await send.reserve("sms", "+1", "m3", now=T0) is False
    assert await send.release("sms", "+1", "m2") is True
    assert await send.reserve("sms", "+1", "m3", now=T0) is True


async def test_keys_expire_and_hold_no_raw_address(aredis_client: aredis.Redis) -> None:
    send = AsyncFrequencyStore(aredis_client, CAP)
    await send.reserve("sms", "+4915123456789", "m1")
    keys = await aredis_client.keys("*")
    assert len(keys) == 1
    assert b"4915123456789" not in keys[0]
    ttl = await aredis_client.pttl(keys[0])
    assert 0 < ttl <= 3_600_000


async def test_plan_check_is_read_only(redis_client: redis.Redis) -> None:
    FrequencyStore(redis_client, CAP, chunk=2).capped_many("sms", ["+1", "+2", "+3"], now=T0)
    assert redis_client.dbsize() == 0


def test_cap_validation() -> None:
    with pytest.raises(ValueError):
        FrequencyCap(limit=0, window=timedelta(hours=1))
