"""How fast the machines are right now, so that CPU-bound predictions follow them.

The prediction's CPU costs (:mod:`dispatch.prediction`) were measured on one machine at one
moment. A shared VM's speed drifts: on the 2-core machine of BENCHMARKS.md the same Python loop
took 14.5 ms or 30.5 ms a few hundred milliseconds apart, some hours ran 15-20% slower than
others, and one day the whole pipeline ran 2.5x slower than the day before. So the prediction
scales its CPU costs by a *speed factor*: the CPU time a fixed probe (HTTP requests through
aiohttp over loopback TCP, the send path's kind of work) takes now, over the time it took when
the costs were measured (:data:`REFERENCE_PROBE_US`).

The probe samples the machine 40 times, a few milliseconds each, spread over a second, and
averages (a quarter-second probe varied by 11-16% between runs, this one by 5-6%): throughput
follows the mean speed, not the best moment. Workers probe when they start and again every
:data:`REPROBE_EVERY_S`, and publish a running average under their id (:class:`FleetSpeed`); a
planner uses the median of the live workers' figures, or probes its own machine when no worker
runs (a one-machine deployment, or the load test, which plans first), and only for a campaign
whose finish the machine's speed could move (:data:`SPEED_MATTERS_S`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode

import aiohttp
import orjson
import redis
import uvloop
from aiohttp import web

from dispatch import keys

__all__ = [
    "EWMA_WEIGHT",
    "REFERENCE_PROBE_US",
    "REPROBE_EVERY_S",
    "SPEED_MATTERS_S",
    "FleetSpeed",
    "Speed",
    "local_speed",
    "measure_speed",
    "probe_us",
    "speed_factor",
]

log = logging.getLogger("dispatch.calibration")

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
    thread running an event loop.
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(_probe(rounds, gap_s), PROBE_TIMEOUT_S))


def speed_factor(probe: float) -> float:
    """How much more CPU time the work takes now than when the costs were measured (> 1: slower)."""
    low, high = FACTOR_RANGE
    return min(high, max(low, probe / REFERENCE_PROBE_US))


@dataclass(frozen=True)
class Speed:
    """The speed factor a prediction used, and where it came from."""

    factor: float
    probe_us: float | None
    source: Literal["workers", "local", "off"]
    samples: int

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


def local_speed() -> Speed:
    """This machine's speed, probed now (factor 1 and a warning if the probe fails)."""
    try:
        probe = probe_us()
    except (OSError, aiohttp.ClientError) as exc:  # no loopback socket, a stall: predict unscaled
        log.warning("speed probe failed, predicting with the reference machine's speed: %s", exc)
        return Speed.off()
    return Speed(speed_factor(probe), probe, "local", 1)


def measure_speed(client: redis.Redis) -> Speed:
    """The live workers' median speed factor, else this machine's (:func:`local_speed`)."""
    figures = list(FleetSpeed(client).live().values())
    if figures:
        probe = statistics.median(figures)
        speed = Speed(speed_factor(probe), probe, "workers", len(figures))
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
