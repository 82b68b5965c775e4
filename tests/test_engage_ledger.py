"""The engagement ledger records each (message, event) once and counts it once."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio as aredis

from dispatch.engage.ledger import EngagementLedger, UnknownEvent, batch_events, engagement_counters
from dispatch.store import keys


async def test_first_event_counts_once_and_duplicates_do_not(
    aredis_client: aredis.Redis, redis_client: redis.Redis
) -> None:
    redis_client.set(keys.manifest("c1"), b"{}")
    ledger = EngagementLedger(aredis_client, ttl_s=3600, clock=lambda: 1000.0)
    first = await ledger.record("c1.0.3", "open")
    again = await ledger.record("c1.0.3", "open", at=2000.0)
    click = await ledger.record("c1.2.0", "click", at=1500.5)
    assert (first.outcome, again.outcome, click.outcome) == ("first", "duplicate", "first")
    counts = engagement_counters(redis_client, "c1")
    assert counts["open"] == 1 and counts["click"] == 1 and counts["reply"] == 0
    assert batch_events(redis_client, "c1", 0) == {3: {"open": 1000.0}}  # the first time is kept
    assert batch_events(redis_client, "c1", 2) == {0: {"click": 1500.5}}


async def test_unknown_campaign_and_event_are_refused(aredis_client: aredis.Redis, redis_client: redis.Redis) -> None:
    ledger = EngagementLedger(aredis_client, ttl_s=3600)
    assert (await ledger.record("nope.0.1", "open")).outcome == "unknown"
    assert redis_client.exists(keys.engagement("nope", 0)) == 0
    with pytest.raises(UnknownEvent):
        await ledger.record("nope.0.1", "opened")
    with pytest.raises(ValueError):
        await ledger.record("not-a-ref", "open")


async def test_pipelined_records_count_once_and_survive_a_flushed_script_cache(
    aredis_client: aredis.Redis, redis_client: redis.Redis
) -> None:
    redis_client.set(keys.manifest("c2"), b"{}")
    ledger = EngagementLedger(aredis_client, ttl_s=3600)
    redis_client.script_flush()  # the server lost its scripts (a restart): loaded again, once
    done = await ledger.record_pipelined(
        [("c2.0.1", "click", 10.0), ("c2.0.1", "click", 11.0), ("gone.0.1", "click", 1.0)]
    )
    assert [r.outcome for r in done] == ["first", "duplicate", "unknown"]
    assert await ledger.record_pipelined([]) == []
    assert batch_events(redis_client, "c2", 0) == {1: {"click": 10.0}}
    assert engagement_counters(redis_client, "c2")["click"] == 1
    with pytest.raises(UnknownEvent):
        await ledger.record_pipelined([("c2.0.2", "clicked", 1.0)])
