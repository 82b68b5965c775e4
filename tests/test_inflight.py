"""Exactly once against a provider that ignores idempotency keys (issue 17), in-process.

The mock Twilio twin here ignores ``Idempotency-Key`` (as Twilio does) and the adapter does not
claim it is honoured: a lost answer must be reconciled by looking the message up, never resent
blindly.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis
import redis.asyncio as aredis

from channels.sms import TwilioConfig, TwilioSms
from dispatch.campaign import CampaignSpec
from dispatch.config import load_settings
from dispatch.plan.planner import Planner
from dispatch.rules.suppression import AddressHasher, AsyncSuppressionStore, SuppressionStore
from dispatch.send.control import CampaignControl
from dispatch.send.engine import BatchOutcome, Engine, SendStep, SuppressionFilter, render_step
from dispatch.send.fence import RecentFence
from dispatch.send.journal import Journal
from dispatch.send.reconcile import Reconciler
from dispatch.send.retry import RetryPolicy
from dispatch.send.tracking import MessageRecord, Outcome, Tracker, campaign_counters, iter_records
from dispatch.store import keys
from loadtest.mock_core import FaultMix, MockConfig
from loadtest.mock_provider import MockProvider

SID, TOKEN = "AC" + "3" * 32, "inflight-test-token"
HASHER = AddressHasher(key=b"inflight-test-key")


@dataclass
class Rig:
    sync: redis.Redis
    client: aredis.Redis
    mock: MockProvider
    channel: TwilioSms
    home: Path
    control: CampaignControl

    def plan(self, cid: str, n: int) -> int:
        rows = [{"id": f"{cid}-{i}", "phone": f"+447500{i:06d}", "first_name": "Ada"} for i in range(n)]
        settings = load_settings({"DISPATCH_HOME": str(self.home), "DISPATCH_BATCH_SIZE": "1000"})
        report = Planner(self.sync, settings).plan(CampaignSpec(id=cid, channel="sms", body="Hi $first_name"), rows)
        self.control.start(cid)
        return report.accepted

    def engine(
        self, owner: str = "w1", *, policy: str = "hold", journal: Journal | None = None, wait_s: float = 60.0
    ) -> Engine:
        store = AsyncSuppressionStore(self.client, hasher=HASHER)
        return Engine(
            client=self.client,
            tracker=Tracker(self.client, ttl_s=3600),
            channels={"sms": self.channel},
            steps=[render_step, SendStep(RetryPolicy(max_attempts=6, backoff_max_s=0.05))],
            owner=owner,
            concurrency=16,
            filters=[SuppressionFilter(store)],
            reconciler=Reconciler(policies={"*": policy}, wait_s=wait_s),
            journal=journal,
            fence=RecentFence(store, every_s=0.0),
        )

    async def drain(self, engine: Engine, cid: str, runs: int = 30) -> BatchOutcome:
        outcome = await engine.send_batch(cid, 0)
        for _ in range(runs):
            if outcome.requeue_after is None:
                break
            outcome = await engine.send_batch(cid, 0)
        return outcome


@pytest.fixture
async def rig(redis_client: redis.Redis, aredis_client: aredis.Redis, tmp_path: Path) -> AsyncIterator[Rig]:
    config = MockConfig(account_sid=SID, auth_token=TOKEN, seed=3, twilio_sent_after_s=0.0)
    assert config.honour_idempotency is False  # the real provider's behaviour is the default
    async with MockProvider(config) as mock, aiohttp.ClientSession() as session:
        channel = TwilioSms(
            session,
            TwilioConfig(
                base_url=mock.url,
                account_sid=SID,
                auth_token=TOKEN,
                from_number="+15005550006",
                timeout_s=0.3,
                honours_idempotency=False,
            ),
        )
        control = CampaignControl(redis_client, lambda cid, n, delay: None)
        yield Rig(redis_client, aredis_client, mock, channel, tmp_path, control)


async def test_lost_answers_are_looked_up_not_resent(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Requests accepted whose answers never came back (timeouts after acceptance) and requests
    refused before acceptance: each recipient gets exactly one message, none is held."""
    accepted = rig.plan("lost-1", 120)
    rig.mock.set_faults(FaultMix(p_timeout_after_accept=0.15, p_timeout=0.1, hang_s=1.0))
    caplog.set_level(logging.INFO, logger="dispatch.send.engine")
    outcome = await rig.drain(rig.engine(), "lost-1")
    assert outcome.requeue_after is None
    counters = campaign_counters(rig.sync, "lost-1")
    assert counters["sent"] == accepted == rig.mock.ledger.accepted
    assert rig.mock.ledger.duplicates == 0
    assert counters["in_doubt"] == counters["failed"] == 0
    assert "resolved: found" in caplog.text  # the accepted-then-hung ones were found by the lookup
    assert "+447500" not in caplog.text  # no number in the logs


async def test_a_claim_alone_puts_nothing_in_doubt(rig: Rig) -> None:
    """A worker that took the batch and died before issuing anything leaves every message
    claimable: the next run sends them all, with no lookup and nothing held."""
    accepted = rig.plan("claimed-1", 20)
    tracker = Tracker(rig.client, ttl_s=3600)
    claims = await tracker.claim("claimed-1", 0, "dead-worker", list(range(accepted)))
    assert claims is not None and all(c.code == 1 for c in claims)
    assert not [r for r in iter_records(rig.sync, "claimed-1", 1)]  # nothing marked in flight
    await rig.drain(rig.engine(), "claimed-1")
    assert campaign_counters(rig.sync, "claimed-1")["sent"] == accepted == rig.mock.ledger.accepted


async def test_dead_workers_requests_are_reconciled(rig: Rig) -> None:
    """Of a dead worker's requests on the wire, those Twilio has are recorded sent (with its sid),
    those it never got are sent: one message each."""
    accepted = rig.plan("dead-2", 10)
    engine = rig.engine("gone")
    # the dead worker had issued every request; only the first half reached Twilio
    tracker = Tracker(rig.client, ttl_s=3600)
    await tracker.claim("dead-2", 0, "gone", list(range(accepted)))
    assert all(await tracker.issue("dead-2", 0, "gone", [(str(i), 0, "twilio") for i in range(accepted)]))
    half = accepted // 2
    # send the first half behind the engine's back, as the dead worker's requests did
    from string import Template

    from dispatch.send.engine import Item, SendContext, render

    manifest_engine = engine
    manifest = await manifest_engine._manifest("dead-2")
    ctx = SendContext(
        campaign_id="dead-2", batch=0, channel=rig.channel, manifest=manifest, template=Template(manifest.body)
    )
    rows = [f"+447500{i:06d}" for i in range(half)]
    items = [Item(i, f"dead-2-{i}", phone, {"first_name": "Ada"}, 0) for i, phone in enumerate(rows)]
    render(ctx, items)
    results = await rig.channel.send([item.message for item in items if item.message is not None])
    assert all(type(r).__name__ == "Sent" for r in results)
    await rig.drain(rig.engine("w2"), "dead-2")
    counters = campaign_counters(rig.sync, "dead-2")
    assert counters["sent"] == accepted == rig.mock.ledger.accepted
    assert rig.mock.ledger.duplicates == 0
    sids = {r.provider_id for r in iter_records(rig.sync, "dead-2", 1)}
    assert all(sid.startswith("SM") for sid in sids) and len(sids) == accepted


async def test_nothing_can_tell_follows_the_policy(rig: Rig) -> None:
    """A provider with no lookup (here: the lookup fails) and no receipts: 'hold' dead-letters the
    message as in_doubt, 'drop' fails it, 'resend' sends it again."""
    for policy, cid in (("hold", "pol-hold"), ("drop", "pol-drop"), ("resend", "pol-resend")):
        accepted = rig.plan(cid, 4)
        tracker = Tracker(rig.client, ttl_s=3600)
        await tracker.claim(cid, 0, "gone", list(range(accepted)))
        await tracker.issue(cid, 0, "gone", [(str(i), 0, "twilio") for i in range(accepted)])
        rig.mock.set_faults(FaultMix())
        before = rig.mock.ledger.accepted
        # a lookup that fails: Twilio answers 401 to the list (wrong credentials for the lookup)
        original = rig.channel.lookup

        async def failing(messages: object) -> list[object]:
            from channels.base import Undecided

            return [Undecided(m.ref, "lookup failed") for m in messages]  # type: ignore[attr-defined]

        rig.channel.lookup = failing  # type: ignore[method-assign,assignment]
        try:
            await rig.drain(rig.engine(policy=policy, wait_s=0.0), cid)
        finally:
            rig.channel.lookup = original  # type: ignore[method-assign]
        counters = campaign_counters(rig.sync, cid)
        codes = {r.code for r in iter_records(rig.sync, cid, 1)}
        if policy == "hold":
            assert counters["in_doubt"] == counters["dead_letters"] == accepted and codes == {"in_doubt"}
            assert rig.mock.ledger.accepted == before
        elif policy == "drop":
            assert counters["failed"] == accepted and counters["dead_letters"] == 0 and codes == {"in_doubt_dropped"}
            assert rig.mock.ledger.accepted == before
        else:
            assert counters["sent"] == accepted == rig.mock.ledger.accepted - before


async def test_an_opt_out_during_the_batch_stops_messages_not_yet_issued(rig: Rig) -> None:
    """The batch's suppression check has passed; an opt-out added afterwards still stops the
    message at the moment its request would be issued."""
    accepted = rig.plan("late-optout", 30)
    store = SuppressionStore(rig.sync, hasher=HASHER)
    engine = rig.engine()
    fence = engine._fence
    assert fence is not None
    # opted out after the batch check (the filter ran with an empty list), before the sends
    original_filter = engine._filters

    async def add_then_pass(ctx: object, items: object) -> None:
        store.add("sms", ["+447500000007", "+447500000012"])

    engine._filters = [*original_filter, add_then_pass]
    await rig.drain(engine, "late-optout")
    counters = campaign_counters(rig.sync, "late-optout")
    assert counters["suppressed"] == 2 and counters["sent"] == accepted - 2 == rig.mock.ledger.accepted


async def test_answers_survive_a_lost_write_through_the_journal(rig: Rig) -> None:
    """Redis lost the confirmation of messages this worker sent (its record went back to
    'sending', or vanished): the next run takes the journal's answer, sends nothing again."""
    accepted = rig.plan("journal-1", 12)
    journal = Journal(keep_s=60)
    engine = rig.engine(journal=journal)
    await rig.drain(engine, "journal-1")
    assert rig.mock.ledger.accepted == accepted
    # the restart lost the last writes: records 0-5 back to 'sending', 6-11 gone, counters too
    records = keys.records("journal-1", 0)
    for i in range(6):
        rig.sync.hset(records, str(i), MessageRecord("sending", 0, "w1", "", "", 1.0, "twilio").encode())
    rig.sync.hdel(records, *[str(i) for i in range(6, 12)])
    rig.sync.hset(keys.counters("journal-1"), "sent", 0)
    rig.sync.srem(keys.done_batches("journal-1"), 0)
    await rig.drain(engine, "journal-1")
    assert campaign_counters(rig.sync, "journal-1")["sent"] == accepted
    assert rig.mock.ledger.accepted == accepted and rig.mock.ledger.duplicates == 0
    assert journal.known("journal-1", 0)  # kept keep_s after the write


async def test_reassert_writes_back_what_a_restart_lost(rig: Rig) -> None:
    accepted = rig.plan("reassert-1", 8)
    engine = rig.engine(journal=Journal(keep_s=60))
    await rig.drain(engine, "reassert-1")
    rig.sync.delete(keys.records("reassert-1", 0))
    rig.sync.hset(keys.counters("reassert-1"), "sent", 0)
    outcomes, inflight = await engine.reassert()
    assert (outcomes, inflight) == (accepted, 0)
    assert campaign_counters(rig.sync, "reassert-1")["sent"] == accepted
    assert {r.state for r in iter_records(rig.sync, "reassert-1", 1)} == {"sent"}
    assert (await engine.reassert())[0] == accepted and campaign_counters(rig.sync, "reassert-1")["sent"] == accepted


async def test_advance_survives_a_flushed_script_cache(rig: Rig) -> None:
    rig.plan("noscript-1", 3)
    tracker = Tracker(rig.client, ttl_s=3600)
    await tracker.claim("noscript-1", 0, "w", [0, 1, 2])
    assert await tracker.issue("noscript-1", 0, "w", [("0", 0, "twilio")]) == [True]
    rig.sync.script_flush()
    answers = await tracker.advance("noscript-1", 0, "w", [Outcome(0, "sent", 1, "SM1")], [("1", 0, "twilio")])
    assert answers == [True]
    assert campaign_counters(rig.sync, "noscript-1")["sent"] == 1


def test_the_journal_forgets_only_what_the_same_server_has_surely_kept() -> None:
    now = [100.0]
    journal = Journal(keep_s=3.0, clock=lambda: now[0])
    outcome = Outcome(4, "sent", 1, "SM4")
    journal.remember("c", 0, [outcome])
    journal.written("c", 0, [outcome])
    now[0] = 160.0  # a minute later, but Redis was unreachable all along: nothing is forgotten
    assert journal.known("c", 0) == {4: outcome}
    journal.durable(102.0)  # the same server seen 2 s after the write: not surely on disk yet
    assert journal.known("c", 0) == {4: outcome}
    journal.durable(104.0)
    assert journal.known("c", 0) == {}
    unwritten = Outcome(5, "sent", 1, "SM5")
    journal.remember("c", 0, [unwritten])
    journal.durable(500.0)  # never written: kept until it is
    assert journal.known("c", 0) == {5: unwritten}
