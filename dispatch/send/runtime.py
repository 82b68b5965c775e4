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
import json
import logging
import threading
import time
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from datetime import timedelta
from typing import Any, TypeVar

import aiohttp
import redis
import redis.asyncio as aredis
import uvloop
from dramatiq.brokers.redis import RedisBroker
from prometheus_client import CollectorRegistry

from channels import ChannelConfigError, ProviderSettings, ProviderSpec, Registry, UnknownChannel, default_registry
from channels.base import Channel, Result, Retryable
from channels.tokens import GoogleServiceAccount, TokenProvider
from dispatch.config import Settings, in_doubt_policies
from dispatch.engage.links import LinkSigner, LinkStep
from dispatch.engage.replies import ReplyIndex, ReplyIndexStep
from dispatch.errors import ConfigError, DispatchError
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
from dispatch.send.broker import BROKER_NAMESPACE, QUEUE, enqueue_batch
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
from dispatch.send.fence import RecentFence
from dispatch.send.health import BreakerPolicy, ProviderHealth
from dispatch.send.journal import Journal
from dispatch.send.reconcile import Reconciler
from dispatch.send.resilience import Resilience
from dispatch.send.retry import RetryPolicy
from dispatch.send.routing import Router, parse_providers, parse_routes
from dispatch.send.sendstats import SendStats
from dispatch.send.sweeper import Sweeper
from dispatch.send.tokens import SharedTokens
from dispatch.send.tracking import Tracker
from dispatch.store import keys
from monitoring.exposition import MetricsServer, start_metrics_server
from monitoring.metrics import Metrics, RetryCause, collect_queue_depths
from ratelimit import Limit, RedisRateLimiter

__all__ = [
    "WorkerRuntime",
    "build_channels",
    "build_routers",
    "provider_settings",
    "receipt_providers",
    "shared_tokens",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds between heartbeats of a worker process.
HEARTBEAT_EVERY_S = 0.5
#: Seconds between refreshes of the campaign progress and queue depth gauges.
GAUGES_EVERY_S = 2.0
#: A campaign not worked on for this long is no longer reported by this process.
CAMPAIGN_IDLE_S = 60.0


def provider_settings(
    settings: Settings, provider: ProviderSpec, tokens: TokenProvider | None = None
) -> ProviderSettings:
    """The provider's settings section: the settings named ``<section>_*`` (secrets still wrapped),
    when ``callback_base_url`` is set the URL its receipts are posted to, and its shared tokens."""
    prefix = provider.settings_section + "_"
    values = {
        f.name.removeprefix(prefix): getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if f.name.startswith(prefix)
    }
    base = settings.callback_base_url
    callback = base.rstrip("/") + provider.callback_path if base and provider.callback_path else None
    return ProviderSettings(section=provider.settings_section, values=values, callback_url=callback, tokens=tokens)


def build_channels(
    settings: Settings,
    session: aiohttp.ClientSession,
    registry: Registry | None = None,
    *,
    tokens: Mapping[str, TokenProvider] | None = None,
) -> dict[str, Channel]:
    """One adapter per channel that has a provider (its default provider in ``registry``, the
    standard one unless given), configured from settings; they share the process's session.
    ``tokens``: refreshed credentials by channel (:func:`shared_tokens`)."""
    registry = registry if registry is not None else default_registry()
    adapters: dict[str, Channel] = {}
    for name in registry.channel_names(sendable=True):
        provider = registry.provider_for(name)
        adapters[name] = provider.build(session, provider_settings(settings, provider, (tokens or {}).get(name)))
    return adapters


def receipt_providers(registry: Registry) -> frozenset[str]:
    """Providers that post delivery receipts (a message in doubt may still be proven sent)."""
    return frozenset(
        provider.name
        for name in registry.channel_names(sendable=True)
        for provider in [registry.provider_for(name)]
        if provider.receipts != "none"
    )


def build_routers(
    settings: Settings,
    session: aiohttp.ClientSession,
    channels: dict[str, Channel],
    registry: Registry | None = None,
) -> dict[str, Router]:
    """The providers of each channel that has several (SMS: ``sms_providers``, ``sms_routes``).

    The channel's entry in ``channels`` becomes the first provider's adapter; the others are built
    from their own settings sections. No router for a channel with one provider and no routes.
    """
    registry = registry if registry is not None else default_registry()
    names = parse_providers(settings.sms_providers, "DISPATCH_SMS_PROVIDERS")
    routes = parse_routes(settings.sms_routes, "DISPATCH_SMS_ROUTES")
    if len(names) <= 1 and not routes:
        if names and names[0] != channels["sms"].provider:
            channels["sms"] = _provider_adapter(settings, session, registry, names[0])
        return {}
    adapters: dict[str, Channel] = {}
    for name in names:
        current = channels.get("sms")
        use_current = current is not None and current.provider == name
        adapters[name] = current if use_current and current else _provider_adapter(settings, session, registry, name)
    router = Router("sms", adapters, routes)
    channels["sms"] = router.primary
    return {"sms": router}


def _provider_adapter(settings: Settings, session: aiohttp.ClientSession, registry: Registry, name: str) -> Channel:
    try:
        spec = registry.provider(name)
    except UnknownChannel as exc:
        raise ConfigError("DISPATCH_SMS_PROVIDERS", str(exc), "name registered SMS providers") from None
    if spec.channel != "sms":
        raise ConfigError("DISPATCH_SMS_PROVIDERS", f"{name} serves {spec.channel}, not sms", "name SMS providers")
    return spec.build(session, provider_settings(settings, spec))


def shared_tokens(settings: Settings, client: aredis.Redis) -> dict[str, TokenProvider]:
    """The refreshed credentials the settings ask for, by channel: FCM's from its service account."""
    path = settings.push_service_account_file
    if path is None:
        return {}
    setting = "DISPATCH_PUSH_SERVICE_ACCOUNT_FILE"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {path} ({exc.strerror})", "point it at the JSON key file") from None
    except ValueError:
        raise ConfigError(setting, f"{path} is not JSON", "download the service account's JSON key again") from None
    try:
        minter = GoogleServiceAccount(info)
    except ChannelConfigError as exc:
        raise ConfigError(setting, str(exc), "use the JSON key of a service account") from None
    return {"push": SharedTokens(client, "fcm", minter)}


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
        #: Every adapter of this process (the channels' and their failover providers').
        self._adapters: list[Channel] = []
        self._engine: Engine | None = None
        self.health: ProviderHealth | None = None
        self.metrics = Metrics(CollectorRegistry())
        self.metrics_server: MetricsServer | None = None
        self._control = CampaignControl(self._sync)
        self._broker_client: aredis.Redis | None = None
        self._limiter: RedisRateLimiter | None = None
        self._limiter_keys: list[str] = []
        self._fleet = FleetSpeed(self._sync)
        self._prober = threading.Thread(target=self._probe_speed, name="dispatch-speed-probe", daemon=True)
        self._redis_check: Future[bool] | None = None
        self._sweeper = Sweeper(
            self._sync,
            lambda campaign_id, batch: enqueue_batch(self._broker, campaign_id, batch),
            owner=owner,
            on_action=self.metrics.record_sweep,
        )
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
        self._channels = build_channels(s, self._session, tokens=shared_tokens(s, self._client))
        routers = build_routers(s, self._session, self._channels)
        self._adapters = list(self._channels.values())
        for router in routers.values():
            self._adapters.extend(a for a in router.adapters if a not in self._adapters)
        for channel in self._adapters:
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
        self.health = ProviderHealth(self._client, BreakerPolicy.from_settings(s), metrics=self.metrics)
        send_step = SendStep(
            self.retry,
            on_result=self._observe,
            on_rate_limited=rate_step.penalize,
            metrics=self.metrics,
            health=self.health,
            routers=routers,
        )
        self._limiter = limiter
        self._limiter_keys = [key for name, key in account_keys.items() if name == "sms" and s.sms_rate > 0]
        hasher = hasher_for(s)
        # tracked links are rewritten before the rate limit counts segments; accepted SMS are
        # indexed by number after the send, so a reply finds its message
        steps: list[Step] = [
            render_step,
            LinkStep(LinkSigner.from_settings(s)),
            rate_step,
            send_step,
            ReplyIndexStep(ReplyIndex(self._client, hasher=hasher, ttl_s=s.reply_window_s)),
        ]
        check_suppression_key(self._sync, hasher)
        suppression_store = AsyncSuppressionStore(self._client, hasher=hasher)
        suppression = SuppressionFilter(suppression_store)
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
            reconciler=Reconciler(
                policies=in_doubt_policies(s.in_doubt),
                wait_s=s.in_doubt_wait_s,
                # receipts are evidence only where providers are told where to post them
                receipt_providers=receipt_providers(default_registry()) if s.callback_base_url else frozenset(),
            ),
            journal=Journal(),
            fence=RecentFence(suppression_store),
            resilience=Resilience(self._client, horizon_s=self.retry.retry_horizon_s, metrics=self.metrics),
            adapters={adapter.provider: adapter for adapter in self._adapters},
        )

    def _observe(self, ctx: SendContext, item: Item, result: Result, elapsed: float) -> None:
        """Per-message metrics of one provider answer (no address ever reaches a label)."""
        provider = item.provider or ctx.channel.provider
        self.metrics.observe_latency(provider, elapsed)
        self.send_stats.observe(ctx.channel.name, provider, elapsed)
        if isinstance(result, Retryable):
            self.metrics.record_send(ctx.channel.name, provider, "retried")
            self.metrics.record_retry(provider, retry_cause(result))

    async def _close(self) -> None:
        for channel in self._adapters:
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
        pipe = self._sync.pipeline(transaction=False)
        pipe.set(keys.worker_alive(self.owner), b"1", px=ttl_ms)
        runs = keys.worker_runs(self.owner)
        pipe.delete(runs)
        active = self._engine.active_runs() if self._engine is not None else []
        if active:
            pipe.sadd(runs, *(keys.run_member(cid, batch) for cid, batch in active))
            pipe.pexpire(runs, ttl_ms)
        pipe.execute()
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
                self._check_redis()
                self.send_stats.tick()
                if time.monotonic() - last_gauges >= GAUGES_EVERY_S:
                    last_gauges = time.monotonic()
                    self._refresh_gauges()
                    self._sweeper.sweep()
            except (redis.RedisError, DispatchError) as exc:  # Redis restarting: keep trying
                log.warning("heartbeat failed: %s", exc)

    def _check_redis(self) -> None:
        """Notice a Redis restart within a heartbeat even while no batch runs (``Engine.check_redis``);
        never waits for it (the heartbeat must go on)."""
        previous = self._redis_check
        if self._engine is None or (previous is not None and not previous.done()):
            return
        if previous is not None and previous.exception() is not None:
            log.warning("redis check failed: %s", type(previous.exception()).__name__)
        self._redis_check = asyncio.run_coroutine_threadsafe(self._engine.check_redis(), self._loop)

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
