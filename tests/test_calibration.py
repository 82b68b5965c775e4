"""The machine-speed factor: the probe, the workers' published figures, and what the planner does
with them (the factor's fit to real throughput is a benchmark: BENCHMARKS.md, prediction matrix)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from dispatch.campaign import CampaignSpec
from dispatch.config import Settings, load_settings
from dispatch.plan.calibration import (
    FACTOR_RANGE,
    LOCAL_PROBES,
    MIN_PROBE_SPREAD,
    REFERENCE_PROBE_US,
    FleetSpeed,
    Speed,
    SpeedProbeError,
    measure_speed,
    probe_process,
    probe_us,
    quiet_probe,
    speed_factor,
    spread_of,
)
from dispatch.plan.planner import Planner
from dispatch.plan.prediction import STARTUP_S, Capacity, Prediction, predict
from dispatch.store import keys
from loadtest.cluster import LocalCluster


def test_the_probe_measures_cpu_time_per_request() -> None:
    figure = probe_us(rounds=3, gap_s=0.0)
    assert 5.0 < figure < 100_000.0  # microseconds of CPU for one loopback HTTP request, both sides
    with pytest.raises(ValueError, match="rounds"):
        probe_us(rounds=0)


def test_any_load_is_quiet_at_a_quiet_share_of_one() -> None:
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.3)
        figure = quiet_probe(check_s=0.2, rounds=2, quiet_share=1.0)
        assert figure is not None and 5.0 < figure < 100_000.0
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def test_a_worker_probe_on_a_busy_machine_is_discarded_without_running() -> None:
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])  # one busy process per CPU
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        time.sleep(0.3)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the spinners are not reaped yet
        started = time.monotonic()
        assert quiet_probe(check_s=0.5) is None
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # the probe is a child process that quiet_probe waits for: none was started and reaped
        assert children_after.ru_utime == children_before.ru_utime, "the probe ran although the machine was busy"
        assert time.monotonic() - started < 1.0  # the load check alone (a probe takes over a second)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def test_the_factor_is_the_probe_over_the_reference_and_clipped() -> None:
    assert speed_factor(REFERENCE_PROBE_US) == 1.0
    assert speed_factor(REFERENCE_PROBE_US * 1.5) == pytest.approx(1.5)
    assert speed_factor(REFERENCE_PROBE_US * 100) == FACTOR_RANGE[1]
    assert speed_factor(0.0) == FACTOR_RANGE[0]


def test_only_live_workers_count_and_the_dead_are_pruned(redis_client: redis.Redis) -> None:
    fleet = FleetSpeed(redis_client)
    assert fleet.live() == {}
    for owner, figure in (("w-alive-1", 200.0), ("w-alive-2", 400.0), ("w-alive-3", 260.0), ("w-dead", 9000.0)):
        fleet.publish(owner, figure)
    for owner in ("w-alive-1", "w-alive-2", "w-alive-3"):
        redis_client.set(keys.worker_alive(owner), b"1", px=60_000)
    assert fleet.live() == {"w-alive-1": 200.0, "w-alive-2": 400.0, "w-alive-3": 260.0}
    assert not redis_client.hexists(keys.WORKER_SPEED, "w-dead")
    speed = measure_speed(redis_client)
    assert (speed.source, speed.samples, speed.probe_us) == ("workers", 3, 260.0)  # the median
    assert speed.factor == pytest.approx(260.0 / REFERENCE_PROBE_US)
    fleet.withdraw("w-alive-2")
    assert set(fleet.live()) == {"w-alive-1", "w-alive-3"}


def test_without_workers_the_planner_probes_its_own_machine(redis_client: redis.Redis) -> None:
    speed = measure_speed(redis_client)
    # several probes (LOCAL_PROBES), their median, and a stated spread
    assert speed.source == "local" and speed.samples == LOCAL_PROBES and speed.probe_us is not None
    assert speed.factor == speed_factor(speed.probe_us)
    assert speed.spread >= MIN_PROBE_SPREAD


def test_a_failing_probe_leaves_the_costs_unscaled(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")  # the probe process cannot start
    assert measure_speed(redis_client) == Speed.off()
    assert "speed probe failed" in caplog.text


def test_the_probe_runs_in_its_own_process_and_a_hung_one_is_an_error() -> None:
    figure, child_cpu_s = probe_process(rounds=3)
    assert 5.0 < figure < 100_000.0
    assert child_cpu_s > 0.05  # the interpreter's start and the probe ran in the child, not here
    with pytest.raises(SpeedProbeError, match="speed probe process"):
        probe_process(timeout_s=0.05)


#: Two unlimited workers on two cores with no provider latency: CPU-bound.
TWO_WORKERS = Capacity(
    processes=2, inflight_per_process=256, latency_s=0.0, provider_rate=None, campaign_rate=None, cores=2
)


def _predict(capacity: Capacity, messages: int) -> Prediction:
    return predict(schedule=[(0.0, messages)], cost_units=messages, capacity=capacity, start=0.0, deadline=None)


def test_cpu_costs_scale_with_the_speed_factor() -> None:
    def duration(factor: float) -> float:
        prediction = _predict(replace(TWO_WORKERS, speed_factor=factor), 100_000)
        assert prediction.bottleneck == "cpu" and prediction.speed_factor == factor
        return prediction.duration_s - STARTUP_S

    assert duration(2.0) == pytest.approx(2 * duration(1.0))
    # a rate-bound campaign does not care how fast the machine is
    for factor in (1.0, 3.0):
        prediction = _predict(replace(TWO_WORKERS, provider_rate=100.0, speed_factor=factor), 1000)
        assert prediction.bottleneck == "provider_rate" and prediction.duration_s == pytest.approx(10.2)


def _rows(n: int) -> list[dict[str, str]]:
    return [{"id": str(i), "phone": f"+447400{i:06d}", "first_name": "A"} for i in range(n)]


def test_the_planner_measures_the_speed_only_where_it_moves_the_finish(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    settings = load_settings({"DISPATCH_HOME": str(tmp_path)})
    asked: list[int] = []

    def speed() -> Speed:
        asked.append(1)
        return Speed(2.5, 400.0, "workers", 2)

    planner = Planner(redis_client, settings, speed=speed)
    # ~3,000 CPU-bound messages: about 0.5 s here, 2 s on a machine four times slower
    big = planner.plan(CampaignSpec(id="speed-big", channel="sms", body="Hi"), _rows(3000))
    assert asked == [1] and big.prediction["speed_factor"] == 2.5 and big.prediction["bottleneck"] == "cpu"
    unscaled = Planner(redis_client, replace(settings, cpu_speed_probe=False))
    again = unscaled.plan(CampaignSpec(id="speed-big-2", channel="sms", body="Hi"), _rows(3000))
    assert again.prediction["speed_factor"] == 1.0
    # the CPU costs 2.5x; the batch tails (one provider latency per batch) do not grow
    assert 2.2 < (big.prediction["duration_s"] - 0.2) / (again.prediction["duration_s"] - 0.2) <= 2.5
    # 50 messages, or a provider limit that binds however slow the machine: no probe
    small = planner.plan(CampaignSpec(id="speed-small", channel="sms", body="Hi"), _rows(50))
    limited = Planner(redis_client, replace(settings, sms_rate=100.0), speed=speed)
    capped = limited.plan(CampaignSpec(id="speed-capped", channel="sms", body="Hi"), _rows(3000))
    assert asked == [1] and small.prediction["speed_factor"] == capped.prediction["speed_factor"] == 1.0
    assert planner.capacity(CampaignSpec(id="x", channel="sms", body="Hi"), 1.7).speed_factor == 1.7


def test_a_worker_publishes_its_probe_and_withdraws_it_on_stop(cluster_settings: Settings) -> None:
    # the load reading is an input: with a quiet share of 1 every reading is quiet, so the test
    # does not depend on how busy this machine is (the busy case is the test above)
    settings = replace(cluster_settings, speed_probe_quiet_share=1.0)
    with LocalCluster(settings, workers=1) as cluster:
        assert cluster.target is not None
        client = redis.Redis.from_url(cluster.target.app_url)
        deadline = time.monotonic() + 30
        while not (live := FleetSpeed(client).live()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(live) == 1, "the worker published no speed probe within 30 s"
        assert 5.0 < next(iter(live.values())) < 100_000.0
        assert measure_speed(client).source == "workers"
    assert client.hlen(keys.WORKER_SPEED) == 0
    client.close()


def test_the_spread_of_several_probes_is_half_their_range_over_the_median_with_a_floor() -> None:
    assert spread_of([100.0]) == 0.0  # one figure says nothing of how far off it is
    assert spread_of([100.0, 120.0, 140.0]) == pytest.approx(20.0 / 120.0)
    assert spread_of([100.0, 100.5, 101.0]) == MIN_PROBE_SPREAD  # agreeing by chance is no certainty
