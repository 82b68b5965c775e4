"""Plan-time prediction from evidence: the running send statistics in Redis, the workers'
SendStats windows (injected clocks), the planner asking the evidence before any probe, and the
predicted range with its three-way verdict."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from dispatch.campaign import CampaignSpec
from dispatch.config import load_settings
from dispatch.plan.calibration import Speed
from dispatch.plan.evidence import (
    MAX_AGE_S,
    MIN_SAMPLES,
    REFERENCE_WORKER_CPU_S,
    WEIGHT,
    Z90,
    EvidenceStore,
    Window,
    evidence_speed,
    provider_of,
)
from dispatch.plan.planner import Planner
from dispatch.plan.prediction import MIN_RANGE, MIN_RANGE_HIGH, STARTUP_S, Capacity, predict
from dispatch.send.sendstats import MIN_WINDOW_ANSWERS, WINDOW_S, SendStats
from dispatch.store import keys

T0 = 1_800_000_000.0


def _window(cpu_us: float, *, latency_ms: float = 2.0, rate: float | None = 3_000.0) -> Window:
    return Window(
        cpu_s=cpu_us / 1e6,
        latency_s=latency_ms / 1000,
        rate=rate,
        inflight=None if rate is None else rate * latency_ms / 1000,
    )


# --- the store ---------------------------------------------------------------------------------


def test_the_store_keeps_exponentially_weighted_mean_and_spread(redis_client: redis.Redis) -> None:
    store = EvidenceStore(redis_client)
    figures = [300.0, 320.0, 280.0, 310.0, 290.0, 305.0, 295.0, 315.0]
    mean, var = figures[0], 0.0
    for i, us in enumerate(figures):
        store.record("sms", "twilio", "w-1", _window(us), now=T0 + i)
        if i:
            w = max(WEIGHT, 1 / (i + 1))  # a plain running mean over the first 1/WEIGHT windows
            d = us / 1e6 - mean / 1e6
            mean = mean / 1e6 + w * d
            var = (1 - w) * (var + w * d * d)
            mean *= 1e6
    evidence = store.read("sms", "twilio")
    assert evidence is not None and evidence.updated_at == pytest.approx(T0 + 7)
    cpu = evidence.stats["cpu_s"]
    assert cpu.n == len(figures)
    assert cpu.mean == pytest.approx(mean / 1e6) == pytest.approx(sum(figures) / len(figures) / 1e6)
    assert cpu.std == pytest.approx(math.sqrt(var))
    assert evidence.stats["rate"].mean == pytest.approx(3_000.0)
    assert evidence.stats["workers"].mean == pytest.approx(1.0)
    # a fixed set of fields, however many windows: the hash's size is bounded
    fields = redis_client.hlen(keys.evidence("sms", "twilio"))
    for i in range(50):
        store.record("sms", "twilio", "w-1", _window(300.0), now=T0 + 10 + i)
    assert redis_client.hlen(keys.evidence("sms", "twilio")) == fields
    assert redis_client.ttl(keys.evidence("sms", "twilio")) > 0


def test_the_store_counts_live_workers_and_keeps_channels_apart(redis_client: redis.Redis) -> None:
    store = EvidenceStore(redis_client)
    assert store.read("email", "sendgrid") is None
    assert store.record("sms", "twilio", "w-1", _window(300.0), now=T0) == 1
    assert store.record("sms", "twilio", "w-2", _window(300.0), now=T0 + 1) == 2
    assert store.record("sms", "twilio", "w-1", _window(300.0), now=T0 + 60) == 1  # w-2 went quiet
    store.record("email", "sendgrid", "w-1", _window(20.0, rate=None), now=T0 + 60)
    email = store.read("email", "sendgrid")
    assert email is not None and "rate" not in email.stats and email.stats["cpu_s"].n == 1
    with pytest.raises(ValueError, match="cpu_s must be a finite number"):
        store.record("sms", "twilio", "w-1", _window(math.inf), now=T0)


def test_evidence_is_used_only_when_recent_and_plentiful(redis_client: redis.Redis) -> None:
    store = EvidenceStore(redis_client)
    for i in range(MIN_SAMPLES - 1):
        store.record("sms", "twilio", "w-1", _window(320.0), now=T0 + i)
    few = store.read("sms", "twilio")
    assert few is not None and not few.usable(T0 + MIN_SAMPLES)
    store.record("sms", "twilio", "w-1", _window(320.0), now=T0 + MIN_SAMPLES)
    enough = store.read("sms", "twilio")
    assert enough is not None and enough.usable(T0 + MIN_SAMPLES + 1)
    assert not enough.usable(T0 + MIN_SAMPLES + MAX_AGE_S + 1)  # a day later the machine may differ
    speed = evidence_speed(enough, batch_api=False)
    assert speed.source == "evidence" and speed.factor == pytest.approx(320e-6 / REFERENCE_WORKER_CPU_S[0])
    assert speed.spread == 0.0  # identical windows
    assert evidence_speed(enough, batch_api=True).factor == 4.0  # clipped to FACTOR_RANGE


def test_the_speed_spread_is_the_p10_p90_half_width_of_the_windows() -> None:
    from dispatch.plan.evidence import Evidence, Stat

    evidence = Evidence(channel="sms", provider="twilio", stats={"cpu_s": Stat(320e-6, 32e-6, 20)}, updated_at=T0)
    assert evidence_speed(evidence, batch_api=False).spread == pytest.approx(Z90 * 0.1)


# --- the worker's windows --------------------------------------------------------------------


class Ticking:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _stats(redis_client: redis.Redis) -> tuple[SendStats, Ticking, Ticking]:
    clock, cpu = Ticking(100.0), Ticking(10.0)
    stats = SendStats(EvidenceStore(redis_client), "w-1", clock=clock, wall=lambda: T0, cpu=cpu)
    return stats, clock, cpu


def _run(stats: SendStats, clock: Ticking, cpu: Ticking, *, per_tick: int, cpu_per_answer: float, ticks: int) -> None:
    for _ in range(ticks):
        for _ in range(per_tick):
            stats.observe("sms", "twilio", 0.004)
        cpu.now += per_tick * cpu_per_answer
        clock.now += 0.5
        stats.tick()


def test_a_busy_window_publishes_cpu_latency_rate_and_concurrency(redis_client: redis.Redis) -> None:
    stats, clock, cpu = _stats(redis_client)
    ticks = int(WINDOW_S / 0.5)
    # the send's first busy window opens connections: no CPU figure from it; the next one counts
    _run(stats, clock, cpu, per_tick=1_000, cpu_per_answer=500e-6, ticks=ticks)
    _run(stats, clock, cpu, per_tick=1_000, cpu_per_answer=300e-6, ticks=ticks)  # 2,000/s, 60% of a core
    assert stats.published == 2
    evidence = EvidenceStore(redis_client).read("sms", provider_of("sms"))
    assert evidence is not None
    assert evidence.stats["cpu_s"].mean == pytest.approx(300e-6) and evidence.stats["cpu_s"].n == 1
    assert evidence.stats["latency_s"].mean == pytest.approx(0.004)
    assert evidence.stats["rate"].mean == pytest.approx(2_000.0) and evidence.stats["rate"].n == 2
    assert evidence.stats["inflight"].mean == pytest.approx(8.0)  # Little's law: 2,000/s x 4 ms


def test_an_idle_heartbeat_and_a_waiting_process_keep_rate_and_cpu_out(redis_client: redis.Redis) -> None:
    stats, clock, cpu = _stats(redis_client)
    ticks = int(WINDOW_S / 0.5)
    # a heartbeat without answers: the window's rate is no capacity figure
    clock.now += 0.5
    stats.tick()
    _run(stats, clock, cpu, per_tick=1_000, cpu_per_answer=300e-6, ticks=ticks - 1)
    # a rate-capped process: 100 answers a second, 5% of a core (its polling would weigh on each)
    _run(stats, clock, cpu, per_tick=50, cpu_per_answer=500e-6, ticks=ticks)
    evidence = EvidenceStore(redis_client).read("sms", "twilio")
    assert evidence is not None and stats.published == 2
    assert evidence.stats["rate"].n == 1 and evidence.stats["rate"].mean == pytest.approx(100.0)
    # neither window tells the CPU cost: the first had an idle heartbeat, the second mostly waited
    assert "cpu_s" not in evidence.stats and evidence.stats["latency_s"].n == 2
    # too few answers: dropped
    _run(stats, clock, cpu, per_tick=MIN_WINDOW_ANSWERS // ticks - 1, cpu_per_answer=300e-6, ticks=ticks)
    assert stats.dropped == 1 and stats.published == 2


# --- the planner -----------------------------------------------------------------------------


def _rows(n: int) -> list[dict[str, str]]:
    return [{"id": str(i), "phone": f"+447400{i:06d}", "first_name": "A"} for i in range(n)]


def test_the_planner_uses_the_deployments_evidence_before_any_probe(redis_client: redis.Redis, tmp_path: Path) -> None:
    settings = load_settings({"DISPATCH_HOME": str(tmp_path)})

    def no_probe() -> Speed:
        raise AssertionError("the probe ran although the sends left evidence")

    store = EvidenceStore(redis_client)
    for i, us in enumerate([300.0, 340.0] * MIN_SAMPLES):
        store.record("sms", "twilio", "w-1", _window(us), now=T0 + i)
    clock = Ticking(T0 + 100)
    planner = Planner(redis_client, settings, speed=no_probe, load=lambda: 0.0, clock=clock)
    report = planner.plan(CampaignSpec(id="ev-big", channel="sms", body="Hi"), _rows(3_000))
    p = report.prediction
    evidence = store.read("sms", "twilio")
    assert evidence is not None
    expected = evidence_speed(evidence, batch_api=False)
    assert p["speed_source"] == "evidence" and p["speed_factor"] == pytest.approx(expected.factor, abs=1e-3)
    assert p["speed_spread"] == pytest.approx(expected.spread, abs=1e-3) and p["speed_spread"] > 0.05
    assert p["duration_low_s"] < p["duration_s"] < p["duration_high_s"]
    assert p["finish_low"] == pytest.approx(p["start"] + p["duration_low_s"])
    # stale evidence: the probe is asked again
    asked: list[int] = []

    def probe() -> Speed:
        asked.append(1)
        return Speed(2.0, 320.0, "local", 3, spread=0.1)

    later = Planner(redis_client, settings, speed=probe, load=lambda: 0.0, clock=Ticking(T0 + MAX_AGE_S + 100))
    stale = later.plan(CampaignSpec(id="ev-stale", channel="sms", body="Hi"), _rows(3_000))
    assert asked == [1] and stale.prediction["speed_source"] == "local" and stale.prediction["speed_factor"] == 2.0


# --- the range and the verdict -----------------------------------------------------------------

CPU_BOUND = Capacity(
    processes=2, inflight_per_process=256, latency_s=0.0, provider_rate=None, campaign_rate=None, cores=2
)


def test_the_range_spans_the_speed_spread_and_the_machines_load() -> None:
    n = 100_000
    plain = predict(schedule=[(0.0, n)], cost_units=n, capacity=CPU_BOUND, start=0.0, deadline=None)
    work = plain.duration_s - STARTUP_S
    # without a stated spread or load: the least range either side
    assert plain.duration_low_s == pytest.approx(plain.duration_s * (1 - MIN_RANGE))
    assert plain.duration_high_s == pytest.approx(plain.duration_s * (1 + MIN_RANGE_HIGH))
    spread = predict(
        schedule=[(0.0, n)], cost_units=n, capacity=replace(CPU_BOUND, speed_spread=0.2), start=0.0, deadline=None
    )
    assert spread.duration_s == pytest.approx(plain.duration_s)
    assert spread.duration_high_s - STARTUP_S == pytest.approx(work * 1.2)
    assert spread.duration_low_s - STARTUP_S == pytest.approx(work * 0.8)
    # one core's worth of other work on two cores: the send gets 2 x 2 / (2 + 1) cores; at the
    # slow end the other work grows by half: 2 x 2 / (2 + 1.5)
    busy = predict(
        schedule=[(0.0, n)], cost_units=n, capacity=replace(CPU_BOUND, busy_cores=1.0), start=0.0, deadline=None
    )
    assert busy.duration_s - STARTUP_S == pytest.approx(work * 2 / (4 / 3))
    assert busy.duration_high_s - STARTUP_S == pytest.approx(work * 2 / (4 / 3.5))
    assert busy.duration_low_s == pytest.approx(plain.duration_s)  # the fast end: the load goes away
    assert busy.busy_cores == 1.0


def test_the_verdict_reads_the_range() -> None:
    n = 100_000
    capacity = replace(CPU_BOUND, speed_spread=0.2)

    def verdict(deadline: float) -> tuple[str, str]:
        p = predict(schedule=[(0.0, n)], cost_units=n, capacity=capacity, start=0.0, deadline=deadline)
        return p.verdict, p.advice

    p = predict(schedule=[(0.0, n)], cost_units=n, capacity=capacity, start=0.0, deadline=None)
    assert p.verdict == "no_deadline"
    assert verdict(p.finish_high + 1)[0] == "fits"
    at_risk, advice = verdict((p.finish + p.finish_high) / 2)  # after the point, before the slow end
    assert at_risk == "at_risk" and "inside the predicted range" in advice and "fits by" in advice
    assert verdict((p.finish_low + p.finish) / 2)[0] == "at_risk"
    late, advice = verdict(p.finish_low - 1)
    assert late == "does_not_fit" and "after the deadline" in advice
    # a rate-bound campaign's range is the least one: the limiter decides, not the machine
    limited = predict(
        schedule=[(0.0, 1_000)],
        cost_units=1_000,
        capacity=replace(capacity, provider_rate=100.0, busy_cores=1.0),
        start=0.0,
        deadline=None,
    )
    assert limited.duration_high_s == pytest.approx(limited.duration_s * (1 + MIN_RANGE_HIGH))


def test_flush_publishes_the_last_partial_window(redis_client: redis.Redis) -> None:
    stats, clock, cpu = _stats(redis_client)
    _run(stats, clock, cpu, per_tick=500, cpu_per_answer=300e-6, ticks=2)  # 1 s: no full window yet
    assert stats.published == 0
    stats.flush()
    assert stats.published == 1
    evidence = EvidenceStore(redis_client).read("sms", "twilio")
    assert evidence is not None and evidence.stats["rate"].mean == pytest.approx(1_000.0)


def test_the_plan_report_shows_the_range_and_what_it_rests_on(redis_client: redis.Redis, tmp_path: Path) -> None:
    from dispatch.cli.plan import format_report

    settings = load_settings({"DISPATCH_HOME": str(tmp_path)})
    planner = Planner(redis_client, settings, speed=lambda: Speed(2.0, 320.0, "local", 3, spread=0.1), load=lambda: 0.5)
    report = planner.plan(CampaignSpec(id="ev-report", channel="sms", body="Hi"), _rows(3_000))
    p = report.prediction
    assert p["busy_cores"] == 0.5 and p["speed_source"] == "local" and p["verdict"] == "no_deadline"
    text = format_report(report)
    assert f"range        {p['duration_low_s']:,.0f}-{p['duration_high_s']:,.0f} s (p10-p90;" in text
    assert "a speed probe of this machine, speed spread +-10%, 0.5 cores busy with other work" in text
    assert "finish between" in text


def test_status_shows_the_plans_range_and_whether_the_live_eta_is_inside() -> None:
    from zoneinfo import ZoneInfo

    from dispatch.cli.status import render

    started = 1_764_000_000.0
    body = {
        "campaign_id": "c",
        "state": "running",
        "accepted": 1_000,
        "counters": {"sent": 500, "failed": 0, "suppressed": 0, "skipped": 0},
        "not_sent": 0,
        "pending": 500,
        "live_rate": 50.0,
        "mean_rate": 50.0,
        "started_at": started,
        "predicted_s": 20.0,
        "predicted_finish_low": started + 18.0,
        "predicted_finish_high": started + 25.0,
        "as_of": started + 10.0,
        "eta_s": 10.0,
        "eta_at": started + 20.0,
        "eta_rate": 50.0,
        "eta_source": "before_gap",
    }
    text = render(body, zone=ZoneInfo("UTC"))
    assert "at the rate before the quiet-hours wait (50.0 msg/s) (in 10 s)" in text
    assert "range 2025-11-24T16:00:18+00:00 .. 2025-11-24T16:00:25+00:00 (p10-p90) - live ETA inside" in text
    late = render({**body, "eta_s": 30.0, "eta_at": started + 40.0}, zone=ZoneInfo("UTC"))
    assert "live ETA outside" in late


def test_a_window_with_a_broken_clock_is_dropped_not_raised(redis_client: redis.Redis) -> None:
    stats, clock, _cpu = _stats(redis_client)
    ticks = int(WINDOW_S / 0.5)
    for _ in range(ticks):
        stats.observe("sms", "twilio", math.inf)  # the heartbeat thread must survive it
        for _ in range(MIN_WINDOW_ANSWERS):
            stats.observe("sms", "twilio", 0.004)
        clock.now += 0.5
        stats.tick()
    assert stats.published == 0 and stats.dropped == 1
    assert EvidenceStore(redis_client).read("sms", "twilio") is None
