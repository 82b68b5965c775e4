"""Provider resilience (issue 18): breakers, waiting instead of dead-lettering, pauses for refused
accounts, the batch log line. Real Redis, the real mock provider over sockets, the real engine."""

from __future__ import annotations

import asyncio
import heapq
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio as aredis
from prometheus_client import CollectorRegistry

from channels.base import Message, Permanent, Retryable, Sent
from channels.email import SendGridConfig, SendGridEmail
from channels.sms import TwilioConfig, TwilioSms
from dispatch.campaign import CampaignSpec
from dispatch.config import Settings, load_settings
from dispatch.logs import JsonFormatter
from dispatch.plan.planner import Planner
from dispatch.send.broker import build_broker, enqueue_batch
from dispatch.send.control import CampaignControl
from dispatch.send.engine import BatchOutcome, Engine, SendStep, render_step
from dispatch.send.health import BreakerPolicy, ProviderHealth, Transition, health_key, is_trouble, read_breaker
from dispatch.send.resilience import Resilience, trouble_key
from dispatch.send.retry import RetryPolicy
from dispatch.send.tracking import Tracker, campaign_counters, iter_records
from loadtest.audience import generate_rows
from loadtest.cluster import LocalCluster
from loadtest.mock_core import FaultMix, MockConfig
from loadtest.mock_provider import MockProvider
from monitoring.metrics import Metrics

SID, TOKEN = "AC" + "3" * 32, "resilience-test-token"
SG_KEY = "SG.resilience-key"
#: Small numbers so a test's outage opens the breaker after a handful of answers and probes often.
POLICY = BreakerPolicy(min_failures=4, failure_ratio=0.5, open_s=0.2, max_open_s=0.5, probe_lease_s=5.0)


@dataclass
class Rig:
    sync: redis.Redis
    client: aredis.Redis
    mock: MockProvider
    engine: Engine
    control: CampaignControl
    health: ProviderHealth
    metrics: Metrics
    home: Path
    transitions: list[Transition] = field(default_factory=list)

    def plan(self, cid: str, phones: list[str], *, channel: str = "sms", batch_size: int = 40) -> tuple[int, int]:
        column = "phone" if channel == "sms" else "email"
        rows = [{"id": f"{cid}-{i}", column: p, "first_name": "Ada"} for i, p in enumerate(phones)]
        settings = load_settings({"DISPATCH_HOME": str(self.home), "DISPATCH_BATCH_SIZE": str(batch_size)})
        spec = CampaignSpec(
            id=cid, channel=channel, body="Hi $first_name", subject="Hi" if channel == "email" else None
        )
        report = Planner(self.sync, settings).plan(spec, rows)
        self.control.start(cid)
        return report.accepted, report.batches

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def phones(n: int, start: int = 0) -> list[str]:
    return [f"+447411{i:06d}" for i in range(start, start + n)]


@pytest.fixture
async def rig(redis_client: redis.Redis, aredis_client: aredis.Redis, tmp_path: Path) -> AsyncIterator[Rig]:
    config = MockConfig(account_sid=SID, auth_token=TOKEN, sendgrid_api_key=SG_KEY, seed=3)
    async with MockProvider(config) as mock, aiohttp.ClientSession() as session:
        sms = TwilioSms(
            session,
            TwilioConfig(
                base_url=mock.url,
                account_sid=SID,
                auth_token=TOKEN,
                from_number="+15005550006",
                timeout_s=1.0,
                honours_idempotency=True,
            ),
        )
        email = SendGridEmail(
            session,
            SendGridConfig(
                base_url=mock.url,
                api_key=SG_KEY,
                from_email="a@example.com",
                unsubscribe_url="https://example.com/u/{ref}",
            ),
        )
        metrics = Metrics(CollectorRegistry())
        transitions: list[Transition] = []
        health = ProviderHealth(aredis_client, POLICY, metrics=metrics, on_transition=transitions.append)
        retry = RetryPolicy(max_attempts=3, backoff_max_s=0.05, retry_horizon_s=120.0)
        engine = Engine(
            client=aredis_client,
            tracker=Tracker(aredis_client, ttl_s=3600),
            channels={"sms": sms, "email": email},
            steps=[render_step, SendStep(retry, health=health, metrics=metrics)],
            owner="resilience-test",
            concurrency=16,
            metrics=metrics,
            resilience=Resilience(aredis_client, horizon_s=retry.retry_horizon_s, metrics=metrics),
        )
        control = CampaignControl(redis_client, lambda cid, n, delay: None)
        yield Rig(redis_client, aredis_client, mock, engine, control, health, metrics, tmp_path, transitions)


async def drive(
    rig: Rig,
    cid: str,
    batches: int,
    *,
    after: Callable[[int, BatchOutcome], None] | None = None,
    within_s: float = 60.0,
) -> None:
    """Run every batch as the broker would: a batch that asks to come back is run again after its
    delay, until none asks (or ``within_s`` passes: then the test fails)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within_s
    due = [(loop.time(), n) for n in range(batches)]
    heapq.heapify(due)
    while due:
        at, number = heapq.heappop(due)
        assert at < give_up, f"campaign {cid} still had batches to run after {within_s} s"
        await asyncio.sleep(max(0.0, at - loop.time()))
        outcome = await rig.engine.send_batch(cid, number)
        if after is not None:
            after(number, outcome)
        if outcome.requeue_after is not None:
            heapq.heappush(due, (loop.time() + outcome.requeue_after, number))


@pytest.mark.parametrize("mode", ["reset", "503"])
async def test_provider_outage_mid_campaign_waits_then_sends_everything_once(rig: Rig, mode: str) -> None:
    cid = f"outage-{mode}"
    accepted, batches = rig.plan(cid, phones(200))
    assert batches >= 4
    waiting: list[str] = []

    def after(number: int, outcome: BatchOutcome) -> None:
        if number == 0 and outcome.state == "done" and not rig.mock.ledger.faults:
            rig.mock.set_faults(FaultMix(outage_s=1.5, outage_mode=mode))  # type: ignore[arg-type]
        status = rig.control.status(cid, speed=False)
        if status.waiting_for is not None:
            waiting.append(status.waiting_for)

    await drive(rig, cid, batches, after=after)
    counters = campaign_counters(rig.sync, cid)
    assert rig.mock.ledger.faults["outage"] > 0, "the outage never happened: the test proves nothing"
    assert counters["sent"] == accepted == rig.mock.ledger.accepted
    assert counters["failed"] == counters["dead_letters"] == 0
    assert rig.mock.ledger.duplicates == 0
    assert [t.kind for t in rig.transitions][:1] == ["opened"] and rig.transitions[-1].kind == "closed"
    assert waiting and waiting[0].startswith("provider twilio (breaker open since ")
    # once it recovered nobody is told to wait, and the gauge says closed again
    assert rig.control.status(cid, speed=False).waiting_for is None
    assert rig.sample("dispatch_provider_breaker_state", provider="twilio") == 0
    assert rig.sample("dispatch_provider_breaker_transitions_total", provider="twilio", state="opened") >= 1
    # the probes spent few requests: the outage did not cost every message its attempts
    assert max(r.attempts for r in iter_records(rig.sync, cid, batches)) <= 1 + rig.mock.ledger.faults["outage"]


async def test_breaker_opened_by_one_worker_holds_back_every_worker(rig: Rig, aredis_client: aredis.Redis) -> None:
    # another process: its own caches, the same Redis (it trusts a closed breaker it read for
    # closed_cache_s: zero here, so the test needs no wait)
    other = ProviderHealth(aredis_client, replace(POLICY, closed_cache_s=0.0))
    assert (await other.admit("twilio")).verdict == "closed"
    await rig.health.record("twilio", 0, POLICY.min_failures, "twilio: HTTP 503")
    admission = await other.admit("twilio")
    assert admission.verdict == "wait" and admission.reason == "twilio: HTTP 503"
    assert read_breaker(rig.sync, "twilio").describe().startswith("provider twilio (breaker open since ")
    # after the open period exactly one of them probes; the other keeps waiting
    rig.sync.hset(health_key("twilio"), "retry_at", "0")
    verdicts = sorted([(await other.admit("twilio")).verdict, (await rig.health.admit("twilio")).verdict])
    assert verdicts == ["probe", "wait"]
    # the probe fails: open again, twice as long; then it succeeds: closed for everyone
    await rig.health.record("twilio", 0, 1, "twilio: HTTP 503", probe=True)
    assert float(rig.sync.hget(health_key("twilio"), "open_s") or 0) == pytest.approx(2 * POLICY.open_s)
    rig.sync.hset(health_key("twilio"), "retry_at", "0")
    assert (await other.admit("twilio")).verdict == "probe"
    await other.record("twilio", 1, 0, probe=True)
    assert (await rig.health.admit("twilio")).verdict == "closed"
    assert [t.kind for t in rig.transitions] == ["opened", "reopened"]


async def test_a_few_errors_among_many_answers_leave_the_breaker_closed(rig: Rig) -> None:
    await rig.health.record("twilio", 100, POLICY.min_failures, "twilio: HTTP 500")
    await rig.health.flush("twilio")
    assert (await rig.health.admit("twilio")).verdict == "closed"


def test_only_provider_trouble_counts_against_the_provider() -> None:
    assert is_trouble(Retryable("r", "down", None))
    assert is_trouble(Retryable("r", "busy", 503))
    assert is_trouble(Retryable("r", "slow down", 429, 1.0))
    assert not is_trouble(Retryable("r", "other", 409))
    assert not is_trouble(Sent("r", "id"))


async def test_trouble_is_dead_lettered_only_once_the_retry_horizon_has_passed(rig: Rig) -> None:
    cid = "horizon-1"
    rig.plan(cid, phones(5, 1000))
    rig.mock.set_faults(FaultMix(p_500=1.0))
    rig.health.policy = BreakerPolicy(min_failures=10_000)  # this test is about the horizon alone
    outcome = await rig.engine.send_batch(cid, 0)
    records = list(iter_records(rig.sync, cid, 1))
    assert outcome.state == "retry" and {r.state for r in records} == {"retry"}
    assert min(r.attempts for r in records) >= 3  # max_attempts used up, yet not dead: trouble
    since = float(rig.sync.hget(trouble_key(cid), "0") or 0)
    assert since > 0
    rig.sync.hset(trouble_key(cid), "0", f"{since - 121:.3f}")  # the horizon (120 s) is over
    await rig.engine.send_batch(cid, 0)
    counters = campaign_counters(rig.sync, cid)
    assert counters["dead_letters"] == counters["failed"] == 5
    assert rig.mock.ledger.accepted == 0


async def test_rejected_credentials_pause_the_campaign_and_resume_continues(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    cid = "creds-1"
    accepted, batches = rig.plan(cid, phones(120, 2000))
    caplog.set_level(logging.INFO)
    assert (await rig.engine.send_batch(cid, 0)).state == "done"
    rig.mock.set_faults(FaultMix(unauthorized_s=3600))  # the auth token was rotated
    outcome = await rig.engine.send_batch(cid, 1)
    assert outcome.state == "paused" and outcome.requeue_after is not None
    status = rig.control.status(cid, speed=False)
    assert status.state == "paused"
    assert status.pause_reason is not None and "provider twilio refused the account" in status.pause_reason
    assert "twilio 20003: authentication failed" in status.pause_reason
    assert status.as_dict()["pause_reason"] == status.pause_reason
    counters = campaign_counters(rig.sync, cid)
    assert counters["failed"] == counters["dead_letters"] == 0
    assert {r.attempts for r in iter_records(rig.sync, cid, batches) if r.state == "retry"} == {0}
    assert rig.sample("dispatch_provider_account_errors_total", provider="twilio") == 1
    assert any("paused" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # the other batches do not send while it is paused
    rig.engine._control.clear()
    before = rig.mock.ledger.accepted
    assert (await rig.engine.send_batch(cid, 2)).state == "paused"
    assert rig.mock.ledger.accepted == before
    # the operator fixes the credentials and resumes: it goes on from where it stopped
    rig.mock.set_faults(FaultMix())
    rig.control.resume(cid)
    rig.engine._control.clear()
    assert rig.control.status(cid, speed=False).pause_reason is None
    await drive(rig, cid, batches)
    counters = campaign_counters(rig.sync, cid)
    assert counters["sent"] == accepted == rig.mock.ledger.accepted and counters["failed"] == 0
    assert rig.mock.ledger.duplicates == 0


async def test_rejected_email_key_pauses_a_grouped_batch_without_failing_it(rig: Rig) -> None:
    cid = "creds-email"
    addresses = [f"user{i}@example.com" for i in range(30)]
    accepted, batches = rig.plan(cid, addresses, channel="email")
    rig.mock.set_faults(FaultMix(unauthorized_s=3600))
    outcome = await rig.engine.send_batch(cid, 0)
    assert outcome.state == "paused"
    status = rig.control.status(cid, speed=False)
    assert status.pause_reason is not None and "provider sendgrid refused the account" in status.pause_reason
    assert campaign_counters(rig.sync, cid)["failed"] == 0
    rig.mock.set_faults(FaultMix())
    rig.control.resume(cid)
    rig.engine._control.clear()
    await drive(rig, cid, batches)
    assert campaign_counters(rig.sync, cid)["sent"] == accepted == rig.mock.ledger.accepted


_ADDRESS = re.compile(r"\+?\d{9,}|@example\.com")


async def test_one_log_line_per_batch_with_counts_and_never_an_address(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    cid = "log-1"
    accepted, batches = rig.plan(cid, phones(80, 3000))
    caplog.set_level(logging.INFO)
    rig.mock.set_faults(FaultMix(outage_s=0.6, outage_mode="503"))
    await drive(rig, cid, batches)
    lines = [r for r in caplog.records if r.name == "dispatch.send.resilience"]
    fields = [r.batch for r in lines if hasattr(r, "batch")]
    assert {f["batch"] for f in fields} == set(range(batches))
    assert sum(f["sent"] for f in fields) == accepted
    assert any(f["waiting"] > 0 for f in fields)  # the outage made some runs wait
    assert set(fields[0]) == {"campaign", "batch", "sent", "failed", "retried", "waiting", "duration_s"}
    formatter = JsonFormatter()
    for record in caplog.records:
        text = record.getMessage() + formatter.format(record)
        assert not _ADDRESS.search(text), text
    decoded = orjson.loads(formatter.format(lines[0]))
    assert decoded["batch"]["campaign"] == cid and decoded["level"] == "INFO"


async def test_mock_timed_faults_and_refused_prefixes(rig: Rig) -> None:
    async with aiohttp.ClientSession() as session:
        sms = TwilioSms(
            session,
            TwilioConfig(base_url=rig.mock.url, account_sid=SID, auth_token=TOKEN, from_number="+15005550006"),
        )

        def message(to: str) -> Message:
            return Message(ref="r1", address=to, body="hi", idempotency_key=to)

        rig.mock.set_faults(FaultMix(refuse_prefixes=("+86",)))
        refused, ok = await sms.send([message("+8613800138000"), message("+447411999999")])
        assert isinstance(refused, Permanent) and refused.code == "21408" and not refused.suppress
        assert isinstance(ok, Sent)
        rig.mock.set_faults(FaultMix(outage_s=30, outage_mode="reset"))
        (down,) = await sms.send([message("+447411999998")])
        assert isinstance(down, Retryable) and down.status is None
        rig.mock.set_faults(FaultMix(outage_s=30, outage_mode="503"))
        (down,) = await sms.send([message("+447411999998")])
        assert isinstance(down, Retryable) and down.status == 503
        assert rig.mock.ledger.faults["outage"] == 2
    with pytest.raises(ValueError, match="outage_mode"):
        FaultMix(outage_mode="boom")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="refuse_prefixes"):
        FaultMix.from_mapping({"refuse_prefixes": "+86"})
    assert FaultMix.from_mapping({"refuse_prefixes": ["+86"]}).refuse_prefixes == ("+86",)


def test_settings_build_the_breaker_and_the_horizon(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "DISPATCH_HOME": str(tmp_path),
            "DISPATCH_BREAKER_MIN_FAILURES": "7",
            "DISPATCH_BREAKER_OPEN_S": "3",
            "DISPATCH_RETRY_HORIZON_S": "900",
        }
    )
    policy = BreakerPolicy.from_settings(settings)
    assert (policy.min_failures, policy.open_s, policy.max_open_s) == (7, 3.0, 5.0)
    assert RetryPolicy.from_settings(settings).retry_horizon_s == 900.0
    with pytest.raises(ValueError, match="failure_ratio"):
        BreakerPolicy(failure_ratio=0)


# --- real worker processes ---------------------------------------------------------------------


def _wait_for(check: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_workers_wait_out_an_outage_and_finish_the_campaign_by_themselves(cluster_settings: Settings) -> None:
    """Two real workers, the mock provider down (connections dropped) for 4 s mid-campaign:
    nothing dead-lettered, every message accepted once, the campaign completes with no action."""
    cid = "outage-e2e"
    rows = list(generate_rows(1500, seed=18))
    spec = CampaignSpec(id=cid, channel="sms", body="Hello $first_name", rate=250.0)  # ~6 s of sending
    with LocalCluster(cluster_settings, workers=2) as cluster:
        assert cluster.target is not None
        client = redis.Redis.from_url(cluster.target.app_url)
        broker = build_broker(cluster_settings, cluster.target.broker_url)
        try:
            plan = Planner(client, cluster_settings).plan(spec, rows)
            control = CampaignControl(client, lambda c, n, d: enqueue_batch(broker, c, n, d))
            control.start(cid)
            _wait_for(lambda: campaign_counters(client, cid)["sent"] >= 300, 60, "300 messages sent")
            asyncio.run(cluster.set_faults({"outage_s": 4.0, "outage_mode": "reset"}))
            waiting: list[str] = []

            def waiting_seen() -> bool:
                status = control.status(cid, speed=False)
                if status.waiting_for:
                    waiting.append(status.waiting_for)
                return bool(waiting)

            _wait_for(waiting_seen, 30, "the campaign to say it waits for its provider")
            _wait_for(lambda: control.status(cid, speed=False).complete, 120, "the campaign to complete")
            counters = campaign_counters(client, cid)
            stats = cluster.mock_stats()
        finally:
            broker.close()
            client.close()
    assert waiting[0].startswith("provider twilio (breaker open since ")
    assert stats["faults"].get("outage", 0) > 0
    assert counters["dead_letters"] == counters["failed"] == 0
    assert counters["sent"] == plan.accepted == stats["accepted"]
    assert stats["duplicates"] == 0
