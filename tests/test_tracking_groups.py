"""Group records of batch channels: one claim and one confirmation per provider request.

The email engine runs in-process against real Redis and the real SendGrid twin over sockets. A
recipient's state is its own record, else its group's; these tests check every reader and
writer of the records against that rule: counters exactly once, exceptions (rejected recipients,
retries, dead letters), receipts before and after the confirmation, a dead worker's group
reclaimed under both in-flight policies, pause/cancel, and the raw-hash resolver.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio as aredis
from aiohttp import web

from channels.email import SendGridConfig, SendGridEmail
from dispatch.campaign import CampaignSpec
from dispatch.config import load_settings
from dispatch.plan.planner import Planner
from dispatch.rules.suppression import AddressHasher, AsyncSuppressionStore
from dispatch.send.control import CampaignControl
from dispatch.send.engine import BatchOutcome, Engine, SendStep, SuppressionFilter, render_step
from dispatch.send.retry import RetryPolicy
from dispatch.send.tracking import (
    CLAIM_BUSY,
    CLAIM_DONE,
    CLAIM_FRESH,
    CLAIM_IN_DOUBT,
    GroupOutcome,
    Outcome,
    Tracker,
    campaign_counters,
    iter_outcomes,
    iter_records,
    make_ref,
    record_value,
)
from dispatch.store import keys
from loadtest.mock_core import FaultMix, MockConfig
from loadtest.mock_provider import MockProvider
from loadtest.mock_recorder import Recorded, RecordingServer

KEY = "SG.group-test-key"

#: The suppression key of this test's stores (a deployment's come from ``hasher_for(settings)``).
TEST_HASHER = AddressHasher(key=b"test-suppression-key")


@dataclass
class Rig:
    sync: redis.Redis
    client: aredis.Redis
    mock: MockProvider
    session: aiohttp.ClientSession
    tracker: Tracker
    control: CampaignControl
    home: Path

    def engine(self, *, owner: str = "group-test", idempotent: bool = True, base_url: str | None = None) -> Engine:
        channel = SendGridEmail(
            self.session,
            SendGridConfig(
                base_url=base_url or self.mock.url,
                api_key=KEY,
                from_email="news@example.test",
                unsubscribe_url="https://example.test/u?ref={ref}",
                timeout_s=0.5,
                honours_idempotency=idempotent,
            ),
        )
        suppression = SuppressionFilter(AsyncSuppressionStore(self.client, hasher=TEST_HASHER))
        return Engine(
            client=self.client,
            tracker=self.tracker,
            channels={"email": channel},
            steps=[render_step, SendStep(RetryPolicy(max_attempts=3, backoff_max_s=0.05))],
            owner=owner,
            concurrency=16,
            filters=[suppression],
            suppression=suppression,
        )

    def plan(self, cid: str, n: int, *, start: int = 0) -> int:
        rows = [{"id": f"{cid}-{i}", "email": f"user{i}@example.test"} for i in range(start, start + n)]
        settings = load_settings({"DISPATCH_HOME": str(self.home), "DISPATCH_BATCH_SIZE": "1000"})
        spec = CampaignSpec(id=cid, channel="email", body="Hello", subject="News")
        report = Planner(self.sync, settings).plan(spec, rows)
        self.control.start(cid)
        return report.accepted

    def records(self, cid: str) -> dict[int, tuple[str, int, str, str]]:
        return {r.index: (r.state, r.attempts, r.provider_id, r.code) for r in iter_records(self.sync, cid, 1)}

    def raw(self, cid: str) -> dict[bytes, bytes]:
        return self.sync.hgetall(keys.records(cid, 0))  # type: ignore[return-value]


@pytest.fixture
async def rig(redis_client: redis.Redis, aredis_client: aredis.Redis, tmp_path: Path) -> AsyncIterator[Rig]:
    async with (
        MockProvider(MockConfig(sendgrid_api_key=KEY, seed=5)) as mock,
        aiohttp.ClientSession() as session,
    ):
        control = CampaignControl(redis_client, lambda cid, n, delay: None)
        tracker = Tracker(aredis_client, ttl_s=3600)
        yield Rig(redis_client, aredis_client, mock, session, tracker, control, tmp_path)


async def send(engine: Engine, cid: str) -> BatchOutcome:
    return await engine.send_batch(cid, 0)


async def test_one_group_record_per_request_and_per_recipient_outcomes(rig: Rig) -> None:
    accepted = rig.plan("g-ok", 300)
    assert (await send(rig.engine(), "g-ok")).requeue_after is None
    raw = rig.raw("g-ok")
    assert set(raw) == {b"g"}, "no record per recipient on the happy path"
    assert campaign_counters(rig.sync, "g-ok")["sent"] == accepted == rig.mock.ledger.accepted
    records = rig.records("g-ok")
    assert sorted(records) == list(range(accepted))
    assert {state for state, _, _, _ in records.values()} == {"sent"}
    pids = {pid for _, _, pid, _ in records.values()}
    assert len(pids) == accepted and all(
        pid.endswith(f":{make_ref('g-ok', 0, i)}") for i, (_, _, pid, _) in records.items()
    )
    # the export reader and the raw-hash resolver give the same per-recipient outcome
    exported = list(iter_outcomes(rig.sync, "g-ok", 1))
    assert [r.recipient_id for r in exported] == [f"g-ok-{i}" for i in range(accepted)]
    assert [(r.state, r.provider_id) for r in exported] == [(s, p) for s, _, p, _ in records.values()]
    resolved = record_value(raw, "g-ok", 0, 7)
    assert resolved is not None and resolved.state == "sent"
    assert resolved.provider_id == records[7][2]
    assert record_value(raw, "g-ok", 0, accepted) is None  # beyond the batch


async def test_a_second_run_sends_nothing_and_counts_nothing(rig: Rig) -> None:
    accepted = rig.plan("g-dup", 50)
    await send(rig.engine(), "g-dup")
    await send(rig.engine(owner="other"), "g-dup")  # a redelivered or duplicate batch
    claim = await rig.tracker.claim_group("g-dup", 0, "third", accepted)
    assert claim is not None and claim.code == CLAIM_DONE and claim.members == accepted
    assert campaign_counters(rig.sync, "g-dup")["sent"] == accepted == rig.mock.ledger.accepted


async def test_claim_and_finish_are_exactly_once_per_owner(rig: Rig) -> None:
    rig.plan("g-own", 10)
    claim = await rig.tracker.claim_group("g-own", 0, "w1", 10)
    assert claim is not None and (claim.code, claim.first, claim.last, claim.members) == (CLAIM_FRESH, 0, 9, 10)
    rig.sync.set(keys.worker_alive("w1"), b"1", px=60_000)
    busy = await rig.tracker.claim_group("g-own", 0, "w2", 10)
    assert busy is not None and busy.code == CLAIM_BUSY
    # a finish by an owner that does not hold the claim changes nothing
    assert await rig.tracker.finish_group("g-own", 0, "w2", [], GroupOutcome("sent", 1, "x:")) == 0
    one = Outcome(3, "failed", 1, "", "400")
    assert await rig.tracker.finish_group("g-own", 0, "w1", [one], GroupOutcome("sent", 1, "x:")) == 10
    assert await rig.tracker.finish_group("g-own", 0, "w1", [one], GroupOutcome("sent", 1, "x:")) == 0
    counters = campaign_counters(rig.sync, "g-own")
    assert (counters["sent"], counters["failed"]) == (9, 1)
    assert rig.records("g-own")[3] == ("failed", 1, "", "400")
    assert rig.records("g-own")[4] == ("sent", 1, "x:" + make_ref("g-own", 0, 4), "")
    with pytest.raises(ValueError, match="dead"):
        await rig.tracker.finish_group("g-own", 0, "w1", [], GroupOutcome("dead", 1))


async def test_rejected_recipient_gets_its_own_record_the_rest_stay_grouped(rig: Rig) -> None:
    accepted = rig.plan("g-bad", 20)
    # the twin refuses an address without a dot in its domain (planning accepted this one)
    raw_batch = rig.sync.get(keys.batch("g-bad", 0))
    assert isinstance(raw_batch, bytes) and b"user5@example.test" in raw_batch
    rig.sync.set(keys.batch("g-bad", 0), raw_batch.replace(b"user5@example.test", b"user5@localhost"))
    await send(rig.engine(), "g-bad")
    counters = campaign_counters(rig.sync, "g-bad")
    assert (counters["sent"], counters["failed"]) == (accepted - 1, 1)
    assert rig.mock.ledger.accepted == accepted - 1
    records = rig.records("g-bad")
    assert records[5][0] == "failed" and records[5][3] == "400"
    assert {records[i][0] for i in range(accepted) if i != 5} == {"sent"}
    assert {f for f in rig.raw("g-bad") if f != b"g"} == {b"5"}


async def test_long_retry_after_keeps_one_retry_group_then_completes(rig: Rig) -> None:
    accepted = rig.plan("g-429", 40)
    rig.mock.set_faults(FaultMix(p_429=1.0, retry_after_s=30))
    outcome = await send(rig.engine(), "g-429")
    assert outcome.requeue_after is not None and outcome.requeue_after >= 30
    assert {state for state, _, _, _ in rig.records("g-429").values()} == {"retry"}
    assert set(rig.raw("g-429")) == {b"g"}
    rig.mock.set_faults(FaultMix())
    assert (await send(rig.engine(), "g-429")).requeue_after is None
    counters = campaign_counters(rig.sync, "g-429")
    assert counters["sent"] == accepted == rig.mock.ledger.accepted and counters["retries"] == 0
    assert {attempts for _, attempts, _, _ in rig.records("g-429").values()} == {2}


async def test_dead_letters_are_own_records_and_retry_failed_resends_only_them(rig: Rig) -> None:
    rig.plan("g-dead", 8)
    rig.mock.set_faults(FaultMix(p_500=1.0))
    await send(rig.engine(), "g-dead")
    counters = campaign_counters(rig.sync, "g-dead")
    assert counters["dead_letters"] == counters["failed"] == 8 and counters["retries"] == 16
    assert b"g" not in rig.raw("g-dead")  # every member left the group
    rig.mock.set_faults(FaultMix())
    assert rig.control.retry_failed("g-dead") == (8, 1)
    await send(rig.engine(), "g-dead")
    counters = campaign_counters(rig.sync, "g-dead")
    assert (counters["sent"], counters["failed"], counters["dead_letters"]) == (8, 0, 0)
    assert rig.mock.ledger.accepted == 8 and rig.mock.ledger.duplicates == 0


async def test_dead_workers_group_is_resent_with_the_same_key_when_honoured(rig: Rig) -> None:
    accepted = rig.plan("g-crash", 30)
    hang = asyncio.Event()

    async def reply(recorded: Recorded) -> web.StreamResponse:
        if len(server.requests) == 1:
            await hang.wait()  # the first worker dies while its request is out
        return web.Response(status=202, headers={"X-Message-Id": f"m{len(server.requests)}"})

    async with RecordingServer(reply) as server:
        dying = asyncio.create_task(send(rig.engine(owner="dead-worker", base_url=server.url), "g-crash"))
        async with asyncio.timeout(10):
            await server.wait_for(1)
        dying.cancel()  # no confirmation: the group stays claimed by a worker without a liveness key
        with pytest.raises(asyncio.CancelledError):
            await dying
        assert rig.records("g-crash")[0][0] == "sending"
        assert (await send(rig.engine(owner="survivor", base_url=server.url), "g-crash")).requeue_after is None
        hang.set()
    first, second = server.requests
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert orjson.loads(first.body)["personalizations"] == orjson.loads(second.body)["personalizations"]
    counters = campaign_counters(rig.sync, "g-crash")
    assert counters["sent"] == accepted and counters["failed"] == 0
    assert {pid.split(":")[0] for _, _, pid, _ in rig.records("g-crash").values()} == {"m2"}


async def test_dead_workers_issued_group_is_held_in_doubt_when_nothing_can_tell(rig: Rig) -> None:
    """A group whose request was issued by a worker that died is in doubt; with no lookup, no
    receipt and no honoured key, the default policy holds it for an operator (never resent)."""
    accepted = rig.plan("g-unknown", 12)
    claim = await rig.tracker.claim_group("g-unknown", 0, "gone", accepted)
    assert claim is not None
    assert await rig.tracker.issue("g-unknown", 0, "gone", [("g", 0, "sendgrid")]) == [True]
    retaken = await rig.tracker.claim_group("g-unknown", 0, "probe", accepted)
    assert retaken is not None and retaken.code == CLAIM_IN_DOUBT  # "gone" has no liveness key
    assert retaken.issued_at is not None
    rig.sync.hset(keys.records("g-unknown", 0), "g", rig.raw("g-unknown")[b"g"].replace(b"|probe|", b"|gone|"))
    await send(rig.engine(idempotent=False), "g-unknown")
    counters = campaign_counters(rig.sync, "g-unknown")
    assert counters["dead_letters"] == counters["failed"] == counters["in_doubt"] == accepted
    assert counters["sent"] == 0
    assert {code for _, _, _, code in rig.records("g-unknown").values()} == {"in_doubt"}
    assert rig.mock.ledger.accepted == 0


async def test_dead_workers_group_never_issued_is_sent_not_doubted(rig: Rig) -> None:
    """A claim alone marks nothing in flight: a worker that died before issuing leaves every
    message claimable, and the next run sends each exactly once."""
    accepted = rig.plan("g-unissued", 12)
    claim = await rig.tracker.claim_group("g-unissued", 0, "gone", accepted)
    assert claim is not None and claim.code == CLAIM_FRESH
    await send(rig.engine(idempotent=False), "g-unissued")
    counters = campaign_counters(rig.sync, "g-unissued")
    assert counters["sent"] == accepted and counters["failed"] == counters["in_doubt"] == 0
    assert rig.mock.ledger.accepted == accepted


async def test_receipts_before_and_after_the_group_confirmation(rig: Rig) -> None:
    rig.plan("g-rcpt", 6)
    claim = await rig.tracker.claim_group("g-rcpt", 0, "w", 6)
    assert claim is not None
    assert await rig.tracker.issue("g-rcpt", 0, "w", [("g", 0, "sendgrid")]) == [True]
    ref = [make_ref("g-rcpt", 0, i) for i in range(6)]
    assert await rig.tracker.apply_receipt(ref[1], "delivered", None, channel="email") == 2  # before confirmation
    assert await rig.tracker.apply_receipt(ref[1], "delivered", None, channel="email") == 2  # duplicate, still deferred
    assert await rig.tracker.apply_receipt(ref[2], "bounced", "550", channel="email") == 2
    assert await rig.tracker.apply_receipt(make_ref("g-rcpt", 0, 9), "delivered", None, channel="email") == -1
    await rig.tracker.finish_group("g-rcpt", 0, "w", [], GroupOutcome("sent", 1, "m1:"))
    assert await rig.tracker.apply_receipt(ref[3], "failed", "x", channel="email") == 1  # after: own record
    assert await rig.tracker.apply_receipt(ref[3], "delivered", None, channel="email") == 0  # already final
    assert await rig.tracker.apply_receipt(ref[1], "delivered", None, channel="email") == 0
    counters = campaign_counters(rig.sync, "g-rcpt")
    assert (counters["sent"], counters["delivered"], counters["bounced"], counters["undelivered"]) == (6, 1, 1, 1)
    records = rig.records("g-rcpt")
    assert records[1] == ("delivered", 1, "m1:" + ref[1], "")
    assert records[2] == ("bounced", 1, "m1:" + ref[2], "550")
    assert records[3] == ("failed", 1, "m1:" + ref[3], "x")
    assert records[0] == ("sent", 1, "m1:" + ref[0], "")
    assert not any(f.startswith(b"r") for f in rig.raw("g-rcpt"))  # early receipts consumed


async def test_cancel_mid_campaign_skips_the_group_and_counts_it(rig: Rig) -> None:
    accepted = rig.plan("g-stop", 25)
    rig.control.pause("g-stop")
    engine = rig.engine()
    assert (await send(engine, "g-stop")).requeue_after is not None
    rig.control.cancel("g-stop")
    claim = await rig.tracker.claim_group("g-stop", 0, "w", accepted)
    assert claim is None  # not running: nothing claimed
    status = rig.control.status("g-stop")
    assert status.state == "cancelled" and status.as_dict()["not_sent"] == accepted
    assert [r.state for r in iter_outcomes(rig.sync, "g-stop", 1, cancelled=True)] == ["skipped"] * accepted
    assert rig.mock.ledger.accepted == 0
