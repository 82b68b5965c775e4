"""Provider health: one circuit breaker per provider, shared by every worker through Redis.

States (:file:`breaker.lua` keeps them in the hash ``dp:health:<provider>``):

- **closed**: requests go. Answers are counted in a window of ``window_s``; once at least
  ``min_failures`` of them are *provider trouble* (a refused or dropped connection, a timeout, a
  5xx, a 429) and they make up ``failure_ratio`` of the window, the breaker **opens**.
- **open**: no request goes to the provider until ``retry_at`` (``open_s`` after opening). The
  batches that meet it give their messages back to ``retry`` without spending an attempt and go
  back to the broker until then (:class:`Admission.wait_s`).
- **half-open**: the first worker to ask after ``retry_at`` becomes the one probe (for
  ``probe_lease_s``; another worker takes over if it dies); the others keep waiting. An answer
  that is not trouble closes the breaker; trouble opens it again for twice as long, at most
  ``max_open_s``. A campaign therefore picks up at most ``max_open_s`` after its provider recovers.

A message's *answer* (sent, refused) is what spends its attempts; provider trouble is not an
answer about the message (:func:`is_trouble`). Every worker reads the breaker before each request
chunk; a closed breaker is trusted for ``closed_cache_s`` and answers are written in groups every
``flush_every_s`` (at once when they are enough to open it), so a healthy provider costs a few
Redis calls per second per worker, not one per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Literal, cast

import redis
import redis.asyncio as aredis
from redis.commands.core import AsyncScript

from channels.base import Result, Retryable
from dispatch.config import Settings
from monitoring.metrics import BreakerState, Metrics

__all__ = [
    "Admission",
    "BreakerPolicy",
    "ProviderHealth",
    "Transition",
    "health_key",
    "is_trouble",
    "read_breaker",
]

log = logging.getLogger(__name__)

#: Seconds a provider's health hash outlives its last update.
HEALTH_TTL_S = 7 * 86400
_SCRIPT = resources.files("dispatch.send").joinpath("breaker.lua").read_text(encoding="utf-8")

Verdict = Literal["closed", "probe", "wait"]


def health_key(provider: str) -> str:
    return f"dp:health:{provider}"


def is_trouble(result: Result) -> bool:
    """Whether ``result`` says the provider is in trouble rather than something about the message:
    a transport failure, a timeout, a 5xx or a 429."""
    if not isinstance(result, Retryable):
        return False
    status = result.status
    return status is None or status >= 500 or status == 429


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerPolicy:
    """When a provider's breaker opens and how it probes. Build with :meth:`from_settings`."""

    #: Seconds of answers one decision looks at.
    window_s: float = 10.0
    #: Least trouble answers in the window that can open the breaker.
    min_failures: int = 20
    #: Share of trouble among the window's answers that opens it.
    failure_ratio: float = 0.5
    #: First open period; doubled after each failed probe up to ``max_open_s``.
    open_s: float = 2.0
    max_open_s: float = 5.0
    #: How long one worker holds the probe before another may take it over.
    probe_lease_s: float = 15.0
    #: How long a worker trusts a closed breaker it read.
    closed_cache_s: float = 0.25
    #: Longest a worker keeps answers before writing them to the shared window.
    flush_every_s: float = 0.25

    def __post_init__(self) -> None:
        if self.min_failures < 1:
            raise ValueError(f"BreakerPolicy.min_failures must be at least 1, got {self.min_failures}")
        if not 0 < self.failure_ratio <= 1:
            raise ValueError(f"BreakerPolicy.failure_ratio must be within (0, 1], got {self.failure_ratio}")
        for name in ("window_s", "open_s", "max_open_s", "probe_lease_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BreakerPolicy.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerPolicy:
        return cls(
            window_s=settings.breaker_window_s,
            min_failures=settings.breaker_min_failures,
            failure_ratio=settings.breaker_failure_ratio,
            open_s=settings.breaker_open_s,
            max_open_s=max(settings.breaker_open_s, settings.breaker_max_open_s),
            probe_lease_s=settings.breaker_probe_lease_s,
        )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a request may go to ``provider`` now."""

    provider: str
    verdict: Verdict
    opened_at: float = 0.0
    retry_at: float = 0.0
    reason: str = ""

    @property
    def send(self) -> bool:
        return self.verdict != "wait"

    @property
    def state(self) -> BreakerState:
        return {"closed": "closed", "probe": "half_open", "wait": "open"}[self.verdict]  # type: ignore[return-value]

    def wait_s(self, now: float) -> float:
        """Seconds until a probe may go (at least a quarter second: the broker's round trip)."""
        return max(0.25, self.retry_at - now)

    def describe(self) -> str:
        """What a waiting campaign says in ``status``: ``provider twilio (breaker open since ...)``."""
        since = f" since {_iso(self.opened_at)}" if self.opened_at else ""
        why = f": {self.reason}" if self.reason else ""
        return f"provider {self.provider} (breaker open{since}{why})"


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of a breaker's state made by this worker: ``opened``, ``reopened`` or ``closed``."""

    provider: str
    kind: str
    reason: str


@dataclass(slots=True)
class _Pending:
    ok: int = 0
    bad: int = 0
    reason: str = ""
    flushed_at: float = 0.0


@dataclass(slots=True)
class _Cached:
    at: float
    admission: Admission


@dataclass(slots=True)
class ProviderHealth:
    """The breakers of every provider as this worker uses them (one per process)."""

    client: aredis.Redis
    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    metrics: Metrics | None = None
    clock: Callable[[], float] = time.time
    #: Called with each transition this worker makes (logs, tests).
    on_transition: Callable[[Transition], None] | None = None
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _cache: dict[str, _Cached] = field(default_factory=dict)
    _script: AsyncScript | None = None

    def __post_init__(self) -> None:
        self._script = self.client.register_script(_SCRIPT)

    async def _call(self, provider: str, args: list[Any]) -> list[str]:
        assert self._script is not None
        raw = await self._script(keys=[health_key(provider)], args=args)
        return [item.decode() if isinstance(item, bytes) else str(item) for item in cast(list[object], raw)]

    async def admit(self, provider: str) -> Admission:
        """May a request go to ``provider`` now? ``probe``: yes, and its answer decides the breaker."""
        now = self.clock()
        cached = self._cache.get(provider)
        if cached is not None and now - cached.at < self.policy.closed_cache_s:
            return cached.admission
        verdict, opened_at, retry_at, reason = await self._call(provider, ["admit", now, self.policy.probe_lease_s])
        admission = Admission(provider, cast(Verdict, verdict), float(opened_at), float(retry_at), reason)
        if admission.verdict == "closed":
            self._cache[provider] = _Cached(now, admission)
        else:
            self._cache.pop(provider, None)
        if self.metrics is not None:
            self.metrics.set_breaker_state(provider, admission.state)
        return admission

    async def record(self, provider: str, ok: int, bad: int, reason: str = "", *, probe: bool = False) -> None:
        """Count answers of ``provider``: ``ok`` that say it works, ``bad`` that are trouble.

        ``reason`` (PII-free: the adapter's error text) is kept when the breaker opens. A probe's
        answers are written at once; others in groups (see the module docstring).
        """
        if not ok and not bad:
            return
        now = self.clock()
        pending = self._pending.setdefault(provider, _Pending(flushed_at=now))
        pending.ok += ok
        pending.bad += bad
        if bad and reason:
            pending.reason = reason
        due = probe or pending.bad >= self.policy.min_failures or now - pending.flushed_at >= self.policy.flush_every_s
        if due:
            await self.flush(provider)

    async def flush(self, provider: str) -> None:
        pending = self._pending.pop(provider, None)
        if pending is None:
            return
        p = self.policy
        args: list[Any] = [
            "record",
            self.clock(),
            pending.ok,
            pending.bad,
            p.window_s,
            p.min_failures,
            p.failure_ratio,
            p.open_s,
            p.max_open_s,
            pending.reason[:200],
            HEALTH_TTL_S,
        ]
        state, _opened, _retry, transition = await self._call(provider, args)
        if state != "closed":
            self._cache.pop(provider, None)
        if self.metrics is not None:
            self.metrics.set_breaker_state(provider, cast(BreakerState, state))
        if transition:
            if self.metrics is not None:
                self.metrics.record_breaker_transition(provider, transition)
            level = logging.INFO if transition == "closed" else logging.WARNING
            log.log(level, "provider %s breaker %s (%s)", provider, transition, pending.reason or "answers again")
            if self.on_transition is not None:
                self.on_transition(Transition(provider, transition, pending.reason))


def read_breaker(client: redis.Redis, provider: str) -> Admission:
    """A provider's breaker as it stands (read only: never takes the probe); for ``status``."""
    raw = cast(list[bytes | None], client.hmget(health_key(provider), ["state", "opened_at", "retry_at", "reason"]))
    state = raw[0].decode() if raw[0] else "closed"
    if state == "closed":
        return Admission(provider, "closed")
    verdict: Verdict = "probe" if state == "half_open" else "wait"
    return Admission(
        provider,
        verdict,
        float(raw[1] or 0),
        float(raw[2] or 0),
        raw[3].decode() if raw[3] else "",
    )
