"""How fast the machines are right now, so that CPU-bound predictions follow them.

The prediction's CPU costs (:mod:`dispatch.plan.prediction`) were measured on one machine at one
moment. A shared VM's speed drifts: on the 2-core machine of BENCHMARKS.md the same Python loop
took 14.5 ms or 30.5 ms a few hundred milliseconds apart, some hours ran 15-20% slower than
others, and one day the whole pipeline ran 2.5x slower than the day before. So the prediction
scales its CPU costs by a *speed factor*: the CPU time a fixed probe (HTTP requests through
aiohttp over loopback TCP, the send path's kind of work) takes now, over the time it took when
the costs were measured (:data:`REFERENCE_PROBE_US`).

The probe samples the machine 40 times, a few milliseconds each, spread over a second, and
averages (a quarter-second probe varied by 11-16% between runs, this one by 5-6%): throughput
follows the mean speed, not the best moment. It runs in a fresh process (:func:`probe_process`)
and only while the machine is quiet (:data:`QUIET_SHARE`). Workers probe when they start and again
every :data:`REPROBE_EVERY_S` and publish a running average under their id (:class:`FleetSpeed`);
a planner uses the median of the live workers' figures, or probes its own machine when no worker
runs (a one-machine deployment, or the load test, which plans first), and only for a campaign
whose finish the machine's speed could move (:data:`SPEED_MATTERS_S`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlencode

import aiohttp
import orjson
import redis
import uvloop
from aiohttp import web

from dispatch.errors import DispatchError
from dispatch.store import keys

__all__ = [
    "EWMA_WEIGHT",
    "LOCAL_PROBES",
    "MIN_PROBE_SPREAD",
    "QUIET_RETRY_S",
    "REFERENCE_PROBE_US",
    "REPROBE_EVERY_S",
    "SPEED_MATTERS_S",
    "FleetSpeed",
    "Speed",
    "SpeedProbeError",
    "busy_cores",
    "local_speed",
    "measure_speed",
    "probe_process",
    "probe_us",
    "quiet_probe",
    "speed_factor",
    "spread_of",
]

log = logging.getLogger(__name__)

#: Probe CPU microseconds per request on the machine and at the moment the prediction's CPU costs
#: were fitted (2026-11-25); bridged through the raw ceiling's CPU per message measured beside the
#: probe the next day (BENCHMARKS.md, prediction matrix).
REFERENCE_PROBE_US = 160.0
#: Seconds between a worker's probes; its published figure is a running average (weight of the
#: newest probe: :data:`EWMA_WEIGHT`).
REPROBE_EVERY_S = 30.0
EWMA_WEIGHT = 0.3
#: Speed factors outside this range are clipped (a probe that ran in a stall is no forecast).
FACTOR_RANGE = (0.25, 4.0)
#: Requests of one probe round (sent at once, like a worker's chunk) and rounds of one probe.
_ROUND_REQUESTS = 20
_ROUNDS = 40
_GAP_S = 0.02
#: A probe that has not finished by then raises TimeoutError (a stalled machine is no forecast).
PROBE_TIMEOUT_S = 30.0
#: A worker publishes a probe only from a quiet machine: the rest of the machine used at most this
#: share of all its CPUs over :data:`QUIET_CHECK_S` before the probe and while it ran. A busy
#: machine swells the probe's CPU time (two workers probing beside an audience being generated
#: published factors of 1.23 and 1.42 where the planner's probe on the quiet machine gave 0.96-1.0),
#: and a probe inside a sending worker takes the GIL from its sends (email 300k with 2 workers:
#: 67-69k recipients/s with those probes, 74-75k without; 2026-11-26). A busy worker retries
#: every :data:`QUIET_RETRY_S` and keeps its last figure meanwhile.
QUIET_SHARE = 0.25
QUIET_CHECK_S = 0.5
QUIET_RETRY_S = 5.0
#: A planner probing its own machine waits this many checks at most for a quiet moment (the
#: load test's plan came right after the snapshot's writes, while Redis was still persisting it:
#: factors of 1.16-1.30 where the same machine, quiet, gave 0.93-1.0).
LOCAL_QUIET_TRIES = 4
#: Probes a planner runs on its own machine; their median is the figure and their range the
#: spread (one probe of a shared VM is noise: 11-16% apart between runs of the same machine).
LOCAL_PROBES = 3
#: Least relative spread stated for a probed figure (three probes can agree by chance).
MIN_PROBE_SPREAD = 0.05
#: A planner measures the speed only when a machine :data:`FACTOR_RANGE`'s top times slower
#: would move the campaign's finish by at least this much (rate-bound and small campaigns: never).
SPEED_MATTERS_S = 1.0


async def _answer(request: web.Request) -> web.Response:
    form = await request.post()
    reply = {"sid": f"SM{hashlib.sha256(str(form.get('To')).encode()).hexdigest()[:32]}", "status": "queued"}
    return web.Response(body=orjson.dumps(reply), content_type="application/json")


async def _probe(rounds: int, gap_s: float) -> float:
    app = web.Application()
    app.router.add_post("/probe", _answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/probe"
        async with aiohttp.ClientSession() as session:

            async def send(i: int) -> None:
                form = {"To": f"+1555{i:07d}", "From": "+15550100", "Body": f"Hi Ada, your code is {i}"}
                async with session.post(url, data=urlencode(form)) as response:
                    orjson.loads(await response.read())

            await asyncio.gather(*(send(i) for i in range(_ROUND_REQUESTS)))  # warm: connections open
            times = []
            for _ in range(rounds):
                await asyncio.sleep(gap_s)
                started = time.thread_time()
                await asyncio.gather(*(send(i) for i in range(_ROUND_REQUESTS)))
                times.append((time.thread_time() - started) / _ROUND_REQUESTS)
    finally:
        await runner.cleanup()
    return statistics.fmean(times) * 1e6


def probe_us(rounds: int = _ROUNDS, gap_s: float = _GAP_S) -> float:
    """Mean thread CPU microseconds of one HTTP request, client and server side, over loopback
    TCP in this thread (its own event loop): ``rounds`` rounds of 20 requests ``gap_s`` apart
    (about a second by default).

    The send path is that kind of work (aiohttp, the kernel's TCP, JSON, forms), and so is the
    local mock provider's; a VM's slow hours slow it more than pure Python arithmetic. Thread CPU
    time leaves out the time other threads and processes held the core. Must not be called from a
    thread running an event loop; the planner and workers call it through :func:`probe_process`.
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(_probe(rounds, gap_s), PROBE_TIMEOUT_S))


class SpeedProbeError(DispatchError):
    """The probe process failed, hung past :data:`PROBE_TIMEOUT_S` or printed no figure."""


def probe_process(timeout_s: float = PROBE_TIMEOUT_S, *, rounds: int = _ROUNDS) -> tuple[float, float]:
    """(:func:`probe_us`, CPU seconds the probe's process used) from a fresh Python process.

    Not in the caller's process: in the planner's, right after a scan, the same probe read
    150-234 us while fresh processes around it read 157-165 (the heap and allocator state a scan
    leaves behind), and in a worker's it takes the GIL from the sends.
    """
    root = str(Path(__file__).resolve().parents[1])
    code = f"import sys; sys.path.insert(0, {root!r}); from dispatch.plan.calibration import probe_us; "
    code += f"print(probe_us({rounds}))"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(  # our own interpreter and module
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SpeedProbeError(f"speed probe process: {exc}") from exc
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        figure = float(done.stdout.strip())
    except ValueError:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise SpeedProbeError(f"speed probe process printed no figure: {tail[0]}") from None
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return figure, used


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all the machine's CPUs since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat", "rb") as handle:
            fields = [int(x) for x in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    total = sum(fields)  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - fields[3] - fields[4], total


def _busy_share(before: tuple[int, int], after: tuple[int, int], own_ticks: float = 0.0) -> float:
    busy, total = after[0] - before[0] - own_ticks, after[1] - before[1]
    return max(0.0, busy) / total if total > 0 else 0.0


def quiet_probe(
    check_s: float = QUIET_CHECK_S, *, rounds: int = _ROUNDS, quiet_share: float = QUIET_SHARE
) -> float | None:
    """:func:`probe_process`'s figure if the rest of the machine stays under ``quiet_share`` of
    its CPUs for ``check_s`` before the probe and while it runs; None (having spent at most
    ``check_s`` of sleep if already busy) otherwise. Where the load cannot be read, it probes.
    ``quiet_share`` is the worker's ``speed_probe_quiet_share`` setting (1: any load is quiet)."""
    first = _cpu_ticks()
    if first is None:
        return probe_process(rounds=rounds)[0]
    time.sleep(check_s)
    before = _cpu_ticks()
    if before is None or _busy_share(first, before) > quiet_share:
        return None
    figure, own_s = probe_process(rounds=rounds)
    own_ticks = own_s * os.sysconf("SC_CLK_TCK")
    after = _cpu_ticks()
    if after is None or _busy_share(before, after, own_ticks) > quiet_share:
        return None
    return figure


#: Load samples a planner takes (each :data:`LOAD_SAMPLE_S` long); their median is its figure.
LOAD_SAMPLES = 3
LOAD_SAMPLE_S = 0.3


def busy_cores(samples: int = LOAD_SAMPLES, sample_s: float = LOAD_SAMPLE_S) -> float:
    """Cores' worth of CPU the machine's other processes use now (the median of ``samples``
    readings of /proc/stat, ``sample_s`` each; the caller sleeps meanwhile). 0 where it cannot be read."""
    cores = os.cpu_count() or 1
    readings = []
    for _ in range(max(1, samples)):
        before = _cpu_ticks()
        time.sleep(sample_s)
        after = _cpu_ticks()
        if before is None or after is None:
            return 0.0
        readings.append(_busy_share(before, after) * cores)
    return statistics.median(readings)


def speed_factor(probe: float) -> float:
    """How much more CPU time the work takes now than when the costs were measured (> 1: slower)."""
    low, high = FACTOR_RANGE
    return min(high, max(low, probe / REFERENCE_PROBE_US))


@dataclass(frozen=True)
class Speed:
    """The speed factor a prediction used, where it came from, and how sure it is: ``spread`` is
    the relative half-width of its 10th-90th percentile range (0.1: the factor may be 10% lower
    or higher), which widens the plan's range (:mod:`dispatch.plan.prediction`)."""

    factor: float
    probe_us: float | None
    source: Literal["evidence", "workers", "local", "off"]
    samples: int
    spread: float = 0.0

    @classmethod
    def off(cls) -> Speed:
        return cls(1.0, None, "off", 0)


class FleetSpeed:
    """The workers' published probe figures (a hash in the application database: id -> us)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def publish(self, owner: str, probe: float) -> None:
        self._client.hset(keys.WORKER_SPEED, owner, f"{probe:.1f}")

    def withdraw(self, owner: str) -> None:
        self._client.hdel(keys.WORKER_SPEED, owner)

    def live(self) -> dict[str, float]:
        """Figures of the workers whose liveness key exists; the others' fields are removed."""
        raw: dict[bytes, bytes] = self._client.hgetall(keys.WORKER_SPEED)  # type: ignore[assignment]
        published = {k.decode(): float(v) for k, v in raw.items()}
        if not published:
            return {}
        owners = list(published)
        with self._client.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.exists(keys.worker_alive(owner))
            alive = pipe.execute()
        live = {owner: published[owner] for owner, exists in zip(owners, alive, strict=True) if exists}
        if len(live) < len(published):
            self._client.hdel(keys.WORKER_SPEED, *(set(published) - set(live)))
        return live


def _one_local_probe(quiet_tries: int) -> float:
    probe = None
    for _ in range(quiet_tries):
        if (probe := quiet_probe()) is not None:
            break
    if probe is None:
        log.info("machine busy through %d load checks: probing anyway (the factor may overstate)", quiet_tries)
        probe = probe_process()[0]
    return probe


def spread_of(figures: list[float]) -> float:
    """Relative spread of several figures of one quantity: half their range over their median,
    at least :data:`MIN_PROBE_SPREAD` (0 for a single figure: nothing says how far off it is)."""
    if len(figures) < 2:
        return 0.0
    middle = statistics.median(figures)
    return max(MIN_PROBE_SPREAD, (max(figures) - min(figures)) / 2 / middle) if middle > 0 else 0.0


def local_speed(quiet_tries: int = LOCAL_QUIET_TRIES, probes: int = LOCAL_PROBES) -> Speed:
    """This machine's speed, probed now ``probes`` times (each at a quiet moment if one comes
    within ``quiet_tries`` checks, :func:`quiet_probe`, else as busy as it is): the median, and the
    spread of the figures (:func:`spread_of`). Factor 1 and a warning if the probe fails."""
    try:
        figures = [_one_local_probe(quiet_tries) for _ in range(max(1, probes))]
    except SpeedProbeError as exc:  # no loopback socket, a stall: predict unscaled
        log.warning("speed probe failed, predicting with the reference machine's speed: %s", exc)
        return Speed.off()
    probe = statistics.median(figures)
    return Speed(speed_factor(probe), probe, "local", len(figures), spread=spread_of(figures))


def measure_speed(client: redis.Redis) -> Speed:
    """The live workers' median speed factor, else this machine's (:func:`local_speed`)."""
    figures = list(FleetSpeed(client).live().values())
    if figures:
        probe = statistics.median(figures)
        speed = Speed(speed_factor(probe), probe, "workers", len(figures), spread=spread_of(figures))
    else:
        speed = local_speed()
    if speed.probe_us is not None:
        log.info(
            "CPU costs scaled by speed factor %.2f (probe %.0f us, %s, %d figure(s))",
            speed.factor,
            speed.probe_us,
            speed.source,
            speed.samples,
        )
    return speed
