"""A two-round funnel through real workers and the mock provider: email round 1, engagement from a
known ground truth through the ledger, SMS round 2 to the non-clickers started by the scheduler
after its (fake-clock) window, and a report that equals the ground truth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import redis
import redis.asyncio as aredis

from dispatch.cli.rounds import reports_for
from dispatch.config import Settings
from dispatch.engage.ledger import EngagementLedger
from dispatch.plan.planner import Planner
from dispatch.plan.snapshot import iter_batches, load_manifest
from dispatch.rounds.funnel import load_funnel_file, register_funnel
from dispatch.rounds.scheduler import RoundScheduler
from dispatch.send.broker import build_broker, enqueue_batch
from dispatch.send.control import CampaignControl
from dispatch.send.tracking import iter_outcomes
from dispatch.store import keys
from loadtest.cluster import LocalCluster

N = 40
#: The ground truth of round 1's engagement, by recipient number.
OPENED = set(range(20))
MACHINE_OPENED = set(range(20, 25))
CLICKED = set(range(5))
OPTED_OUT = {5}  # opened, did not click: would qualify for round 2
EXPECTED_ROUND_2 = {f"r{i}" for i in OPENED - CLICKED - OPTED_OUT}

FUNNEL = """\
id = "offer"

[[rounds]]
id = "offer-1"
channel = "email"
subject = "Our offer"
body = "Hi $first_name, here is our offer"
quiet_hours = false
audience = "customers.csv"

[[rounds]]
id = "offer-2"
channel = "sms"
body = "Did you see our offer?"
quiet_hours = false
audience = { from = "offer-1", where = "opened and not clicked", after = "72h", contacts = "customers.csv" }
"""


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _refs(client: redis.Redis, cid: str) -> dict[str, str]:
    manifest = load_manifest(client, cid)
    return {
        row.recipient_id: f"{cid}.{batch.number}.{i}"
        for batch in iter_batches(client, cid, manifest.batches)
        for i, row in enumerate(batch.rows)
    }


async def _record_truth(url: str, refs: dict[str, str]) -> None:
    client = aredis.Redis.from_url(url)
    ledger = EngagementLedger(client, ttl_s=86400)
    for event, who in (("open", OPENED), ("machine_open", MACHINE_OPENED), ("click", CLICKED), ("optout", OPTED_OUT)):
        for i in sorted(who):
            await ledger.record(refs[f"r{i}"], event)
            await ledger.record(refs[f"r{i}"], event)  # providers deliver at least once: counted once
    await client.aclose()


def test_funnel_round_two_reaches_exactly_the_openers_who_did_not_click(
    cluster_settings: Settings, tmp_path: Path
) -> None:
    settings = replace(cluster_settings, prices="sendgrid=0.001,twilio=0.01")
    (tmp_path / "customers.csv").write_text(
        "id,email,phone,first_name\n" + "".join(f"r{i},u{i}@example.com,+4474001{i:05d},N{i}\n" for i in range(N))
    )
    (tmp_path / "funnel.toml").write_text(FUNNEL)
    with LocalCluster(settings, workers=2) as cluster:
        assert cluster.target is not None
        client = redis.Redis.from_url(cluster.target.app_url)
        broker = build_broker(settings, cluster.target.broker_url)
        clock = _Clock(time.time())
        # only the scheduler's clock is fake (when a round is due); planning and sending run on real time
        control = CampaignControl(client, lambda cid, n, d: enqueue_batch(broker, cid, n, d))
        scheduler = RoundScheduler(client, control, lambda: Planner(client, settings), clock=clock)
        try:
            assert register_funnel(client, load_funnel_file(tmp_path / "funnel.toml"))
            assert [(t.campaign_id, t.outcome) for t in scheduler.tick()] == [
                ("offer-1", "started"),
                ("offer-2", "waiting"),
            ]
            _wait(lambda: client.hget(keys.control("offer-1"), "state") == b"completed", "round 1 to complete")
            asyncio.run(_record_truth(cluster.target.app_url, _refs(client, "offer-1")))

            assert [t.outcome for t in scheduler.tick()] == ["done", "waiting"]  # the 72 h window is open
            ended = float(client.hget(keys.round_state("offer-2"), "source_ended_at") or 0)
            clock.now = ended + 72 * 3600 - 1
            assert [t.outcome for t in scheduler.tick()] == ["done", "waiting"]
            clock.now = ended + 72 * 3600 + 1
            assert [t.outcome for t in scheduler.tick()] == ["done", "started"]
            _wait(lambda: control.status("offer-2", speed=False).complete, "round 2 to complete")
            assert [t.outcome for t in scheduler.tick()] == ["done", "done"]
            cluster.wait_drained()
            stats = cluster.mock_stats()
            second = {r.recipient_id for r in iter_outcomes(client, "offer-2", 1) if r.state == "sent"}
            lineage = load_manifest(client, "offer-2").lineage
            reports = {r.campaign_id: r for r in reports_for(client, "offer", settings)}
        finally:
            broker.close()
            client.close()
    assert second == EXPECTED_ROUND_2 and "r5" not in second  # r5 opted out
    assert stats["by_channel"] == {"email": N, "sms": len(EXPECTED_ROUND_2)} and stats["duplicates"] == 0
    assert lineage is not None and lineage["excluded_opted_out"] == 1 and lineage["missing_in_contacts"] == 0
    first, follow = reports["offer-1"], reports["offer-2"]
    assert (first.audience, first.accepted, first.sent, first.delivered) == (N, N, N, 0)
    assert (first.human_opens, first.machine_opens, first.clicks, first.optouts) == (20, 5, 5, 1)
    assert first.open_rate == 20 / N and first.click_rate == 5 / N and first.delivery_rate is None  # no receipts
    assert first.cost == N * 0.001 and first.provider == "sendgrid"
    assert (follow.channel, follow.derived_from, follow.accepted, follow.sent) == ("sms", "offer-1", 14, 14)
    assert follow.human_opens == follow.clicks == 0 and follow.cost == 14 * 0.01
    assert first.started_at is not None and first.ended_at is not None and first.ended_at >= first.started_at
