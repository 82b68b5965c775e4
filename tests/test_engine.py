"""The send path in-process against real Redis and the real mock provider over sockets."""

from __future__ import annotations

import asyncio
import string
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
import redis
import redis.asyncio as aredis

from channels.base import Channel, Message, Result
from channels.sms import TwilioConfig, TwilioSms
from dispatch.campaign import CampaignSpec
from dispatch.config import load_settings
from dispatch.plan.planner import Planner
from dispatch.rules.frequency import AsyncFrequencyStore, FrequencyCap
from dispatch.rules.suppression import AddressHasher, AsyncSuppressionStore, SuppressionStore
from dispatch.send.control import CampaignControl
from dispatch.send.engine import (
    BatchOutcome,
    Engine,
    FrequencyFilter,
    Item,
    RateLimitStep,
    SendContext,
    SendStep,
    SuppressionFilter,
    limiter_burst,
    render_step,
)
from dispatch.send.retry import RetryPolicy
from dispatch.send.tracking import Tracker, campaign_counters, iter_records
from loadtest.mock_core import FaultMix, MockConfig
from loadtest.mock_provider import MockProvider
from ratelimit import StubRateLimiter

SID, TOKEN = "AC" + "2" * 32, "engine-test-token"

#: The suppression key of this test's stores (a deployment's come from ``hasher_for(settings)``).
TEST_HASHER = AddressHasher(key=b"test-suppression-key")


@dataclass
class Rig:
    sync: redis.Redis
    client: aredis.Redis
    mock: MockProvider
    engine: Engine
    control: CampaignControl
    home: Path

    def plan(self, cid: str, phones: list[str]) -> int:
        rows = [{"id": f"{cid}-{i}", "phone": p, "first_name": "Ada"} for i, p in enumerate(phones)]
        settings = load_settings({"DISPATCH_HOME": str(self.home), "DISPATCH_BATCH_SIZE": "1000"})
        report = Planner(self.sync, settings).plan(CampaignSpec(id=cid, channel="sms", body="Hi $first_name"), rows)
        self.control.start(cid)
        return report.accepted

    async def send(self, cid: str) -> BatchOutcome:
        return await self.engine.send_batch(cid, 0)


def phones(n: int, start: int = 0) -> list[str]:
    return [f"+447400{i:06d}" for i in range(start, start + n)]


@pytest.fixture
async def rig(
    request: pytest.FixtureRequest, redis_client: redis.Redis, aredis_client: aredis.Redis, tmp_path: Path
) -> AsyncIterator[Rig]:
    """``@pytest.mark.parametrize("rig", [{...}], indirect=True)`` adds MockConfig fields."""
    config = MockConfig(
        account_sid=SID,
        auth_token=TOKEN,
        unsubscribed=frozenset({"+447400999999"}),
        seed=1,
        **getattr(request, "param", {}),
    )
    async with MockProvider(config) as mock, aiohttp.ClientSession() as session:
        channel = TwilioSms(
            session,
            TwilioConfig(
                base_url=mock.url,
                account_sid=SID,
                auth_token=TOKEN,
                from_number="+15005550006",
                timeout_s=0.5,
                honours_idempotency=True,
            ),
        )
        suppression = SuppressionFilter(AsyncSuppressionStore(aredis_client, hasher=TEST_HASHER))
        cap = FrequencyCap(limit=1, window=timedelta(hours=1))
        engine = Engine(
            client=aredis_client,
            tracker=Tracker(aredis_client, ttl_s=3600),
            channels={"sms": channel},
            steps=[render_step, SendStep(RetryPolicy(max_attempts=6, backoff_max_s=0.05))],
            owner="engine-test",
            concurrency=16,
            filters=[suppression, FrequencyFilter(AsyncFrequencyStore(aredis_client, cap, hasher=TEST_HASHER))],
            suppression=suppression,
        )
        control = CampaignControl(redis_client, lambda cid, n, delay: None)
        yield Rig(redis_client, aredis_client, mock, engine, control, tmp_path)


async def test_transient_errors_are_retried_until_sent_once(rig: Rig) -> None:
    accepted = rig.plan("retry-1", phones(60))
    rig.mock.set_faults(FaultMix(p_503=0.06, p_500=0.03, p_429=0.03, retry_after_s=0.05, p_reset=0.03))
    outcome = await rig.send("retry-1")
    assert outcome.requeue_after is None
    counters = campaign_counters(rig.sync, "retry-1")
    assert counters["sent"] == accepted == rig.mock.ledger.accepted
    assert rig.mock.ledger.duplicates == 0
    assert counters["retries"] > 0


@pytest.mark.parametrize("rig", [{"honour_idempotency": True}], indirect=True)  # until reconciliation lands
async def test_timeouts_resend_with_the_same_idempotency_key(rig: Rig) -> None:
    accepted = rig.plan("timeout-1", phones(20))
    rig.mock.set_faults(FaultMix(p_timeout_after_accept=0.3, hang_s=2.0))
    await rig.send("timeout-1")
    assert campaign_counters(rig.sync, "timeout-1")["sent"] == accepted == rig.mock.ledger.accepted
    assert rig.mock.ledger.duplicates == 0
    assert rig.mock.ledger.replays > 0  # the ambiguous ones were answered from the provider's key store


async def test_permanent_rejection_fails_without_retry_and_feeds_suppression(rig: Rig) -> None:
    rig.plan("perm-1", ["+447400999999", *phones(3)])
    rig.plan("perm-2", ["+447400999999"])  # planned before anyone knew of the opt-out
    await rig.send("perm-1")
    records = {r.index: r for r in iter_records(rig.sync, "perm-1", 1)}
    assert records[0].state == "failed" and records[0].code == "21610" and records[0].attempts == 1
    assert campaign_counters(rig.sync, "perm-1")["failed"] == 1
    assert SuppressionStore(rig.sync, hasher=TEST_HASHER).contains_many("sms", ["+447400999999"]) == [True]
    # the other campaign drops the opted-out number at send time, before any provider call
    before = rig.mock.ledger.rejected
    await rig.send("perm-2")
    assert campaign_counters(rig.sync, "perm-2")["suppressed"] == 1
    assert rig.mock.ledger.rejected == before


async def test_long_retry_after_goes_back_to_the_broker_then_completes(rig: Rig) -> None:
    accepted = rig.plan("long-1", phones(10, 100))
    rig.mock.set_faults(FaultMix(p_429=1.0, retry_after_s=30))
    outcome = await rig.send("long-1")
    assert outcome.requeue_after is not None and outcome.requeue_after >= 30
    assert {r.state for r in iter_records(rig.sync, "long-1", 1)} == {"retry"}
    rig.mock.set_faults(FaultMix())
    assert (await rig.send("long-1")).requeue_after is None
    assert campaign_counters(rig.sync, "long-1")["sent"] == accepted == rig.mock.ledger.accepted


async def test_dead_letters_and_retry_failed_resend_only_those(rig: Rig) -> None:
    rig.plan("dead-1", phones(5, 200))
    rig.mock.set_faults(FaultMix(p_500=1.0))
    await rig.send("dead-1")
    counters = campaign_counters(rig.sync, "dead-1")
    assert counters["dead_letters"] == counters["failed"] == 5
    assert {r.attempts for r in iter_records(rig.sync, "dead-1", 1)} == {6}
    rig.mock.set_faults(FaultMix())
    assert rig.control.retry_failed("dead-1") == (5, 1)
    await rig.send("dead-1")
    counters = campaign_counters(rig.sync, "dead-1")
    assert counters["sent"] == 5 and counters["failed"] == 0 and counters["dead_letters"] == 0
    assert rig.mock.ledger.accepted == 5 and rig.mock.ledger.duplicates == 0
    assert rig.control.retry_failed("dead-1") == (0, 0)


async def test_frequency_cap_across_campaigns(rig: Rig) -> None:
    rig.plan("freq-1", phones(3, 300))
    await rig.send("freq-1")
    rig.plan("freq-2", phones(4, 300))  # three already messaged within the window
    await rig.send("freq-2")
    counters = campaign_counters(rig.sync, "freq-2")
    assert counters["sent"] == 1 and counters["skipped"] == 3
    assert rig.mock.ledger.accepted == 4


async def test_cancelled_and_paused_campaigns_send_nothing(rig: Rig) -> None:
    rig.plan("stop-1", phones(5, 400))
    rig.control.pause("stop-1")
    rig.engine._control.clear()  # a new process would not have the cached state either
    outcome = await rig.send("stop-1")
    assert outcome.requeue_after is not None  # paused: try again later, position kept
    rig.control.cancel("stop-1")
    rig.engine._control.clear()
    assert (await rig.send("stop-1")).requeue_after is None
    assert rig.mock.ledger.accepted == 0
    status = rig.control.status("stop-1")
    assert status.state == "cancelled" and status.as_dict()["not_sent"] == 5


async def test_finished_campaign_is_finalized_and_its_keys_expire(rig: Rig) -> None:
    from dispatch.store import keys

    rig.plan("final-1", phones(4, 500))
    assert not rig.control.finalize("final-1", 600)  # not finished yet
    await rig.send("final-1")
    assert rig.control.finalize("final-1", 600)
    assert rig.control.status("final-1").state == "completed"
    for key in (keys.counters("final-1"), keys.control("final-1"), keys.records("final-1", 0)):
        assert 0 < rig.sync.ttl(key) <= 600 + 5, key
    assert rig.sync.ttl(keys.batch("final-1", 0)) > 0  # the snapshot keeps its longer expiry
    # a completed campaign can still resend its dead letters (none here)
    assert rig.control.retry_failed("final-1") == (0, 0)


def test_campaign_burst_is_a_tenth_of_the_rate_and_at_least_one() -> None:
    assert [limiter_burst(r) for r in (0.5, 1.0, 10.0, 19.9, 60.0, 300.0, 5000.0)] == [1, 1, 1, 1, 6, 30, 500]
    for rate in (0.1, 3.0, 10.0, 25.0, 99.0, 1234.5, 1e6):
        assert 1 <= limiter_burst(rate) <= max(1.0, rate / 10)


class _SegmentChannel(Channel):
    """Costs as many tokens as the body has words; sends nothing (the step under test stops short)."""

    name = "sms"
    provider = "test"

    def cost(self, message: Message) -> int:
        return len(message.body.split())

    async def send(self, messages: Sequence[Message]) -> list[Result]:
        raise AssertionError("not called: these tests end the chain before any send")


def _items(bodies: list[str]) -> list[Item]:
    items = []
    for i, body in enumerate(bodies):
        item = Item(i, f"r{i}", f"+44740000{i:04d}", None, 0)
        item.message = Message(ref=f"ref{i}", address=item.address, body=body, idempotency_key=f"k{i}")
        items.append(item)
    return items


async def _step_for(rate: float | None) -> tuple[RateLimitStep, StubRateLimiter]:
    limiter = StubRateLimiter()
    step = RateLimitStep(limiter, {})
    await step.set_campaign_rate("c", rate)
    return step, limiter


def _ctx() -> SendContext:
    return SendContext("c", 0, _SegmentChannel(), {}, string.Template(""))


async def test_slow_campaign_chunks_go_on_message_by_message_and_fast_ones_whole() -> None:
    sent: list[list[int]] = []

    async def record(ctx: SendContext, items: list[Item]) -> None:
        sent.append([item.index for item in items])

    step, _ = await _step_for(10.0)
    await step(_ctx(), _items(["hi"] * 8), record)
    assert sent == [[i] for i in range(8)]  # one token each, acquired just before its send
    sent.clear()
    step, limiter = await _step_for(5000.0)
    await step(_ctx(), _items(["hi"] * 8), record)
    assert sent == [list(range(8))] and limiter.script_calls == 1  # one acquisition per chunk
    sent.clear()
    step, _ = await _step_for(60.0)  # three tokens a slice; a three-word message fills one
    await step(_ctx(), _items(["a", "b", "c d e", "f"]), record)
    assert sent == [[0, 1], [2], [3]]


async def test_message_costlier_than_the_campaign_burst_is_acquired_in_pieces() -> None:
    sent: list[int] = []

    async def record(ctx: SendContext, items: list[Item]) -> None:
        sent.extend(item.index for item in items)

    step, limiter = await _step_for(10.0)  # burst 1: three tokens never fit in one acquisition
    await step(_ctx(), _items(["one two three"]), record)
    assert sent == [0] and limiter.script_calls >= 3


@pytest.mark.parametrize(("state", "back"), [("paused", "retry"), ("cancelled", "skipped")])
async def test_stop_between_two_slices_hands_the_rest_back(state: str, back: str) -> None:
    sent: list[int] = []

    async def record(ctx: SendContext, items: list[Item]) -> None:
        sent.extend(item.index for item in items)

    async def read() -> str:
        return "running" if len(sent) < 2 else state  # stopped once two messages went out

    step, _ = await _step_for(10.0)
    items = _items(["hi"] * 8)
    ctx = _ctx()
    ctx.read_state = read
    await step(ctx, items, record)
    assert sent == [0, 1] and ctx.stopped == state
    assert [item.outcome.state if item.outcome else None for item in items[2:]] == [back] * 6
    assert items[0].outcome is None  # sent ones keep what the send step gives them


async def test_stop_while_waiting_for_tokens_leaves_the_queue_without_sending() -> None:
    step, limiter = await _step_for(0.1)  # after the first message, the next token is 10 s away
    states = ["running"]
    sent: list[int] = []

    async def record(ctx: SendContext, items: list[Item]) -> None:
        sent.extend(item.index for item in items)
        states[0] = "paused"  # paused while the next message waits for its token

    async def read() -> str:
        return states[0]

    ctx = _ctx()
    ctx.read_state = read
    items = _items(["hi"] * 3)
    await asyncio.wait_for(step(ctx, items, record), timeout=5.0)  # far less than the 10 s wait
    assert sent == [0] and ctx.stopped == "paused"
    assert [item.outcome.state if item.outcome else None for item in items[1:]] == ["retry", "retry"]
    # the abandoned wait took no token: the next one is still the one due 10 s after the first
    assert 0.0 < await limiter.try_acquire(["campaign:c"]) < 10.0
