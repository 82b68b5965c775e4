"""The engine's hook for provider trouble: retry horizons, waiting campaigns, paused campaigns,
and the one log line per batch.

Around each run of a batch the engine calls :meth:`Resilience.before` (sets the run's retry
horizon) and :meth:`Resilience.after` (may turn the run's outcome into a pause):

- **Retry horizon.** Provider trouble does not use up a message's attempts; it is retried until
  ``retry_horizon_s`` after the batch first met it (``dp:{cid}:trouble``, one field per batch),
  never past the campaign's deadline. A run without trouble clears the batch's field.
- **Waiting.** When the provider's breaker is open the run's messages go back unsent; the
  campaign's control hash names the provider (``waiting_for``) and ``status`` shows it while the
  breaker is not closed (:func:`waiting_for`). The batch comes back when a probe may go.
- **In doubt.** A message whose fate at a provider is in doubt stays pinned to it across runs of
  its batch (``dp:{cid}:pins:<batch>``: index -> provider), so a later run never fails it over to
  another provider (``dispatch.send.routing``); the pin goes when the message is settled.
- **Pause.** When the provider refused the account the campaign is paused (only a running one)
  with ``pause_reason``; nothing was marked failed, and ``resume`` sends from where it stopped.
- **Log.** One line per run: campaign, batch, sent, failed, retried, waiting, duration. Never an
  address or a token: counts, ids and the adapters' PII-free reasons only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis
import redis.asyncio as aredis

from dispatch.send.health import read_breaker
from dispatch.store import keys
from monitoring.metrics import Metrics

if TYPE_CHECKING:
    from dispatch.send.engine import Item, SendContext

__all__ = ["BatchSummary", "Resilience", "pins_key", "trouble_key", "waiting_for"]

log = logging.getLogger(__name__)

#: Pauses a running campaign only (a cancel or a completion in between wins).
_PAUSE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'paused', 'pause_reason', ARGV[1], 'paused_at', ARGV[2], 'paused_by', ARGV[3])
return 1
"""


def trouble_key(campaign_id: str) -> str:
    """Hash: batch number -> when (epoch s) the batch first met provider trouble."""
    return keys.control(campaign_id).removesuffix(":control") + ":trouble"


def pins_key(campaign_id: str, batch: int) -> str:
    """Hash: message index -> the provider its fate is in doubt at."""
    return keys.control(campaign_id).removesuffix(":control") + f":pins:{batch}"


def waiting_for(client: redis.Redis, control: dict[bytes, bytes]) -> str | None:
    """What a campaign waits for (``provider twilio (breaker open since ...)``), from its control
    hash and the provider's breaker now; None when it waits for nothing."""
    provider = control.get(b"waiting_for")
    if not provider:
        return None
    admission = read_breaker(client, provider.decode())
    return None if admission.verdict == "closed" else admission.describe()


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """What one run of a batch did (the log line's fields)."""

    campaign_id: str
    batch: int
    sent: int
    failed: int
    retried: int
    waiting: int
    duration_s: float

    def fields(self) -> dict[str, object]:
        return {
            "campaign": self.campaign_id,
            "batch": self.batch,
            "sent": self.sent,
            "failed": self.failed,
            "retried": self.retried,
            "waiting": self.waiting,
            "duration_s": round(self.duration_s, 3),
        }


def summarize(ctx: SendContext, items: Sequence[Item], duration_s: float) -> BatchSummary:
    sent = failed = waiting = 0
    for item in items:
        state = item.outcome.state if item.outcome is not None else "retry"
        if state == "sent":
            sent += 1
        elif state in ("failed", "dead"):
            failed += 1
        elif state == "retry":
            waiting += 1
    return BatchSummary(ctx.campaign_id, ctx.batch, sent, failed, ctx.retries, waiting, duration_s)


class Resilience:
    """Built once per worker; see the module docstring."""

    def __init__(
        self,
        client: aredis.Redis,
        *,
        horizon_s: float,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._horizon_s = horizon_s
        self._metrics = metrics
        self._clock = clock
        self._pause = client.register_script(_PAUSE)
        #: Batches with a trouble mark, as this run found them: (campaign, batch) -> since.
        self._since: dict[tuple[str, int], float | None] = {}
        #: Whether the run found pins for its batch.
        self._pinned: dict[tuple[str, int], bool] = {}
        self._started: dict[tuple[str, int], float] = {}

    async def before(self, ctx: SendContext, deadline: float | None, items: Sequence[Item] = ()) -> None:
        """Set the run's retry horizon (``ctx.retry_until``) and the items' pins."""
        run = (ctx.campaign_id, ctx.batch)
        self._started[run] = time.perf_counter()
        pipe = self._client.pipeline(transaction=False)
        pipe.hget(trouble_key(ctx.campaign_id), str(ctx.batch))
        pipe.hgetall(pins_key(ctx.campaign_id, ctx.batch))
        raw, pins = cast(tuple[bytes | None, dict[bytes, bytes]], tuple(await pipe.execute()))
        self._pinned[run] = bool(pins)
        if pins:
            for item in items:
                provider = pins.get(str(item.index).encode())
                if provider is not None:
                    item.pinned = provider.decode()
        if self._horizon_s <= 0:
            self._since[run] = None
            return
        since = float(raw) if raw else None
        self._since[run] = since
        until = (since if since is not None else self._clock()) + self._horizon_s
        ctx.retry_until = min(until, deadline) if deadline is not None else until

    async def _keep_pins(self, ctx: SendContext, items: Sequence[Item], *, had_pins: bool) -> None:
        """Pins of messages still pending are kept; settled ones' go (one call, only if any)."""
        keep: dict[Any, Any] = {
            str(item.index): item.pinned
            for item in items
            if item.pinned and (item.outcome is None or item.outcome.state == "retry")
        }
        if not keep and not had_pins:
            return
        key = pins_key(ctx.campaign_id, ctx.batch)
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(key)
        if keep:
            pipe.hset(key, mapping=keep)
            pipe.expire(key, int(max(self._horizon_s, 3600)) + 86400)
        await pipe.execute()

    async def after(self, ctx: SendContext, items: Sequence[Item]) -> bool:
        """Record the run; True when the campaign was paused for its provider's account."""
        run = (ctx.campaign_id, ctx.batch)
        since = self._since.pop(run, None)
        started = self._started.pop(run, time.perf_counter())
        await self._keep_pins(ctx, items, had_pins=self._pinned.pop(run, False))
        troubled = ctx.waiting is not None or any(
            item.trouble and item.outcome is not None and item.outcome.state == "retry" for item in items
        )
        trouble = trouble_key(ctx.campaign_id)
        if troubled and since is None and self._horizon_s > 0:
            pipe = self._client.pipeline(transaction=False)
            pipe.hsetnx(trouble, str(ctx.batch), f"{self._clock():.3f}")
            pipe.expire(trouble, int(self._horizon_s) + 86400)
            await pipe.execute()
        elif not troubled and since is not None:
            await self._client.hdel(trouble, str(ctx.batch))
        control = keys.control(ctx.campaign_id)
        if ctx.waiting is not None:
            await self._client.hset(control, "waiting_for", ctx.waiting.provider)
        elif any(item.outcome is not None and item.outcome.state == "sent" for item in items):
            await self._client.hdel(control, "waiting_for")
        summary = summarize(ctx, items, time.perf_counter() - started)
        line = " ".join(f"{name}={value}" for name, value in summary.fields().items())
        if ctx.waiting is not None:
            log.info("batch %s (waiting for %s)", line, ctx.waiting.describe(), extra={"batch": summary.fields()})
        else:
            log.info("batch %s", line, extra={"batch": summary.fields()})
        if ctx.pause_reason is None:
            return False
        paused = await self._pause(keys=[control], args=[ctx.pause_reason, f"{self._clock():.3f}", ctx.pause_provider])
        if paused:
            log.warning("campaign %s paused: %s", ctx.campaign_id, ctx.pause_reason)
            if self._metrics is not None and ctx.pause_provider:
                self._metrics.record_account_error(ctx.pause_provider)
        return True
