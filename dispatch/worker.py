"""``dispatch worker``: one dramatiq worker process running the send path.

Scale out by starting more of these, on any machine that reaches the same Redis.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from dispatch.broker import ACTOR_NAME, QUEUE, build_broker, enqueue_batch
from dispatch.config import Settings
from dispatch.redisdb import resolve_redis
from dispatch.runtime import WorkerRuntime

__all__ = ["declare_actor", "run_worker"]

log = logging.getLogger("dispatch.worker")


def declare_actor(broker: RedisBroker, runtime: WorkerRuntime) -> dramatiq.Actor[[str, int], None]:
    def send_batch(campaign_id: str, batch: int) -> None:
        outcome = runtime.run(runtime.engine.send_batch(campaign_id, batch))
        if outcome.requeue_after is not None:
            enqueue_batch(broker, campaign_id, batch, int(outcome.requeue_after * 1000))

    decorate = dramatiq.actor(broker=broker, actor_name=ACTOR_NAME, queue_name=QUEUE, max_retries=20)
    actor: dramatiq.Actor[[str, int], None] = decorate(send_batch)
    return actor


def run_worker(settings: Settings, *, threads: int | None = None, metrics_port: int | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    target = resolve_redis(settings)
    broker = build_broker(settings, target.broker_url)
    runtime = WorkerRuntime(settings, app_url=target.app_url, broker=broker, owner=broker.broker_id)
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
