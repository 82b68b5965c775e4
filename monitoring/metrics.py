"""Every Prometheus metric the pipeline emits, behind small typed methods.

Build one ``Metrics`` per process with an explicit ``CollectorRegistry`` (never the default one)
and pass it to whatever records. Call sites stay one line::

    metrics = Metrics(CollectorRegistry())
    metrics.register_provider("sms", "twilio")        # zero series so dashboards show 0, not gaps
    metrics.record_send("sms", "twilio", "sent", n=97)
    metrics.observe_latency("twilio", 0.084)

Labels come only from fixed, small sets: channel, provider, outcome, cause, reason, state, queue,
rate-limiter key and campaign id. Every value is checked the first time it is seen (a cache makes
later calls a dict lookup): outcomes and retry causes must be one of ``OUTCOMES`` /
``RETRY_CAUSES``; channel, provider, reason and state must be short snake_case codes; queue,
campaign id and limiter key have a restricted alphabet without ``@`` or ``+``, and a limiter key
may not hold a phone-number-like segment. A bad value raises ``LabelValueError``: recipient data
can never become a label.

Multiprocess mode (see ``monitoring.exposition``): every gauge states how worker processes'
values combine (``livesum``, ``liveall``, ``mostrecent``). Per-campaign series must disappear
when a campaign ends, which prometheus_client cannot do across processes (its per-process files
cannot delete a key), so ``end_campaign`` writes a NaN *tombstone* with the newest timestamp
(the campaign gauges use ``mostrecent``) and the exposition layer drops NaN campaign samples. In
single-process mode ``end_campaign`` simply removes the series.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Final, Literal, cast, get_args

import redis.asyncio as aredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

from monitoring.errors import LabelValueError, MultiprocessSetupError

__all__ = [
    "BATCH_STATES",
    "BREAKER_STATES",
    "CALLBACK_REJECT_REASONS",
    "CAMPAIGN_GAUGES",
    "LATENCY_BUCKETS",
    "OUTCOMES",
    "RETRY_CAUSES",
    "WAIT_BUCKETS",
    "BreakerState",
    "Metrics",
    "Outcome",
    "RetryCause",
    "collect_queue_depths",
]

#: What happened to a message (one message can be counted as "retried" several times, then once
#: with its final outcome).
Outcome = Literal["sent", "failed", "retried", "suppressed", "skipped", "dead_lettered"]
#: Why a send was retried.
RetryCause = Literal["timeout", "connection", "http_5xx", "http_429"]

OUTCOMES: Final[tuple[Outcome, ...]] = get_args(Outcome)
RETRY_CAUSES: Final[tuple[RetryCause, ...]] = get_args(RetryCause)
#: A provider's circuit breaker; the gauge's value is the index (0 closed, 1 half-open, 2 open).
BreakerState = Literal["closed", "half_open", "open"]
BREAKER_STATES: Final[tuple[BreakerState, ...]] = get_args(BreakerState)
#: Batch states pre-created at zero; other snake_case states are accepted.
BATCH_STATES: Final[tuple[str, ...]] = ("enqueued", "started", "completed", "failed", "retried", "cancelled")
#: Callback rejection reasons pre-created at zero per provider; other snake_case codes are accepted.
CALLBACK_REJECT_REASONS: Final[tuple[str, ...]] = (
    "bad_signature",
    "stale",
    "replayed",
    "malformed",
    "too_large",
    "unknown_message",
)
#: Provider call latency, 1 ms .. 30 s.
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
#: Time spent waiting for rate-limiter tokens, 1 ms .. 60 s.
WAIT_BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

#: Label values computed only when a child is first created (validation off the hot path).
_LabelThunk = Callable[[], tuple[str, ...]]

_CODE = re.compile(r"[a-z][a-z0-9_]{0,39}")
_QUEUE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")
_CAMPAIGN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,63}")
_LIMITER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}")
#: A key segment made only of 7+ digits reads as a phone number (E.164 without "+").
_PHONE_LIKE_SEGMENT = re.compile(r"\d{7,}")

_CAMPAIGN_SENT = "dispatch_campaign_sent_messages"
_CAMPAIGN_PLANNED = "dispatch_campaign_planned_messages"
_CAMPAIGN_PREDICTED = "dispatch_campaign_predicted_finish_timestamp_seconds"
_CAMPAIGN_PREDICTED_LOW = "dispatch_campaign_predicted_finish_low_timestamp_seconds"
_CAMPAIGN_PREDICTED_HIGH = "dispatch_campaign_predicted_finish_high_timestamp_seconds"
_CAMPAIGN_ESTIMATED = "dispatch_campaign_estimated_finish_timestamp_seconds"
_CAMPAIGN_DEADLINE = "dispatch_campaign_deadline_timestamp_seconds"
_CAMPAIGN_PAUSED = "dispatch_campaign_paused"
#: Per-campaign gauges: removed by ``end_campaign`` (NaN tombstones in multiprocess mode).
CAMPAIGN_GAUGES: Final[frozenset[str]] = frozenset(
    {
        _CAMPAIGN_SENT,
        _CAMPAIGN_PLANNED,
        _CAMPAIGN_PREDICTED,
        _CAMPAIGN_PREDICTED_LOW,
        _CAMPAIGN_PREDICTED_HIGH,
        _CAMPAIGN_ESTIMATED,
        _CAMPAIGN_DEADLINE,
        _CAMPAIGN_PAUSED,
    }
)


def _code(label: str, value: str) -> str:
    if not _CODE.fullmatch(value):
        raise LabelValueError(label, "must be a snake_case code of at most 40 characters")
    return value


def _queue(value: str) -> str:
    if not _QUEUE.fullmatch(value):
        raise LabelValueError("queue", "must be 1-64 characters of [A-Za-z0-9_.-]")
    return value


def _campaign(value: str) -> str:
    if not _CAMPAIGN.fullmatch(value):
        raise LabelValueError("campaign", "must be 1-64 characters of [A-Za-z0-9_.:-]")
    return value


def _limiter(value: str) -> str:
    if not _LIMITER.fullmatch(value):
        raise LabelValueError("limiter", "must be 1-128 characters of [A-Za-z0-9_.:-]")
    if any(_PHONE_LIKE_SEGMENT.fullmatch(part) for part in value.split(":")):
        raise LabelValueError("limiter", "holds a phone-number-like segment; name the sender instead")
    return value


def _multiprocess_state() -> bool:
    """Whether new metric values go to per-process files; refuse a half set-up process."""
    env_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    file_backed = bool(getattr(values.ValueClass, "_multiprocess", False))
    if env_dir and not file_backed:
        raise MultiprocessSetupError(
            "PROMETHEUS_MULTIPROC_DIR is set but prometheus_client was imported before it: values "
            "would stay in this process. Call monitoring.setup_multiprocess(directory) (supervisor) "
            "or monitoring.attach_multiprocess(directory) (worker) before building Metrics."
        )
    if file_backed and not env_dir:
        raise MultiprocessSetupError(
            "prometheus_client is in multiprocess mode but PROMETHEUS_MULTIPROC_DIR is unset; "
            "call monitoring.setup_multiprocess(directory) before building Metrics."
        )
    return file_backed


class Metrics:
    """The pipeline's metrics, registered on ``registry``.

    In multiprocess mode the values live in the per-process files and are exposed through
    ``monitoring.exposition.multiprocess_registry``; ``registry`` then only keeps the metric
    objects off the global default registry.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        #: True when values are written to the multiprocess directory.
        self.multiprocess = _multiprocess_state()
        r = registry

        self._messages = Counter(
            "dispatch_messages_total",
            "Messages by channel, provider and outcome.",
            ("channel", "provider", "outcome"),
            registry=r,
        )
        self._latency = Histogram(
            "dispatch_send_latency_seconds",
            "Provider call latency.",
            ("provider",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._retries = Counter(
            "dispatch_send_retries_total",
            "Send retries by provider and cause.",
            ("provider", "cause"),
            registry=r,
        )
        self._dedup_hits = Counter(
            "dispatch_dedup_hits_total",
            "Sends skipped because their idempotency key was already claimed or confirmed.",
            ("channel",),
            registry=r,
        )
        self._inflight = Gauge(
            "dispatch_inflight_sends",
            "Provider calls in flight, per worker process.",
            ("provider",),
            multiprocess_mode="liveall",
            registry=r,
        )
        self._ratelimit_wait = Histogram(
            "dispatch_ratelimit_wait_seconds",
            "Time spent waiting for rate-limiter tokens.",
            ("provider",),
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self._ratelimit_rate = Gauge(
            "dispatch_ratelimit_rate",
            "Current (adaptive) rate of a limiter key, units per second.",
            ("limiter",),
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self._ratelimit_configured = Gauge(
            "dispatch_ratelimit_configured_rate",
            "Configured rate of a limiter key, units per second.",
            ("limiter",),
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self._queue_depth = Gauge(
            "dispatch_queue_depth",
            "Messages waiting in a dramatiq queue.",
            ("queue",),
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self._batches = Counter(
            "dispatch_batches_total",
            "Batches that reached a state.",
            ("state",),
            registry=r,
        )
        self._dead_letters = Counter(
            "dispatch_dead_letters_total",
            "Broker messages (batches) dead-lettered after their last retry.",
            ("queue",),
            registry=r,
        )
        self._heartbeat = Gauge(
            "dispatch_worker_heartbeat_timestamp_seconds",
            "Unix time of the last heartbeat of a worker process.",
            multiprocess_mode="liveall",
            registry=r,
        )
        self._callbacks = Counter(
            "dispatch_callbacks_received_total",
            "Provider status callbacks received.",
            ("provider",),
            registry=r,
        )
        self._callbacks_rejected = Counter(
            "dispatch_callbacks_rejected_total",
            "Provider status callbacks rejected, by reason.",
            ("provider", "reason"),
            registry=r,
        )
        self._in_doubt = Counter(
            "dispatch_in_doubt_total",
            "Messages whose request was in doubt (issued, answer lost), by provider and how it was resolved "
            "(journal, receipt, idempotent, found, not_found, waiting, held, resent, dropped).",
            ("provider", "resolution"),
            registry=r,
        )
        self._sweeps = Counter(
            "dispatch_sweeps_total",
            "What the sweeper did to stalled campaigns: requeued (batches enqueued again), recounted (counters "
            "recomputed from records).",
            ("action",),
            registry=r,
        )
        self._redis_restarts = Counter(
            "dispatch_redis_restarts_total",
            "Redis restarts a worker noticed (its run id changed) and re-asserted what it knew after.",
            registry=r,
        )
        self._planner_rejections = Counter(
            "dispatch_planner_rejections_total",
            "Audience rows the planner rejected, by reason.",
            ("reason",),
            registry=r,
        )

        self._breaker_state = Gauge(
            "dispatch_provider_breaker_state",
            "Circuit breaker of a provider as a worker last saw it: 0 closed, 1 half-open, 2 open.",
            ("provider",),
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self._breaker_transitions = Counter(
            "dispatch_provider_breaker_transitions_total",
            "Breaker transitions a worker made, by the state reached: opened, reopened (a failed probe), closed.",
            ("provider", "state"),
            registry=r,
        )
        self._account_pauses = Counter(
            "dispatch_provider_account_errors_total",
            "Campaigns paused because the provider refused the account (credentials, balance, ...).",
            ("provider",),
            registry=r,
        )

        def campaign_gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ("campaign",), multiprocess_mode="mostrecent", registry=r)

        self._campaign_gauges: dict[str, Gauge] = {
            _CAMPAIGN_SENT: campaign_gauge(
                _CAMPAIGN_SENT, "Messages of a running campaign with a final outcome so far."
            ),
            _CAMPAIGN_PLANNED: campaign_gauge(_CAMPAIGN_PLANNED, "Messages a running campaign will send."),
            _CAMPAIGN_PREDICTED: campaign_gauge(_CAMPAIGN_PREDICTED, "Finish time the planner predicted (Unix time)."),
            _CAMPAIGN_PREDICTED_LOW: campaign_gauge(
                _CAMPAIGN_PREDICTED_LOW, "Fast end (10th percentile) of the planner's predicted finish (Unix time)."
            ),
            _CAMPAIGN_PREDICTED_HIGH: campaign_gauge(
                _CAMPAIGN_PREDICTED_HIGH, "Slow end (90th percentile) of the planner's predicted finish (Unix time)."
            ),
            _CAMPAIGN_ESTIMATED: campaign_gauge(
                _CAMPAIGN_ESTIMATED,
                "Live ETA: finish time re-estimated from the measured recent rate, the remaining work, "
                "quiet-hour waits and the rate cap (Unix time).",
            ),
            _CAMPAIGN_DEADLINE: campaign_gauge(_CAMPAIGN_DEADLINE, "Campaign deadline (Unix time)."),
            _CAMPAIGN_PAUSED: campaign_gauge(
                _CAMPAIGN_PAUSED, "1 while a campaign is not expected to progress (paused, quiet hours)."
            ),
        }

        self._engagement = Gauge(
            "dispatch_engagement_messages",
            "Messages of a campaign with each delivery outcome or engagement event (a round report's counts).",
            ("campaign", "channel", "event"),
            multiprocess_mode="mostrecent",
            registry=r,
        )

        # Children by validated label values: the hot path is one dict lookup.
        self._children: dict[tuple[object, ...], Counter | Gauge | Histogram] = {}
        for state in BATCH_STATES:
            self._counter(self._batches, ("batch", state), (_code("state", state),))

    # -- priming ---------------------------------------------------------------------------

    def register_provider(self, channel: str, provider: str) -> None:
        """Create zero series for a channel's provider (every outcome, cause, rejection reason)."""
        for outcome in OUTCOMES:
            self.record_send(channel, provider, outcome, n=0)
        for cause in RETRY_CAUSES:
            self.record_retry(provider, cause, n=0)
        for reason in CALLBACK_REJECT_REASONS:
            self.record_callback_rejected(provider, reason, n=0)
        self.record_callback(provider, n=0)
        self.record_account_error(provider, n=0)
        self.set_breaker_state(provider, "closed")
        self.record_dedup_hit(channel, n=0)
        self._histogram(self._latency, ("lat", provider), lambda: (_code("provider", provider),))
        self._histogram(self._ratelimit_wait, ("wait", provider), lambda: (_code("provider", provider),))
        self._gauge(self._inflight, ("inflight", provider), lambda: (_code("provider", provider),))

    def register_queue(self, queue: str) -> None:
        """Create zero series for a dramatiq queue (depth and dead letters)."""
        self.record_dead_letter(queue, n=0)
        self._gauge(self._queue_depth, ("depth", queue), lambda: (_queue(queue),))

    def register_planner_reasons(self, reasons: Iterable[str]) -> None:
        """Create zero series for the planner's rejection reason codes."""
        for reason in reasons:
            self.record_planner_rejections(reason, n=0)

    # -- sends -----------------------------------------------------------------------------

    def record_send(self, channel: str, provider: str, outcome: Outcome, n: int = 1) -> None:
        """Count ``n`` messages of ``channel``/``provider`` with ``outcome``."""
        key = ("send", channel, provider, outcome)
        child = cast("Counter | None", self._children.get(key))
        if child is None:
            if outcome not in OUTCOMES:
                raise LabelValueError("outcome", f"must be one of {', '.join(OUTCOMES)}")
            child = self._counter(
                self._messages, key, (_code("channel", channel), _code("provider", provider), outcome)
            )
        child.inc(n)

    def observe_latency(self, provider: str, seconds: float) -> None:
        """Record one provider call's duration."""
        self._histogram(self._latency, ("lat", provider), lambda: (_code("provider", provider),)).observe(seconds)

    def record_retry(self, provider: str, cause: RetryCause, n: int = 1) -> None:
        """Count ``n`` retries of sends to ``provider`` because of ``cause``."""
        key = ("retry", provider, cause)
        child = cast("Counter | None", self._children.get(key))
        if child is None:
            if cause not in RETRY_CAUSES:
                raise LabelValueError("cause", f"must be one of {', '.join(RETRY_CAUSES)}")
            child = self._counter(self._retries, key, (_code("provider", provider), cause))
        child.inc(n)

    def record_in_doubt(self, provider: str, resolution: str, n: int = 1) -> None:
        """Count ``n`` messages in doubt at ``provider`` resolved as ``resolution``."""
        self._counter(
            self._in_doubt,
            ("doubt", provider, resolution),
            lambda: (_code("provider", provider), _code("resolution", resolution)),
        ).inc(n)

    def record_sweep(self, action: str, n: int = 1) -> None:
        """Count ``n`` repairs of stalled campaigns (``action``: requeued or recounted)."""
        self._counter(self._sweeps, ("sweep", action), lambda: (_code("action", action),)).inc(n)

    def record_redis_restart(self) -> None:
        """Count a Redis restart this process noticed."""
        self._redis_restarts.inc()

    def record_dedup_hit(self, channel: str, n: int = 1) -> None:
        """Count ``n`` sends skipped by the idempotency-key check."""
        self._counter(self._dedup_hits, ("dedup", channel), lambda: (_code("channel", channel),)).inc(n)

    @contextmanager
    def inflight(self, provider: str, n: int = 1) -> Iterator[None]:
        """Count ``n`` provider calls as in flight for the duration of the block."""
        child = self._gauge(self._inflight, ("inflight", provider), lambda: (_code("provider", provider),))
        child.inc(n)
        try:
            yield
        finally:
            child.dec(n)

    # -- rate limiting ---------------------------------------------------------------------

    def observe_ratelimit_wait(self, provider: str, seconds: float) -> None:
        """Record how long one acquisition waited for tokens (0 when it did not wait)."""
        self._histogram(self._ratelimit_wait, ("wait", provider), lambda: (_code("provider", provider),)).observe(
            seconds
        )

    def set_ratelimit_rate(self, limiter: str, current: float, configured: float | None = None) -> None:
        """Publish a limiter key's current adaptive rate (and its configured rate, if known)."""
        self._gauge(self._ratelimit_rate, ("rate", limiter), lambda: (_limiter(limiter),)).set(current)
        if configured is not None:
            self._gauge(self._ratelimit_configured, ("conf", limiter), lambda: (_limiter(limiter),)).set(configured)

    # -- queues, batches, workers ----------------------------------------------------------

    def set_queue_depth(self, queue: str, depth: int) -> None:
        """Publish the number of messages waiting in a dramatiq queue."""
        self._gauge(self._queue_depth, ("depth", queue), lambda: (_queue(queue),)).set(depth)

    def record_batch(self, state: str, n: int = 1) -> None:
        """Count ``n`` batches reaching ``state`` (see ``BATCH_STATES``)."""
        self._counter(self._batches, ("batch", state), lambda: (_code("state", state),)).inc(n)

    def record_dead_letter(self, queue: str, n: int = 1) -> None:
        """Count ``n`` broker messages dead-lettered from ``queue``."""
        self._counter(self._dead_letters, ("dead", queue), lambda: (_queue(queue),)).inc(n)

    def heartbeat(self, now: float | None = None) -> None:
        """Record that this worker process is alive (call every few seconds)."""
        self._heartbeat.set(time.time() if now is None else now)

    # -- callbacks, planner ----------------------------------------------------------------

    def record_callback(self, provider: str, n: int = 1) -> None:
        """Count ``n`` status callbacks received from ``provider`` (accepted or not)."""
        self._counter(self._callbacks, ("cb", provider), lambda: (_code("provider", provider),)).inc(n)

    def record_callback_rejected(self, provider: str, reason: str, n: int = 1) -> None:
        """Count ``n`` callbacks from ``provider`` rejected for ``reason``."""
        self._counter(
            self._callbacks_rejected,
            ("cbrej", provider, reason),
            lambda: (_code("provider", provider), _code("reason", reason)),
        ).inc(n)

    def set_breaker_state(self, provider: str, state: BreakerState) -> None:
        """Publish a provider's breaker state (``BREAKER_STATES`` gives its value)."""
        value = BREAKER_STATES.index(state)
        self._gauge(self._breaker_state, ("breaker", provider), lambda: (_code("provider", provider),)).set(value)

    def record_breaker_transition(self, provider: str, transition: str) -> None:
        key = ("breaker_t", provider, transition)
        labels = lambda: (_code("provider", provider), _code("state", transition))  # noqa: E731
        self._counter(self._breaker_transitions, key, labels).inc()

    def record_account_error(self, provider: str, n: int = 1) -> None:
        """Count a campaign paused for a provider account problem (401/403, balance, ...)."""
        self._counter(self._account_pauses, ("account", provider), lambda: (_code("provider", provider),)).inc(n)

    def record_planner_rejections(self, reason: str, n: int = 1) -> None:
        """Count ``n`` audience rows rejected by the planner for ``reason``."""
        self._counter(self._planner_rejections, ("plan", reason), lambda: (_code("reason", reason),)).inc(n)

    # -- campaigns -------------------------------------------------------------------------

    def set_campaign_progress(
        self,
        campaign_id: str,
        *,
        sent: int,
        total: int,
        predicted_finish_ts: float | None = None,
        estimated_finish_ts: float | None = None,
        deadline_ts: float | None = None,
        paused: bool = False,
        predicted_range_ts: tuple[float, float] | None = None,
    ) -> None:
        """Publish a running campaign's progress, finish estimates and deadline.

        ``sent`` counts messages with a final outcome; ``total`` the planned messages. Times are
        Unix timestamps; ``None`` leaves that series absent (no deadline, no estimate yet).
        ``paused`` is True while the campaign is not expected to progress (paused or waiting for
        a quiet-hours window), which keeps the stalled-campaign alert quiet. ``predicted_range_ts``:
        the fast and slow ends of the planner's predicted finish (Unix timestamps).
        """
        cid = _campaign(campaign_id)
        gauges = self._campaign_gauges
        gauges[_CAMPAIGN_SENT].labels(cid).set(sent)
        gauges[_CAMPAIGN_PLANNED].labels(cid).set(total)
        gauges[_CAMPAIGN_PAUSED].labels(cid).set(1 if paused else 0)
        low, high = predicted_range_ts if predicted_range_ts is not None else (None, None)
        for name, value in (
            (_CAMPAIGN_PREDICTED, predicted_finish_ts),
            (_CAMPAIGN_PREDICTED_LOW, low),
            (_CAMPAIGN_PREDICTED_HIGH, high),
            (_CAMPAIGN_ESTIMATED, estimated_finish_ts),
            (_CAMPAIGN_DEADLINE, deadline_ts),
        ):
            if value is None:
                self._drop_campaign_series(gauges[name], cid)
            else:
                gauges[name].labels(cid).set(value)

    def set_engagement(self, campaign_id: str, channel: str, counts: Mapping[str, int]) -> None:
        """Publish a campaign's report counts (``dispatch.rounds.report``): ``counts`` maps an
        event code (``sent``, ``delivered``, ``human_opens``, ``clicks``, ...) to messages."""
        cid, chan = _campaign(campaign_id), _code("channel", channel)
        for event, value in counts.items():
            self._engagement.labels(cid, chan, _code("event", event)).set(value)

    def end_campaign(self, campaign_id: str) -> None:
        """Remove every series of a campaign (from all processes' views in multiprocess mode)."""
        cid = _campaign(campaign_id)
        for gauge in self._campaign_gauges.values():
            self._drop_campaign_series(gauge, cid)

    # -- internals -------------------------------------------------------------------------

    def _drop_campaign_series(self, gauge: Gauge, cid: str) -> None:
        if self.multiprocess:
            # Files cannot forget a key: write a newest-timestamp NaN that exposition drops.
            gauge.labels(cid).set(math.nan)
        else:
            gauge.remove(cid)

    def _child(
        self,
        metric: Counter | Gauge | Histogram,
        key: tuple[object, ...],
        labels: tuple[str, ...] | _LabelThunk,
    ) -> Counter | Gauge | Histogram:
        child = self._children.get(key)
        if child is None:
            labelvalues = labels if isinstance(labels, tuple) else labels()
            child = metric.labels(*labelvalues)
            self._children[key] = child
        return child

    def _counter(self, metric: Counter, key: tuple[object, ...], labels: tuple[str, ...] | _LabelThunk) -> Counter:
        return cast(Counter, self._child(metric, key, labels))

    def _gauge(self, metric: Gauge, key: tuple[object, ...], labels: tuple[str, ...] | _LabelThunk) -> Gauge:
        return cast(Gauge, self._child(metric, key, labels))

    def _histogram(
        self, metric: Histogram, key: tuple[object, ...], labels: tuple[str, ...] | _LabelThunk
    ) -> Histogram:
        return cast(Histogram, self._child(metric, key, labels))


async def collect_queue_depths(
    metrics: Metrics, broker_redis: aredis.Redis, queues: Iterable[str], *, namespace: str = "dramatiq"
) -> dict[str, int]:
    """Read each dramatiq queue's depth from the broker's Redis and publish it; one round trip.

    Publishes ``queue`` (messages ready to run) and ``queue.DQ`` (delayed: retries and deferred
    batches) for every queue, using dramatiq's Redis layout (``{namespace}:{queue}`` lists).
    Call it every few seconds from one place (a worker's background task); returns the depths.
    """
    names = [name for queue in queues for name in (queue, f"{queue}.DQ")]
    async with broker_redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(f"{namespace}:{name}")
        lengths = await pipe.execute()
    depths = {name: int(length) for name, length in zip(names, lengths, strict=True)}
    for name, depth in depths.items():
        metrics.set_queue_depth(name, depth)
    return depths
