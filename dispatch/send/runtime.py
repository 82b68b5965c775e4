"""Per-worker-process resources, built once at worker start-up.

One event loop (uvloop) runs in a dedicated thread; dramatiq's worker threads hand it batches with
``run``. The loop owns the process's one aiohttp session, async Redis client, channels and engine.
A heartbeat thread keeps this process's liveness key (used to reclaim in-flight messages of dead
workers) and its dramatiq heartbeat fresh even while every worker thread is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from datetime import timedelta
from typing import Any, TypeVar

import aiohttp
import redis
import redis.asyncio as aredis
import uvloop
from dramatiq.brokers.redis import RedisBroker
from prometheus_client import CollectorRegistry

from channels import ProviderSettings, ProviderSpec, Registry, default_registry
from channels.base import Channel, Result, Retryable
from dispatch.config import Settings
from dispatch.errors import DispatchError
from dispatch.plan.calibration import (
    EWMA_WEIGHT,
    QUIET_RETRY_S,
    REPROBE_EVERY_S,
    FleetSpeed,
    SpeedProbeError,
    quiet_probe,
)
from dispatch.plan.evidence import EvidenceStore
from dispatch.rules.frequency import AsyncFrequencyStore, FrequencyCap
from dispatch.rules.suppression import AsyncSuppressionStore, check_suppression_key, hasher_for
from dispatch.send.broker import BROKER_NAMESPACE, QUEUE
from dispatch.send.control import CampaignControl
from dispatch.send.engine import (
    BatchFilter,
    Engine,
    FrequencyFilter,
    Item,
    RateLimitStep,
    SendContext,
    SendStep,
    Step,
    SuppressionFilter,
    limiter_burst,
    render_step,
)
from dispatch.send.retry import RetryPolicy
from dispatch.send.sendstats import SendStats
from dispatch.send.tracking import Tracker
from dispatch.store import keys
from monitoring.exposition import MetricsServer, start_metrics_server
from monitoring.metrics import Metrics, RetryCause, collect_queue_depths
from ratelimit import Limit, RedisRateLimiter

__all__ = ["WorkerRuntime", "build_channels", "provider_settings"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds between heartbeats of a worker process.
HEARTBEAT_EVERY_S = 0.5
#: Seconds between refreshes of the campaign progress and queue depth gauges.
GAUGES_EVERY_S = 2.0
#: A campaign not worked on for this long is no longer reported by this process.
CAMPAIGN_IDLE_S = 60.0


def provider_settings(settings: Settings, provider: ProviderSpec) -> ProviderSettings:
    """The provider's settings section: the settings named ``<section>_*`` (secrets still wrapped)
    and, when ``callback_base_url`` is set, the URL its receipts are posted to."""
    prefix = provider.settings_section + "_"
    values = {
        f.name.removeprefix(prefix): getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if f.name.startswith(prefix)
    }
    base = settings.callback_base_url
    callback = base.rstrip("/") + provider.callback_path if base and provider.callback_path else None
    return ProviderSettings(section=provider.settings_section, values=values, callback_url=callback)


def build_channels(
    settings: Settings, session: aiohttp.ClientSession, registry: Registry | None = None
) -> dict[str, Channel]:
    """One adapter per channel that has a provider (its default provider in ``registry``, the
    standard one unless given), configured from settings; they share the process's session."""
    registry = registry if registry is not None else default_registry()
    adapters: dict[str, Channel] = {}
    for name in registry.channel_names(sendable=True):
        provider = registry.provider_for(name)
        adapters[name] = provider.build(session, provider_settings(settings, provider))
    return adapters


def retry_cause(result: Retryable) -> RetryCause:
    status = result.status or 0
    if status == 429:
        return "http_429"
    if status >= 500:
        return "http_5xx"
    return "timeout" if "timeout" in result.reason.lower() else "connection"


class WorkerRuntime:
    """Event loop thread + the async collaborators of the send path, for one process."""

    def __init__(self, settings: Settings, *, app_url: str, broker_url: str, broker: RedisBroker, owner: str) -> None:
        self._broker_url = broker_url
        self.settings = settings
        #: Every retry number of this worker (send rounds, broker hand-backs, Redis outages).
        self.retry = RetryPolicy.from_settings(settings)
        self.owner = owner
        self._app_url = app_url
        self._broker = broker
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dispatch-loop", daemon=True)
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="dispatch-heartbeat", daemon=True)
        self._sync = redis.Redis.from_url(app_url, socket_timeout=5.0)
        self._session: aiohttp.ClientSession | None = None
        self._client: aredis.Redis | None = None
        self._channels: dict[str, Channel] = {}
        self._engine: Engine | None = None
        self.metrics = Metrics(CollectorRegistry())
        self.metrics_server: MetricsServer | None = None
        self._control = CampaignControl(self._sync)
        self._broker_client: aredis.Redis | None = None
        self._limiter: RedisRateLimiter | None = None
        self._limiter_keys: list[str] = []
        self._fleet = FleetSpeed(self._sync)
        self._prober = threading.Thread(target=self._probe_speed, name="dispatch-speed-probe", daemon=True)
        #: This process's send measurements, published as plan-time evidence (dispatch.plan.evidence).
        self.send_stats = SendStats(EvidenceStore(self._sync), owner)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("WorkerRuntime.start() was not called")
        return self._engine

    def start(self, *, metrics_port: int | None = None) -> None:
        port = self.settings.metrics_port if metrics_port is None else metrics_port
        if port:
            self.metrics_server = start_metrics_server(port, self.metrics.registry)
        self._beat_once()
        self._thread.start()
        self.run(self._open())
        self._heartbeat.start()
        if self.settings.cpu_speed_probe:
            self._prober.start()

    async def _open(self) -> None:
        s = self.settings
        connector = aiohttp.TCPConnector(limit=s.send_concurrency, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector)
        pool = aredis.BlockingConnectionPool.from_url(self._app_url, max_connections=64, timeout=30)
        self._client = aredis.Redis(connection_pool=pool)
        self._broker_client = aredis.Redis.from_url(self._broker_url)
        self._channels = build_channels(s, self._session)
        for channel in self._channels.values():
            self.metrics.register_provider(channel.name, channel.provider)
        self.metrics.register_queue(QUEUE)
        tracker = Tracker(self._client, ttl_s=s.retention_s)
        limiter = RedisRateLimiter(self._client)
        account_keys = {"sms": f"sms:{s.sms_account_sid}"}
        if s.sms_rate > 0:
            # the same burst rule as a campaign cap: no second carries more than the rate and a
            # tenth (a long SMS costing more than the burst is acquired in pieces)
            await limiter.configure(Limit(key=account_keys["sms"], rate=s.sms_rate, burst=limiter_burst(s.sms_rate)))
        else:  # no account limit now: one an earlier start configured must not go on applying
            await limiter.remove(account_keys["sms"])
        rate_step = RateLimitStep(limiter, account_keys, metrics=self.metrics)
        send_step = SendStep(
            self.retry,
            on_result=self._observe,
            on_rate_limited=rate_step.penalize,
            metrics=self.metrics,
        )
        self._limiter = limiter
        self._limiter_keys = [key for name, key in account_keys.items() if name == "sms" and s.sms_rate > 0]
        steps: list[Step] = [render_step, rate_step, send_step]
        hasher = hasher_for(s)
        check_suppression_key(self._sync, hasher)
        suppression = SuppressionFilter(AsyncSuppressionStore(self._client, hasher=hasher))
        filters: list[BatchFilter] = [suppression]
        if s.frequency_limit:
            cap = FrequencyCap(limit=s.frequency_limit, window=timedelta(seconds=s.frequency_window_s))
            filters.append(FrequencyFilter(AsyncFrequencyStore(self._client, cap, hasher=hasher)))
        self._engine = Engine(
            client=self._client,
            tracker=tracker,
            channels=self._channels,
            steps=steps,
            owner=self.owner,
            concurrency=s.send_concurrency,
            metrics=self.metrics,
            rate_step=rate_step,
            filters=filters,
            suppression=suppression,
        )

    def _observe(self, ctx: SendContext, item: Item, result: Result, elapsed: float) -> None:
        """Per-message metrics of one provider answer (no address ever reaches a label)."""
        provider = ctx.channel.provider
        self.metrics.observe_latency(provider, elapsed)
        self.send_stats.observe(ctx.channel.name, provider, elapsed)
        if isinstance(result, Retryable):
            self.metrics.record_send(ctx.channel.name, provider, "retried")
            self.metrics.record_retry(provider, retry_cause(result))

    async def _close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        if self._session is not None:
            await self._session.close()
        if self._client is not None:
            await self._client.aclose()
        if self._broker_client is not None:
            await self._broker_client.aclose()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()

    def _beat_once(self) -> None:
        ttl_ms = max(1000, self.settings.heartbeat_timeout_ms // 2)
        self._sync.set(keys.worker_alive(self.owner), b"1", px=ttl_ms)
        self._broker.do_qsize(QUEUE)  # any broker command refreshes dramatiq's heartbeat

    def _probe_speed(self) -> None:
        """Probe the machine's speed (about a second, ~15% of it CPU) every REPROBE_EVERY_S while the
        machine is quiet (QUIET_RETRY_S later when it is not: a probe beside sends measures the
        contention and slows the sends) and publish the running average (its own thread: the
        heartbeat must never wait for it)."""
        average: float | None = None
        while not self._stop.is_set():
            try:
                probe = quiet_probe(quiet_share=self.settings.speed_probe_quiet_share)
                if probe is None:
                    self._stop.wait(QUIET_RETRY_S)
                    continue
                average = probe if average is None else average + EWMA_WEIGHT * (probe - average)
                self._fleet.publish(self.owner, average)
            except (redis.RedisError, SpeedProbeError) as exc:  # Redis restarting, a stalled probe: next time
                log.warning("speed probe failed: %s", exc)
            self._stop.wait(REPROBE_EVERY_S)

    def _beat(self) -> None:
        last_gauges = 0.0
        while not self._stop.wait(HEARTBEAT_EVERY_S):
            try:
                self._beat_once()
                self.metrics.heartbeat()
                self.send_stats.tick()
                if time.monotonic() - last_gauges >= GAUGES_EVERY_S:
                    last_gauges = time.monotonic()
                    self._refresh_gauges()
            except (redis.RedisError, DispatchError) as exc:  # Redis restarting: keep trying
                log.warning("heartbeat failed: %s", exc)

    async def _limiter_rates(self) -> None:
        if self._limiter is None:
            return
        for key in self._limiter_keys:
            limit = await self._limiter.get_limit(key)
            if limit is not None:
                current = await self._limiter.effective_rate(key)
                self.metrics.set_ratelimit_rate(key, current, limit.rate)

    def _refresh_gauges(self) -> None:
        asyncio.run_coroutine_threadsafe(self._limiter_rates(), self._loop).result(timeout=5)
        if self._broker_client is not None:
            future = asyncio.run_coroutine_threadsafe(
                collect_queue_depths(self.metrics, self._broker_client, [QUEUE], namespace=BROKER_NAMESPACE),
                self._loop,
            )
            future.result(timeout=5)
        now = time.time()
        for campaign_id, seen in list(self.engine.seen.items()):
            status = self._control.status(campaign_id, speed=False)
            if status.complete or status.state == "cancelled" or now - seen > CAMPAIGN_IDLE_S:
                if status.complete or status.state == "cancelled":
                    self._control.finalize(campaign_id, self.settings.retention_s)
                self.metrics.end_campaign(campaign_id)
                self.engine.seen.pop(campaign_id, None)
                continue
            started = status.started_at or now
            self.metrics.set_campaign_progress(
                campaign_id,
                sent=status.done,
                total=status.accepted,
                predicted_finish_ts=started + status.predicted_s,
                estimated_finish_ts=now + status.eta_s if status.eta_s is not None else None,
                deadline_ts=status.deadline,
                paused=status.state == "paused",
                predicted_range_ts=(
                    (status.predicted_finish_low, status.predicted_finish_high)
                    if status.predicted_finish_low is not None and status.predicted_finish_high is not None
                    else None
                ),
            )

    def stop(self) -> None:
        self._stop.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join(timeout=2)
        with contextlib.suppress(redis.RedisError, ValueError):
            self.send_stats.flush()  # the last window of a short send is evidence too
        if self._prober.is_alive():
            self._prober.join(timeout=5)
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.run(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            self._sync.delete(keys.worker_alive(self.owner))
            self._fleet.withdraw(self.owner)
        self._sync.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
