"""``dispatch worker``: one dramatiq worker process running the send path.

Scale out by starting more of these, on any machine that reaches the same Redis.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from dispatch.config import Settings
from dispatch.send.broker import ACTOR_NAME, QUEUE, build_broker, enqueue_batch
from dispatch.send.retry import RetryPolicy
from dispatch.send.runtime import WorkerRuntime
from dispatch.store.connect import resolve_redis
from ratelimit import BackendUnavailable

__all__ = ["declare_actor", "run_worker"]

log = logging.getLogger(__name__)
T = TypeVar("T")


#: Errors that mean "Redis is unreachable right now", not "this batch is wrong".
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, BackendUnavailable)


def _through_outages(retry: RetryPolicy, action: Callable[[], T], what: str) -> T:
    """Run ``action``, waiting out a Redis outage as ``retry.reconnecting`` says.

    While Redis is down nothing can progress, and handing the batch back to dramatiq would need
    Redis too (a retry enqueue that fails loses the batch), so the batch waits here instead.
    Every step it repeats is idempotent (claims and confirmations are Lua on the records).
    """
    return retry.reconnecting(OUTAGE_ERRORS, what)(action)


def declare_actor(broker: RedisBroker, runtime: WorkerRuntime) -> dramatiq.Actor[[str, int], None]:
    retry = runtime.retry

    def send_batch(campaign_id: str, batch: int) -> None:
        what = f"batch {campaign_id}/{batch}"
        outcome = _through_outages(retry, lambda: runtime.run(runtime.engine.send_batch(campaign_id, batch)), what)
        if outcome.requeue_after is not None:
            # a long wait (or a pause) goes back to the broker: no worker slot sleeps through it
            delay_ms = int(outcome.requeue_after * 1000)
            _through_outages(retry, lambda: enqueue_batch(broker, campaign_id, batch, delay_ms), what)

    max_retries = retry.broker_retries().max_retries
    decorate = dramatiq.actor(broker=broker, actor_name=ACTOR_NAME, queue_name=QUEUE, max_retries=max_retries)
    actor: dramatiq.Actor[[str, int], None] = decorate(send_batch)
    return actor


def _yield_cpu(nice: int, *, idle_policy: bool) -> None:
    """Throughput-bound: leave the CPU to latency-bound neighbours (the API, Redis) when they need it.

    Set before any thread starts: Linux applies niceness and policy per thread and new threads
    inherit them. A nice worker still runs out its time slice when the API wakes; under SCHED_IDLE
    any other process preempts it at once. Measured beside a full-speed campaign (API bench,
    2026-11-26, 1,000 requests/s; BENCHMARKS.md): API p99 22.7-33.4 ms with nice 10, 14.8-18.2 ms
    with SCHED_IDLE as well, and the campaign sent no slower (4,662-5,301 msg/s against
    4,202-4,934). SCHED_BATCH was worse than nice alone (p99 22-37 ms against 11-12 ms, 2026-11-25).
    """
    if nice > os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    if idle_policy and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def run_worker(settings: Settings, *, threads: int | None = None, metrics_port: int | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    if settings.worker_nice > 0 or settings.worker_sched_idle:
        _yield_cpu(settings.worker_nice, idle_policy=settings.worker_sched_idle)
    target = resolve_redis(settings)
    broker = build_broker(settings, target.broker_url)
    runtime = WorkerRuntime(
        settings, app_url=target.app_url, broker_url=target.broker_url, broker=broker, owner=broker.broker_id
    )
    declare_actor(broker, runtime)
    runtime.start(metrics_port=metrics_port)
    worker = dramatiq.Worker(broker, worker_threads=threads or settings.worker_threads, worker_timeout=100)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.start()
    log.info("worker %s started with %d threads", broker.broker_id, worker.worker_threads)
    stop.wait()
    worker.stop(timeout=10_000)
    runtime.stop()
    broker.close()
    return 0
