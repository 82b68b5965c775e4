"""The whole pipeline with real processes: Redis, the mock provider, dramatiq workers."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from dispatch.campaign import CampaignSpec
from dispatch.config import Settings, load_settings
from dispatch.plan.planner import Planner
from dispatch.send.broker import build_broker, enqueue_batch
from dispatch.send.control import CampaignControl
from dispatch.send.engine import limiter_burst
from dispatch.send.tracking import iter_records
from loadtest.audience import generate_rows
from loadtest.cluster import LocalCluster
from loadtest.demo import run_campaign


@pytest.fixture
def settings(cluster_settings: Settings) -> Settings:
    return cluster_settings


def _spec(cid: str) -> CampaignSpec:
    return CampaignSpec(id=cid, channel="sms", body="Hello $first_name")


def test_every_accepted_recipient_reaches_the_provider_once(settings: Settings) -> None:
    with LocalCluster(settings, workers=2) as cluster:
        rows = list(generate_rows(3000, seed=11))
        plan, status, _ = run_campaign(cluster, _spec("e2e-1"), rows, progress=False, timeout_s=120)
        stats = cluster.mock_stats()
    assert plan["total"] == 3000 == plan["accepted"] + sum(plan["rejected"].values())
    assert {"duplicate", "invalid_phone", "missing_address"} <= set(plan["rejected"])
    assert status.complete
    assert status.counters["sent"] == plan["accepted"]
    assert stats["accepted"] == plan["accepted"]
    assert stats["duplicates"] == 0


def test_replanning_returns_the_same_plan_and_starting_twice_sends_once(settings: Settings) -> None:
    with LocalCluster(settings, workers=1) as cluster:
        assert cluster.target is not None
        client = redis.Redis.from_url(cluster.target.app_url)
        rows = list(generate_rows(500, seed=3))
        first = Planner(client, settings).plan(_spec("e2e-twice"), rows)
        again = Planner(client, settings).plan(_spec("e2e-twice"), rows)
        assert again.existing and again.as_dict()["accepted"] == first.accepted
        broker = build_broker(settings, cluster.target.broker_url)
        control = CampaignControl(client, lambda cid, n, d: enqueue_batch(broker, cid, n, d))
        assert control.start("e2e-twice")
        assert not control.start("e2e-twice")
        # a duplicate enqueue of every batch (a campaign system retrying) must not double-send
        for n in range(first.batches):
            enqueue_batch(broker, "e2e-twice", n)
        deadline = time.monotonic() + 60
        while not control.status("e2e-twice").complete and time.monotonic() < deadline:
            time.sleep(0.1)
        cluster.wait_drained()  # the duplicate batch messages are done, not just given a second
        stats = cluster.mock_stats()
        broker.close()
        client.close()
    assert stats["accepted"] == first.accepted
    assert stats["duplicates"] == 0


def test_sigkilled_worker_batch_is_finished_by_another_without_double_send(settings: Settings) -> None:
    slow = replace(settings, send_concurrency=10, worker_threads=1)
    # the mock ignores Idempotency-Key, as Twilio does (and sms_honours_idempotency is false by
    # default): the killed worker's requests in flight are looked up in the Messages list, and
    # only those Twilio never got are sent again
    assert settings.sms_honours_idempotency is False
    mock_args = ["--faults", '{"latency_ms": 40}']
    with LocalCluster(slow, workers=2, mock_args=mock_args) as cluster:
        assert cluster.target is not None
        client = redis.Redis.from_url(cluster.target.app_url)
        broker = build_broker(slow, cluster.target.broker_url)
        rows = list(generate_rows(2000, seed=5))
        plan = Planner(client, slow).plan(_spec("e2e-kill"), rows)
        control = CampaignControl(client, lambda cid, n, d: enqueue_batch(broker, cid, n, d))
        control.start("e2e-kill")
        deadline = time.monotonic() + 30
        while control.status("e2e-kill").counters["sent"] < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = cluster.worker_processes[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = time.monotonic()
        sent_at_kill = control.status("e2e-kill").counters["sent"]
        assert 0 < sent_at_kill < plan.accepted, "the kill must land mid-campaign"
        deadline = time.monotonic() + 90
        while not control.status("e2e-kill").complete and time.monotonic() < deadline:
            time.sleep(0.1)
        recovered_in = time.monotonic() - killed_at
        status = control.status("e2e-kill")
        stats = cluster.mock_stats()
        broker.close()
        client.close()
    assert status.complete, f"not finished {recovered_in:.0f}s after the kill: {status.as_dict()}"
    assert status.counters["sent"] == plan.accepted
    assert stats["accepted"] == plan.accepted  # nothing lost
    assert stats["duplicates"] == 0  # nothing sent twice


def test_sigkilled_email_worker_group_is_reclaimed_and_counted_once(settings: Settings) -> None:
    """A worker killed with a SendGrid request out: its group is reclaimed by another worker.

    With the default settings: SendGrid has no idempotency keys, so ``email_honours_idempotency``
    is false by default, and its Email Activity API is a paid add-on (``email_activity_api`` false
    by default): nothing can tell whether the group in flight was sent, so the default in-doubt
    policy holds it (dead-lettered as ``in_doubt``) for an operator, never resent: every recipient
    ends sent or dead-lettered, counted once, and nobody gets the email twice. (Resending with the
    same key where it is honoured is tested
    in-process in test_tracking_groups.py: the SendGrid twin does not keep its body-less 202
    answers for replays.) The worker is killed while its request is held 2 s by the twin, so the
    kill always lands with a request in flight.
    """
    assert settings.email_honours_idempotency is False  # the default, not set by this test
    slow = replace(settings, send_concurrency=10, worker_threads=1)
    rows = [{"id": f"k{i}", "email": f"user{i}@example.com", "first_name": "Ada"} for i in range(1000)]
    cid = "e2e-kill-email"
    with LocalCluster(slow, workers=1, mock_args=["--faults", '{"latency_ms": 2000}']) as cluster:
        assert cluster.target is not None
        client = redis.Redis.from_url(cluster.target.app_url)
        broker = build_broker(slow, cluster.target.broker_url)
        spec = CampaignSpec(id=cid, channel="email", body="Hello $first_name", subject="Hi", batch_size=100)
        plan = Planner(client, slow).plan(spec, rows)
        control = CampaignControl(client, lambda c, n, d: enqueue_batch(broker, c, n, d))
        control.start(cid)

        def sending() -> int:
            return sum(1 for r in iter_records(client, cid, plan.batches) if r.state == "sending")

        _wait_for(lambda: sending() > 0, 30, "a SendGrid request in flight")
        in_doubt = sending()  # one worker thread: one group, held 2 s by the twin
        victim = cluster.worker_processes[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        sent_at_kill = control.status(cid).counters["sent"]
        assert in_doubt > 0 and sent_at_kill + in_doubt < plan.accepted, "the kill must land mid-campaign"
        asyncio.run(cluster.set_faults({}))  # the rest at full speed
        cluster.add_worker()
        deadline = time.monotonic() + 90
        while not control.status(cid).complete and time.monotonic() < deadline:
            time.sleep(0.1)
        status = control.status(cid)
        stats = cluster.mock_stats()
        records = list(iter_records(client, cid, plan.batches))
        broker.close()
        client.close()
    counters = status.counters
    assert status.complete, status.as_dict()
    assert counters["sent"] + counters["dead_letters"] == plan.accepted  # nothing lost, each counted once
    assert counters["failed"] == counters["dead_letters"]
    # the messages of the request in flight are in doubt: held (dead-lettered), not resent
    assert counters["dead_letters"] == counters["in_doubt"] == in_doubt, (counters, stats)
    assert Counter(r.code for r in records if r.state != "sent") == {"in_doubt": in_doubt}
    assert counters["sent"] <= stats["accepted"] <= plan.accepted
    assert stats["duplicates"] == 0  # a reclaimed in-flight group is never resent


def _wait_for(condition: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {within_s} s"
        time.sleep(0.05)


def _settled(read: Callable[[], int], *, quiet_s: float, within_s: float) -> int:
    """The value once it has not changed for ``quiet_s`` (fails if it keeps moving ``within_s``)."""
    deadline = time.monotonic() + within_s
    value, since = read(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"still moving after {within_s} s (now {value})"
        time.sleep(0.1)
        if (now := read()) != value:
            value, since = now, time.monotonic()
    return value


def test_rate_limit_pause_and_resume_across_workers(settings: Settings) -> None:
    limited = replace(settings, sms_rate=300.0)
    with LocalCluster(limited, workers=2) as cluster:
        assert cluster.target is not None
        client = redis.Redis.from_url(cluster.target.app_url)
        broker = build_broker(limited, cluster.target.broker_url)
        plan = Planner(client, limited).plan(_spec("e2e-pause"), list(generate_rows(1500, seed=8)))
        control = CampaignControl(client, lambda cid, n, d: enqueue_batch(broker, cid, n, d))
        control.start("e2e-pause")
        # conditions, not fixed sleeps: on a loaded machine the workers may take seconds to start
        _wait_for(lambda: control.status("e2e-pause").counters["sent"] > 0, 60, "no message sent")
        control.pause("e2e-pause")
        paused_at = _settled(lambda: control.status("e2e-pause").counters["sent"], quiet_s=1.5, within_s=30)
        time.sleep(1.5)  # and it stays paused
        still = control.status("e2e-pause").counters["sent"]
        assert 0 < paused_at == still < plan.accepted, (paused_at, still)
        control.resume("e2e-pause")
        deadline = time.monotonic() + 60
        while not control.status("e2e-pause").complete and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = cluster.mock_stats()
        broker.close()
        client.close()
    assert stats["accepted"] == plan.accepted
    assert stats["duplicates"] == 0
    per_second = sorted(stats["per_second"].items())[1:-1]  # whole seconds only
    burst = limiter_burst(300)
    assert per_second and max(n for _, n in per_second) <= 300 * 1.02 + burst, per_second


def test_redis_restart_mid_campaign_completes_without_loss(tmp_path: Path) -> None:
    from dispatch.store.embedded import ensure_embedded, stop_embedded

    redis_home = tmp_path / "own-redis"
    server, _ = ensure_embedded(redis_home)
    try:
        settings = load_settings(
            {
                "DISPATCH_HOME": str(tmp_path),
                "DISPATCH_REDIS_URL": server.url,
                "DISPATCH_HEARTBEAT_TIMEOUT_MS": "3000",
                "DISPATCH_BATCH_SIZE": "100",
                "DISPATCH_SEND_CONCURRENCY": "8",
            }
        )
        with LocalCluster(settings, workers=2, mock_args=["--faults", '{"latency_ms": 20}']) as cluster:
            assert cluster.target is not None
            client = redis.Redis.from_url(cluster.target.app_url)
            broker = build_broker(settings, cluster.target.broker_url)
            plan = Planner(client, settings).plan(_spec("e2e-restart"), list(generate_rows(2000, seed=9)))
            control = CampaignControl(client, lambda cid, n, d: enqueue_batch(broker, cid, n, d))
            control.start("e2e-restart")
            deadline = time.monotonic() + 30
            while control.status("e2e-restart").counters["sent"] < 300 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert control.status("e2e-restart").counters["sent"] < plan.accepted
            stop_embedded(redis_home)  # SHUTDOWN: the AOF is flushed
            time.sleep(1.0)
            ensure_embedded(redis_home, port=server.port)  # same port, data reloaded from the AOF
            client = redis.Redis.from_url(cluster.target.app_url)
            control = CampaignControl(client, lambda cid, n, d: enqueue_batch(broker, cid, n, d))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if control.status("e2e-restart").complete:
                        break
                except redis.ConnectionError:
                    pass
                time.sleep(0.2)
            status = control.status("e2e-restart")
            stats = cluster.mock_stats()
            broker.close()
            client.close()
        assert status.complete, status.as_dict()
        assert status.counters["sent"] == plan.accepted
        assert stats["accepted"] == plan.accepted
        assert stats["duplicates"] == 0
    finally:
        stop_embedded(redis_home)


def test_rerate_and_mid_campaign_opt_outs_take_effect_within_seconds(settings: Settings) -> None:
    from dispatch.rules.suppression import SuppressionStore, hasher_for

    with LocalCluster(settings, workers=2) as cluster:
        assert cluster.target is not None
        client = redis.Redis.from_url(cluster.target.app_url)
        broker = build_broker(settings, cluster.target.broker_url)
        rows = list(generate_rows(3000, seed=12))
        spec = CampaignSpec(id="e2e-rerate", channel="sms", body="Hello $first_name", rate=100.0)
        plan = Planner(client, settings).plan(spec, rows)
        control = CampaignControl(client, lambda cid, n, d: enqueue_batch(broker, cid, n, d))
        control.start("e2e-rerate")
        deadline = time.monotonic() + 30
        while control.status("e2e-rerate").counters["sent"] < 50 and time.monotonic() < deadline:
            time.sleep(0.05)  # workers are up and sending
        time.sleep(2.5)
        # opt-outs arriving mid-campaign: the last 100 audience rows (not yet sent at 100/s)
        late = [r["phone"] for r in rows[-100:] if r["phone"]]
        SuppressionStore(client, hasher=hasher_for(settings)).add("sms", late)
        rerated_at = time.time()
        control.set_rate("e2e-rerate", 400.0)
        deadline = time.monotonic() + 60
        while not control.status("e2e-rerate").complete and time.monotonic() < deadline:
            time.sleep(0.1)
        status = control.status("e2e-rerate")
        stats = cluster.mock_stats()
        broker.close()
        client.close()
    assert status.complete
    per_second = {int(k): v for k, v in stats["per_second"].items()}
    before = [n for t, n in per_second.items() if t < rerated_at - 1]
    after = [n for t, n in sorted(per_second.items()) if t >= rerated_at + 2][:-1]  # whole seconds only
    assert before and max(before) <= 100 * 1.02 + limiter_burst(100), (rerated_at, per_second)
    assert after and max(after) > 250, (before, after)  # the new rate reached every worker
    assert max(after) <= 400 * 1.02 + limiter_burst(400)
    assert status.counters["suppressed"] >= 1
    assert stats["accepted"] == status.counters["sent"] == plan.accepted - status.counters["suppressed"]
    assert stats["duplicates"] == 0


@pytest.mark.parametrize(
    ("channel", "column", "address"),
    [
        ("email", "email", "user{i}@example.com"),
        ("push", "push_token", "fcm-{i:06d}-" + "a" * 80),
        ("webhook", "webhook_url", "https://hooks.example.com/u/{i}"),
    ],
)
def test_every_channel_end_to_end(settings: Settings, channel: str, column: str, address: str) -> None:
    rows = [{"id": f"r{i}", column: address.format(i=i), "first_name": "Ada"} for i in range(1200)]
    rows.append({"id": "bad", column: "not an address", "first_name": "Bo"})
    spec = CampaignSpec(id=f"e2e-{channel}", channel=channel, body="Hello $first_name", subject="Hi")
    with LocalCluster(settings, workers=1) as cluster:
        plan, status, _ = run_campaign(cluster, spec, rows, progress=False, timeout_s=90)
        stats = cluster.mock_stats()
    assert plan["accepted"] == 1200 and sum(plan["rejected"].values()) == 1
    assert status.complete and status.counters["sent"] == 1200
    assert stats["by_channel"].get(channel) == 1200
    assert stats["duplicates"] == 0


def _last_change(read: Callable[[], int], *, quiet_s: float, within_s: float) -> tuple[int, float]:
    """Poll ``read`` until it has not changed for ``quiet_s``; the value and when it last moved
    (``time.monotonic()`` of the first poll that saw it, so never earlier than the change)."""
    deadline = time.monotonic() + within_s
    value, since = read(), time.monotonic()
    moved = since
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"still moving after {within_s} s (now {value})"
        time.sleep(0.05)
        if (now := read()) != value:
            value, since = now, time.monotonic()
            moved = since
    return value, moved


@pytest.mark.parametrize(("channel", "rate"), [("sms", 10.0), ("sms", 60.0), ("email", 60.0)])
def test_low_rate_campaign_holds_its_cap_every_second_and_stops_within_a_second(
    settings: Settings, channel: str, rate: float
) -> None:
    """A slow campaign is released message by message, not in chunks committed up front: its cap
    holds in every second of the provider's ledger (from the first one on), and after ``pause``
    or ``cancel`` returns nothing more reaches the provider a second or so later, although every
    worker has a hundred or more of its messages claimed and waiting for tokens. An email request
    carries a slice of its batch (it used to ask for the whole batch's tokens at once: more than
    the burst, so a capped email campaign could not send at all)."""
    cid = f"e2e-slow-{channel}-{int(rate)}"
    count = int(rate * 20)  # ~20 s at the cap: cancelled long before
    if channel == "sms":
        rows = list(generate_rows(count, seed=14))
    else:
        rows = [{"id": f"m{i}", "email": f"user{i}@example.com", "first_name": "Ada"} for i in range(count)]
    spec = CampaignSpec(
        id=cid, channel=channel, body="Hello $first_name", subject="Hi" if channel == "email" else None, rate=rate
    )
    stop_within_s = 2.0  # ~1 s (the workers' cached state, a request) plus room for a loaded machine
    with LocalCluster(settings, workers=2) as cluster:
        assert cluster.target is not None
        client = redis.Redis.from_url(cluster.target.app_url)
        broker = build_broker(settings, cluster.target.broker_url)
        plan = Planner(client, settings).plan(spec, rows)
        control = CampaignControl(client, lambda c, n, d: enqueue_batch(broker, c, n, d))

        def received() -> int:
            return int(cluster.mock_stats()["accepted"])

        control.start(cid)
        _wait_for(lambda: received() >= 2 * rate, 60, "two seconds of the campaign's traffic sent")
        control.pause(cid)
        paused = time.monotonic()
        at_pause, last = _last_change(received, quiet_s=2.0, within_s=60)
        assert last - paused <= stop_within_s, f"sends went on {last - paused:.2f} s after pause"
        control.resume(cid)
        _wait_for(lambda: received() >= at_pause + rate, 60, "one second of traffic after resume")
        control.cancel(cid)
        cancelled = time.monotonic()
        at_cancel, last = _last_change(received, quiet_s=2.0, within_s=60)
        assert last - cancelled <= stop_within_s, f"sends went on {last - cancelled:.2f} s after cancel"
        stats = cluster.mock_stats()
        broker.close()
        client.close()
    assert at_cancel == stats["accepted"] < plan.accepted
    assert stats["duplicates"] == 0
    per_second = sorted(stats["per_second"].items())
    # every ledger second is a whole 1-s window, the first and last ones included; the bound is
    # the wanted one (a burst of a tenth of the rate, at least one), not whatever limiter_burst says
    assert max(n for _, n in per_second) <= rate * 1.02 + max(1, int(rate / 10)), per_second


def test_account_limit_follows_the_setting_at_each_start(settings: Settings) -> None:
    """A worker started with an account limit configures it with the campaign burst rule; one
    started without removes a limit an earlier start left in Redis (it used to go on applying)."""
    import asyncio

    import redis.asyncio as aredis

    from ratelimit.base import Limit
    from ratelimit.redis_backend import RedisRateLimiter

    assert settings.redis_url is not None
    key = f"sms:{settings.sms_account_sid}"

    async def limit() -> Limit | None:
        client = aredis.Redis.from_url(settings.redis_url or "")
        try:
            return await RedisRateLimiter(client).get_limit(key)
        finally:
            await client.aclose()

    with LocalCluster(replace(settings, sms_rate=10.0), workers=1):
        _wait_for(lambda: asyncio.run(limit()) is not None, 60, "the worker configured no account limit")
        configured = asyncio.run(limit())
    assert configured is not None and (configured.rate, configured.burst) == (10.0, limiter_burst(10.0)) == (10.0, 1)
    with LocalCluster(replace(settings, sms_rate=0.0), workers=1):
        _wait_for(lambda: asyncio.run(limit()) is None, 60, "the stale account limit was not removed")
