"""``dispatch status``: counters that add up in every state, the live rate, the human view, --watch.

Every accepted message is in exactly one part: accepted = sent + failed + not_sent + pending.
A cancel used to break that (``not_sent`` was ``accepted - sent``, so failed, suppressed and
skipped messages were counted twice beside ``done``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
import redis

from dispatch.campaign import CampaignSpec
from dispatch.cli import main as cli_main
from dispatch.cli.status import reader_zone, render, watch
from dispatch.config import Settings, load_settings
from dispatch.plan.planner import Planner
from dispatch.send.broker import build_broker, enqueue_batch
from dispatch.send.control import LIVE_WINDOW_S, CampaignControl, live_rate
from dispatch.send.tracking import campaign_counters, iter_outcomes
from dispatch.store import keys
from loadtest.audience import generate_rows
from loadtest.cluster import LocalCluster


def _sums(status: Mapping[str, Any]) -> bool:
    counters = status["counters"]
    parts = counters["sent"] + counters["failed"] + status["not_sent"] + status["pending"]
    return parts == status["accepted"] and status["done"] == status["accepted"] - status["pending"]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _plan(client: redis.Redis, tmp_path: Path, cid: str, count: int) -> int:
    settings = load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_BATCH_SIZE": "50"})
    spec = CampaignSpec(id=cid, channel="sms", body="Hi $first_name")
    return Planner(client, settings).plan(spec, generate_rows(count, seed=5)).accepted


def _count(client: redis.Redis, cid: str, **values: int) -> None:
    client.hset(keys.counters(cid), mapping={k: v for k, v in values.items()})  # type: ignore[arg-type]


# --- the four parts, in every state ----------------------------------------------------------


def test_counters_add_up_in_every_state(redis_client: redis.Redis, tmp_path: Path) -> None:
    accepted = _plan(redis_client, tmp_path, "st-sum", 300)
    clock = Clock(1_000_000.0)
    control = CampaignControl(redis_client, lambda *_: None, clock=clock)

    planned = control.status("st-sum").as_dict()
    assert planned["pending"] == accepted and planned["not_sent"] == 0 and _sums(planned)

    control.start("st-sum")
    clock.now += 10
    _count(redis_client, "st-sum", sent=100, failed=20, suppressed=5, skipped=7, delivered=60, retries=9)
    running = control.status("st-sum").as_dict()
    assert running["state"] == "running" and _sums(running)
    assert running["not_sent"] == 12 and running["pending"] == accepted - 132

    control.pause("st-sum")
    paused = control.status("st-sum").as_dict()
    assert paused["state"] == "paused" and _sums(paused) and paused["eta_s"] is None

    control.resume("st-sum")
    clock.now += 5
    control.cancel("st-sum")
    cancelled = control.status("st-sum")
    body = cancelled.as_dict()
    # the messages the cancel stopped before any claim have no counter: they are not sent, and
    # nothing is pending any more
    assert body["state"] == "cancelled" and _sums(body)
    assert body["pending"] == 0 and body["not_sent"] == accepted - 120 and body["done"] == accepted
    assert not cancelled.complete and body["ended_at"] == pytest.approx(clock.now)
    # a message in flight at the cancel that its provider then accepts moves from not sent to sent
    _count(redis_client, "st-sum", sent=101)
    later = control.status("st-sum").as_dict()
    assert _sums(later) and later["not_sent"] == body["not_sent"] - 1

    other = _plan(redis_client, tmp_path, "st-done", 120)
    control.start("st-done")
    _count(redis_client, "st-done", sent=other - 4, failed=1, suppressed=2, skipped=1)
    completed = control.status("st-done")
    assert completed.state == "completed" and completed.complete and _sums(completed.as_dict())
    assert completed.pending == 0 and completed.not_sent == 3


def test_a_triggered_count_keeps_the_parts_adding_up(redis_client: redis.Redis, tmp_path: Path) -> None:
    _plan(redis_client, tmp_path, "st-trig", 50)
    control = CampaignControl(redis_client, lambda *_: None)
    control.start("st-trig")
    _count(redis_client, "st-trig", sent=3, failed=1, suppressed=1)
    status = control.status("st-trig").with_accepted(40).as_dict()
    assert status["accepted"] == 40 and status["pending"] == 35 and _sums(status)


# --- rates and estimates ---------------------------------------------------------------------


def test_live_rate_spans_the_last_seconds_of_samples() -> None:
    samples = [(100.0, 0), (104.0, 100), (108.0, 300), (112.0, 700)]
    # oldest sample inside the window [102, 111]: t=104 -> (900 - 100) / 10
    assert live_rate(samples, 114.0, 900) == pytest.approx(80.0)
    assert live_rate([(100.0, 0), (112.0, 700)], 112.5, 700) is None  # the only recent sample is < 1 s old
    assert live_rate([(50.0, 0)], 50.0 + LIVE_WINDOW_S + 5, 10) is None  # nothing recent
    assert live_rate([(10.0, 5), (12.0, 5)], 13.0, 5) == 0.0  # stalled


def test_status_keeps_a_bounded_ring_of_samples_that_expires_with_the_campaign(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    accepted = _plan(redis_client, tmp_path, "st-rate", 400)
    clock = Clock(2_000_000.0)
    control = CampaignControl(redis_client, lambda *_: None, clock=clock)
    control.start("st-rate")
    for second in range(1, 21):  # 5 messages a second, then 20 a second from t=10
        clock.now += 1
        done = 5 * second if second <= 10 else 50 + 20 * (second - 10)
        _count(redis_client, "st-rate", sent=done)
        status = control.status("st-rate")
        control.status("st-rate")  # a second reader within the second adds no sample
    assert accepted > 250 and status.state == "running"
    assert status.live_rate == pytest.approx(20.0)  # the last 10 s, not the mean
    assert status.mean_rate == pytest.approx(250 / 20)
    assert status.current_rate == status.live_rate
    assert status.eta_s == pytest.approx((accepted - 250) / 20.0)
    assert status.eta_at == pytest.approx(clock.now + status.eta_s)
    ring = redis_client.lrange(keys.progress("st-rate"), 0, -1)
    assert len(ring) == 20  # one a second, whoever reads
    manifest_ttl = redis_client.pttl(keys.manifest("st-rate"))
    assert manifest_ttl > 0 and 0 < redis_client.pttl(keys.progress("st-rate")) <= manifest_ttl
    for _ in range(100):
        clock.now += 1
        control.status("st-rate")
    assert redis_client.llen(keys.progress("st-rate")) == 64  # bounded


# --- the human view --------------------------------------------------------------------------


def _body(**changes: Any) -> dict[str, Any]:
    started = 1_764_000_000.0
    body: dict[str, Any] = {
        "campaign_id": "spring",
        "state": "running",
        "accepted": 3000,
        "done": 1000,
        "not_sent": 40,
        "pending": 2000,
        "counters": {"sent": 900, "failed": 60, "suppressed": 30, "skipped": 10, "retries": 5},
        "rate": 100.0,
        "current_rate": 50.0,
        "live_rate": 50.0,
        "mean_rate": 90.0,
        "eta_s": 40.0,
        "eta_at": started + 60 + 40,
        "predicted_s": 30.0,
        "predicted_finish": started + 30,
        "deadline": None,
        "started_at": started,
        "ended_at": None,
        "as_of": started + 60,
    }
    body.update(changes)
    return body


def test_render_shows_zoned_times_a_bar_rates_and_parts_that_add_up() -> None:
    text = render(_body(), zone=ZoneInfo("Asia/Shanghai"))
    assert "3,000 accepted = 900 sent + 60 failed + 40 not sent + 2,000 pending" in text
    assert "30 suppressed, 10 skipped" in text
    assert "[#############" in text and "33.3%" in text
    assert "now 50.0 msg/s (last 10 s), mean 90.0 msg/s, cap 100.0 msg/s" in text
    assert "started   2025-11-25T00:00:00+08:00" in text  # no epoch float anywhere
    assert "1764000000" not in text
    assert "2025-11-25T00:01:40+08:00 at the current rate (in 40 s)" in text
    assert "predicted 2025-11-25T00:00:30+08:00" in text
    assert "running 233% slower than predicted" in text  # 100 s against 30 s
    utc = render(_body(), zone=reader_zone(utc=True, environ={"TZ": "Asia/Shanghai"}))
    assert "started   2025-11-24T16:00:00+00:00" in utc


def test_render_says_nothing_about_the_prediction_within_20_percent() -> None:
    text = render(_body(eta_s=15.0, eta_at=1_764_000_000.0 + 35), zone=ZoneInfo("UTC"))
    assert "slower" not in text and "faster" not in text


def test_render_of_a_cancelled_campaign_names_what_the_cancel_stopped() -> None:
    body = _body(state="cancelled", not_sent=2040, pending=0, done=3000, ended_at=1_764_000_090.0, eta_s=None)
    text = render(body, zone=ZoneInfo("UTC"))
    assert "3,000 accepted = 900 sent + 60 failed + 2,040 not sent" in text
    assert "2,000 cancelled before sending" in text
    assert "ended     2025-11-24T16:01:30+00:00 after 1 min 30 s" in text


def test_reader_zone_follows_tz() -> None:
    assert reader_zone(utc=False, environ={"TZ": "Europe/Paris"}) == ZoneInfo("Europe/Paris")
    assert reader_zone(utc=True, environ={"TZ": "Europe/Paris"}).utcoffset(None).total_seconds() == 0  # type: ignore[union-attr]


def test_watch_redraws_until_the_campaign_ends_at_most_once_a_second() -> None:
    states = iter(["running", "paused", "running", "completed"])
    shown: list[str] = []
    slept: list[float] = []
    assert (
        watch(lambda: {"state": next(states)}, lambda s: shown.append(s["state"]), interval=0.1, sleep=slept.append)
        == 0
    )
    assert shown == ["running", "paused", "running", "completed"]
    assert slept == [1.0, 1.0, 1.0]  # asked for 0.1 s: never more than once a second

    def interrupted(_: float) -> None:
        raise KeyboardInterrupt

    assert watch(lambda: {"state": "running"}, lambda s: None, interval=3, sleep=interrupted) == 0


def test_status_command_human_json_and_watch(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCH_REDIS_URL", redis_url)
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path))
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    client = redis.Redis.from_url(redis_url)
    accepted = _plan(client, tmp_path, "st-cli", 100)
    control = CampaignControl(client, lambda *_: None)
    control.start("st-cli")
    _count(client, "st-cli", sent=10, failed=2)
    assert cli_main(["status", "st-cli"]) == 0
    text = capsys.readouterr().out
    assert f"{accepted:,} accepted = 10 sent + 2 failed + 0 not sent + {accepted - 12:,} pending" in text
    assert "+05:30" in text
    assert cli_main(["status", "st-cli", "--utc"]) == 0
    assert "+00:00" in capsys.readouterr().out
    assert cli_main(["status", "st-cli", "--json"]) == 0
    body = orjson.loads(capsys.readouterr().out)
    assert {"done", "not_sent", "counters", "current_rate", "eta_s", "predicted_s", "started_at"} <= set(body)
    assert isinstance(body["started_at"], float) and _sums(body)
    control.cancel("st-cli")
    # an ended campaign: one frame, then --watch returns by itself
    assert cli_main(["status", "st-cli", "--watch", "1", "--json"]) == 0
    frames = capsys.readouterr().out.strip().splitlines()
    assert len(frames) == 1 and orjson.loads(frames[0])["state"] == "cancelled"
    with pytest.raises(SystemExit):
        cli_main(["status", "st-cli", "--watch", "0"])
    assert "above 0" in capsys.readouterr().err
    client.close()


# --- a real campaign cancelled mid-send ------------------------------------------------------


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _settled(read: Callable[[], dict[str, int]], *, quiet_s: float, within_s: float) -> dict[str, int]:
    """Poll until the counters have not moved for ``quiet_s``."""
    deadline = time.monotonic() + within_s
    value, since = read(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"counters still moving after {within_s} s"
        time.sleep(0.1)
        if (now := read()) != value:
            value, since = now, time.monotonic()
    return value


def test_cancel_mid_send_keeps_the_counters_adding_up(cluster_settings: Settings) -> None:
    """Real workers, a mock provider failing some sends for good: running, paused and cancelled
    statuses all add up, and the cancelled one agrees with the per-message records."""
    # trouble dead-lettered after one attempt (no retry horizon): the failures this test needs
    settings = replace(cluster_settings, max_attempts=1, retry_horizon_s=0)
    cid = "st-e2e-cancel"
    rows = list(generate_rows(3000, seed=21))
    spec = CampaignSpec(id=cid, channel="sms", body="Hello $first_name", rate=150.0)  # ~20 s: cancelled long before
    with LocalCluster(settings, workers=2, mock_args=["--faults", '{"p_500": 0.15}']) as cluster:
        assert cluster.target is not None
        client = redis.Redis.from_url(cluster.target.app_url)
        broker = build_broker(settings, cluster.target.broker_url)
        try:
            plan = Planner(client, settings).plan(spec, rows)
            control = CampaignControl(client, lambda c, n, d: enqueue_batch(broker, c, n, d))
            control.start(cid)
            _wait_for(lambda: campaign_counters(client, cid)["sent"] >= 300, 90, "300 messages sent")
            running = control.status(cid).as_dict()
            assert running["state"] == "running" and _sums(running) and running["pending"] > 0
            assert running["counters"]["failed"] > 0, "the mock failed none: the test proves less"
            control.pause(cid)
            _settled(lambda: campaign_counters(client, cid), quiet_s=2.0, within_s=60)
            paused = control.status(cid).as_dict()
            assert paused["state"] == "paused" and _sums(paused)
            control.resume(cid)
            _wait_for(lambda: campaign_counters(client, cid)["sent"] >= paused["counters"]["sent"] + 150, 60, "resume")
            control.cancel(cid)
            counters = _settled(lambda: campaign_counters(client, cid), quiet_s=2.0, within_s=60)
            cancelled = control.status(cid).as_dict()
            outcomes = [r.state for r in iter_outcomes(client, cid, plan.batches, cancelled=True)]
            stats = cluster.mock_stats()
        finally:
            broker.close()
            client.close()
    assert cancelled["state"] == "cancelled" and cancelled["counters"] == counters
    assert _sums(cancelled) and cancelled["pending"] == 0
    sent, failed = counters["sent"], counters["failed"]
    assert 0 < sent < plan.accepted and failed > 0 and cancelled["not_sent"] > 0
    # the parts are the per-message records' own: one outcome each, as the export shows them
    assert len(outcomes) == plan.accepted
    assert outcomes.count("sent") == sent and outcomes.count("failed") == failed
    assert len(outcomes) - sent - failed == cancelled["not_sent"]
    assert stats["accepted"] == sent and stats["duplicates"] == 0


# --- the machine's measured speed against the plan's (issue 19) ---------------------------------


def test_status_reports_the_plans_speed_factor_and_the_workers_now(redis_client: redis.Redis, tmp_path: Path) -> None:
    from dispatch.plan.calibration import REFERENCE_PROBE_US, FleetSpeed, Speed

    settings = load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_BATCH_SIZE": "50"})
    spec = CampaignSpec(id="st-speed", channel="sms", body="Hi $first_name")
    # a plan big enough that the machine's speed moves its finish: the planner asks for the factor
    Planner(redis_client, settings, speed=lambda: Speed(1.2, 192.0, "workers", 1)).plan(
        spec, generate_rows(5000, seed=5)
    )
    control = CampaignControl(redis_client, lambda *_: None, clock=Clock(1_000_000.0))
    assert control.status("st-speed").speed_factor_plan == 1.2
    control.start("st-speed")
    assert control.status("st-speed").speed_factor_now is None  # no worker has measured yet
    FleetSpeed(redis_client).publish("w-1", REFERENCE_PROBE_US * 1.8)
    redis_client.set(keys.worker_alive("w-1"), b"1", px=60_000)
    status = control.status("st-speed")
    assert status.speed_factor_now == pytest.approx(1.8) and status.speed_change == pytest.approx(0.5)
    body = status.as_dict()
    assert (body["speed_factor_plan"], body["speed_factor_now"]) == (1.2, 1.8)
    assert "this machine 50% slower than when the campaign was planned (speed factor 1.20 -> 1.80)" in render(
        body, zone=ZoneInfo("UTC")
    )


def test_render_is_silent_about_a_speed_change_within_20_percent() -> None:
    text = render(_body(speed_factor_plan=1.2, speed_factor_now=1.3), zone=ZoneInfo("UTC"))
    assert "measure this machine" not in text
    faster = render(_body(speed_factor_plan=2.0, speed_factor_now=1.0), zone=ZoneInfo("UTC"))
    assert "measure this machine 50% faster" in faster


def test_render_says_what_a_campaign_waits_for_and_why_it_was_paused() -> None:
    waiting = "provider twilio (breaker open since 2026-12-03T20:53:48Z: twilio 20503: error)"
    text = render(_body(waiting_for=waiting), zone=ZoneInfo("UTC"))
    assert f"waiting   for {waiting}" in text
    reason = "provider twilio refused the account: twilio 20003: authentication failed"
    paused = render(_body(state="paused", pause_reason=reason), zone=ZoneInfo("UTC"))
    assert f"paused    {reason} (fix it, then: dispatch resume)" in paused
    assert "waiting" not in render(_body(), zone=ZoneInfo("UTC"))
