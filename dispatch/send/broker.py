"""The dramatiq broker, built explicitly (no global broker, nothing at import time).

The broker lives in its own logical database (dramatiq's maintenance runs ``KEYS``). Heartbeat
timeout and maintenance chance are set so a SIGKILLed worker's batches come back within seconds,
and each worker process keeps its heartbeat fresh from a thread even while every worker thread is
busy with a long batch (dramatiq only heartbeats when it fetches).
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries, ShutdownNotifications, TimeLimit

from dispatch.config import Settings
from dispatch.send.retry import RetryPolicy

__all__ = ["ACTOR_NAME", "BROKER_NAMESPACE", "QUEUE", "build_broker", "enqueue_batch"]

#: The one queue batches travel on.
QUEUE = "dispatch"
ACTOR_NAME = "send_batch"
#: Key prefix of the broker's keys (in its own database).
BROKER_NAMESPACE = "dispatch-broker"
#: A batch that runs longer than this is interrupted and retried by dramatiq.
BATCH_TIME_LIMIT_MS = 15 * 60 * 1000


def build_broker(settings: Settings, broker_url: str) -> RedisBroker:
    retries = RetryPolicy.from_settings(settings).broker_retries()
    middleware = [
        AgeLimit(),
        TimeLimit(time_limit=BATCH_TIME_LIMIT_MS),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        # Unexpected errors (Redis restarting, a bug) retry the batch with backoff; the batch is
        # idempotent, so a retry re-sends nothing already confirmed.
        Retries(max_retries=retries.max_retries, min_backoff=retries.min_backoff, max_backoff=retries.max_backoff),
    ]
    return RedisBroker(  # type: ignore[no-untyped-call]
        url=broker_url,
        middleware=middleware,
        namespace=BROKER_NAMESPACE,
        heartbeat_timeout=settings.heartbeat_timeout_ms,
        maintenance_chance=settings.maintenance_chance,
    )


def enqueue_batch(broker: RedisBroker, campaign_id: str, batch: int, delay_ms: int = 0) -> None:
    """Put one batch on the queue without needing the actor's code in this process."""
    message: dramatiq.Message[None] = dramatiq.Message(
        queue_name=QUEUE,
        actor_name=ACTOR_NAME,
        args=(campaign_id, batch),
        kwargs={},
        options={},
    )
    broker.declare_queue(QUEUE)
    broker.enqueue(message, delay=delay_ms or None)
