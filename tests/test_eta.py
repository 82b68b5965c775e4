"""The live ETA (dispatch.send.eta): synthetic progress histories on an injected clock, quiet-hour
gaps, the rate cap, stalls; and through CampaignControl.status with the progress ring in Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from dispatch.campaign import CampaignSpec
from dispatch.config import load_settings
from dispatch.plan.planner import Planner
from dispatch.send.control import CampaignControl
from dispatch.send.eta import ETA_WINDOW_S, RAMP_S, live_eta, window_rate
from dispatch.store import keys
from loadtest.audience import generate_rows

T0 = 1_800_000_000.0


def _history(rate: float, seconds: int, *, start: float = T0, done: int = 0) -> list[tuple[float, int]]:
    """One sample a second at ``rate`` messages per second."""
    return [(start + s, done + int(rate * s)) for s in range(seconds + 1)]


def test_steady_progress_gives_remaining_over_the_window_rate() -> None:
    samples = _history(250.0, 30)
    now, done = T0 + 30, 7_500
    eta = live_eta(now=now, done=done, pending=12_500, samples=samples[:-1])
    assert eta.source == "live" and eta.rate == pytest.approx(250.0)
    assert eta.eta_s == pytest.approx(50.0)


def test_the_window_follows_a_change_of_speed_not_the_mean() -> None:
    # 100 msg/s for a minute, then the machine got busy: 40 msg/s for 15 s
    slow_from = T0 + 60
    samples = _history(100.0, 60) + [(slow_from + s, 6_000 + 40 * s) for s in range(1, 15)]
    now = slow_from + 15
    eta = live_eta(now=now, done=6_600, pending=4_000, samples=samples)
    assert eta.rate == pytest.approx(40.0)
    assert eta.eta_s == pytest.approx(100.0)


def test_window_rate_is_a_least_squares_slope_over_the_window_only() -> None:
    # steps of 500 every 2 s (batches finishing at once) average to 250/s
    samples = [(T0 + s, 500 * (s // 2)) for s in range(40)]
    rate = window_rate(samples, T0 + 40, 10_000)
    assert rate == pytest.approx(250.0, rel=0.1)
    assert window_rate([(T0, 0)], T0 + 0.5, 10) is None  # less than a second of samples
    assert window_rate([(T0 - 100, 0)], T0, 10) is None  # nothing inside the window
    assert ETA_WINDOW_S == 10.0


def test_quiet_hour_gap_is_waited_for_then_sent_at_the_measured_rate() -> None:
    # 10,000 now at 200/s; 6,000 held until 1 hour from now
    samples = _history(200.0, 20)
    now = T0 + 20
    opens = now + 3_600
    eta = live_eta(now=now, done=4_000, pending=12_000, samples=samples[:-1], schedule=[(opens, 6_000)])
    # 6,000 due now: 30 s; then the wait; then 6,000 at 200/s: 30 s
    assert eta.eta_s == pytest.approx(3_600 + 30.0)
    assert eta.source == "live"


def test_during_the_gap_the_rate_before_it_is_used_not_zero() -> None:
    # sent 10,000 at 200/s from T0 to T0+50; nothing since (waiting for the 6,000 held to T0+3,600)
    samples = _history(200.0, 50) + [(T0 + 50 + s, 10_000) for s in range(1, 30)]
    now = T0 + 80
    opens = T0 + 3_600
    eta = live_eta(now=now, done=10_000, pending=6_000, samples=samples, schedule=[(opens, 6_000)], plan_rate=999.0)
    assert eta.source == "before_gap" and eta.rate == pytest.approx(200.0)
    assert eta.eta_s == pytest.approx(opens - now + 30.0)


def test_without_any_measurement_the_plans_rate_is_used() -> None:
    eta = live_eta(now=T0 + 0.4, done=0, pending=5_000, samples=[(T0, 0)], plan_rate=1_000.0)
    assert eta.source == "plan" and eta.eta_s == pytest.approx(5.0)
    assert live_eta(now=T0, done=0, pending=5_000, samples=[]).eta_s is None  # no plan rate either


def test_a_stall_with_work_due_is_unknown_not_a_guess() -> None:
    samples = [(T0 + s, 3_000) for s in range(15)]
    eta = live_eta(now=T0 + 15, done=3_000, pending=2_000, samples=samples, plan_rate=1_000.0)
    assert eta.eta_s is None and eta.source == "none"
    # a start-up with nothing finished yet within half a window is not a stall: the plan's rate
    early = live_eta(now=T0 + 2, done=0, pending=2_000, samples=[(T0, 0), (T0 + 1, 0)], plan_rate=1_000.0)
    assert early.source == "plan" and early.eta_s == pytest.approx(2.0)


def test_the_rate_cap_bounds_the_rate_even_when_it_was_lowered_after_the_measurement() -> None:
    samples = _history(500.0, 15)
    now = T0 + 15
    uncapped = live_eta(now=now, done=7_500, pending=10_000, samples=samples[:-1])
    assert uncapped.eta_s == pytest.approx(20.0)
    capped = live_eta(now=now, done=7_500, pending=10_000, samples=samples[:-1], rate_cap=100.0)
    assert capped.rate == pytest.approx(100.0) and capped.eta_s == pytest.approx(100.0)


def test_a_finished_campaign_has_no_time_left() -> None:
    assert live_eta(now=T0, done=10, pending=0, samples=[]).eta_s == 0.0


def test_held_groups_partly_sent_early_count_only_what_is_pending() -> None:
    # pending (1,000) is less than the held group (3,000): only 1,000 remain after the wait
    samples = _history(100.0, 12)
    eta = live_eta(now=T0 + 12, done=1_200, pending=1_000, samples=samples[:-1], schedule=[(T0 + 100, 3_000)])
    assert eta.eta_s == pytest.approx(100 - 12 + 10.0)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_status_reports_the_live_eta_and_the_rate_cap_from_the_ring(redis_client: redis.Redis, tmp_path: Path) -> None:
    settings = load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_BATCH_SIZE": "50"})
    spec = CampaignSpec(id="eta-live", channel="sms", body="Hi $first_name")
    accepted = Planner(redis_client, settings).plan(spec, generate_rows(600, seed=5)).accepted
    clock = Clock(T0)
    control = CampaignControl(redis_client, lambda *_: None, clock=clock)
    control.start("eta-live")
    for second in range(1, 13):  # 10 messages a second
        clock.now += 1
        redis_client.hset(keys.counters("eta-live"), "sent", 10 * second)
        status = control.status("eta-live")
    assert status.eta_source == "live" and status.eta_rate == pytest.approx(10.0)
    assert status.eta_s == pytest.approx((accepted - 120) / 10.0)
    body = status.as_dict()
    assert body["eta_source"] == "live" and body["eta_rate"] == pytest.approx(10.0)
    control.set_rate("eta-live", 4.0)  # lowered: the ETA follows the cap at once
    clock.now += 0.2
    capped = control.status("eta-live")
    assert capped.eta_rate == pytest.approx(4.0) and capped.eta_s == pytest.approx((accepted - 120) / 4.0)


def test_the_first_seconds_leave_out_the_flat_start_and_blend_towards_the_plan() -> None:
    # 3 s of start-up without an outcome, then 400/s
    samples = [(T0 + s, 0) for s in range(4)] + [(T0 + 4, 400)]
    now = T0 + 4.5
    rate = window_rate(samples, now, 600)
    assert rate == pytest.approx(400.0, rel=0.01)  # the flat start does not drag it down
    eta = live_eta(now=now, done=600, pending=9_400, samples=samples, plan_rate=200.0)
    weight = (now - (T0 + 3)) / RAMP_S  # 1.5 s of progress out of the ramp's 2
    assert eta.source == "ramp" and eta.rate == pytest.approx(weight * rate + (1 - weight) * 200.0)
    later = [*samples, *((T0 + 4 + s, 400 + 400 * s) for s in range(1, 7))]
    steady = live_eta(now=T0 + 11, done=3_200, pending=6_800, samples=later, plan_rate=200.0)
    assert steady.source == "live" and steady.rate == pytest.approx(400.0, rel=0.01)
