"""The retry policy of the send path: one frozen object built from settings, used everywhere.

Four kinds of retry, one home:

- **A message's provider attempts** (``SendStep``): a message that got a retryable answer (5xx, a
  timeout, a 429) is sent again in-process with tenacity, waiting the longer of the provider's
  ``Retry-After`` and an exponential backoff with full jitter. It stops once a message reached
  ``max_attempts`` (it is then dead-lettered, unless its answers were provider trouble: those are
  dead-lettered only once ``retry_horizon_s`` has passed, see ``dispatch.send.health``) or once a
  wait would exceed ``long_wait_s``.
- **A long wait** goes back to the broker: the message stays ``retry`` and the batch is enqueued
  again with that delay, so no worker slot sleeps through it (the engine's ``BatchOutcome``).
- **A batch that raised** (Redis restarting, a bug) is retried by dramatiq's ``Retries``
  middleware with its backoff (``broker_retries``); a batch is idempotent, so a retry re-sends
  nothing already confirmed.
- **A Redis outage inside a worker** is waited out in place with a capped exponential backoff
  (``reconnecting``): handing the batch back to dramatiq would need Redis too.

The numbers are fields with the defaults the deployment runs with; only ``max_attempts`` and
``retry_horizon_s`` are settings today (:meth:`RetryPolicy.from_settings`), the others are for tests to shrink.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_delay,
    wait_exponential,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from dispatch.config import Settings

__all__ = ["BrokerRetries", "RetryPolicy", "SendRound", "stop_when_exhausted", "stop_when_wait_exceeds"]

log = logging.getLogger(__name__)


class SendRound(Protocol):
    """What one send round leaves for the policy: the messages still to retry (each with its
    attempts so far) and the longest wait the provider asked for."""

    @property
    def pending(self) -> list[Any]: ...

    @property
    def retry_after(self) -> float: ...


def _last_round(state: RetryCallState) -> SendRound | None:
    if state.outcome is None or state.outcome.failed:
        return None
    result: SendRound = state.outcome.result()
    return result


def _exhausted(last: SendRound, max_attempts: int) -> bool:
    return any(item.attempts >= max_attempts for item in last.pending)


def _too_long(last: SendRound, seconds: float) -> bool:
    return last.retry_after > seconds


# Strategy classes are named as tenacity names its own (``stop_after_attempt``).
class stop_when_exhausted(stop_base):
    """Stop once a message still pending has had ``max_attempts`` attempts (counted across broker
    runs: an attempt a previous run made counts)."""

    def __init__(self, max_attempts: int) -> None:
        self.max_attempts = max_attempts

    def __call__(self, retry_state: RetryCallState) -> bool:
        last = _last_round(retry_state)
        return last is not None and _exhausted(last, self.max_attempts)


class stop_when_wait_exceeds(stop_base):
    """Stop once the provider asks for a wait longer than ``seconds``: it goes to the broker."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, retry_state: RetryCallState) -> bool:
        last = _last_round(retry_state)
        return last is not None and _too_long(last, self.seconds)


class wait_at_least_retry_after(wait_base):
    """The longer of the provider's ``Retry-After`` and ``backoff``."""

    def __init__(self, backoff: wait_base) -> None:
        self.backoff = backoff

    def __call__(self, retry_state: RetryCallState) -> float:
        last = _last_round(retry_state)
        return max(last.retry_after if last is not None else 0.0, self.backoff(retry_state))


@dataclass(frozen=True, kw_only=True, slots=True)
class BrokerRetries:
    """Parameters of dramatiq's ``Retries`` middleware (milliseconds, as dramatiq takes them)."""

    max_retries: int
    min_backoff: int
    max_backoff: int


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """Every retry number of the send path. Build with :meth:`from_settings`."""

    #: Provider attempts per message before it is dead-lettered.
    max_attempts: int = 5
    #: First window of the jittered exponential backoff between two send rounds, in seconds.
    backoff_multiplier_s: float = 0.05
    #: Longest backoff between two send rounds (a longer Retry-After is still honoured).
    backoff_max_s: float = 2.0
    #: Waits longer than this go back to the broker instead of holding a worker slot.
    long_wait_s: float = 5.0
    #: How long a batch's messages are retried through provider trouble (connection errors,
    #: timeouts, 5xx, 429) before they are dead-lettered, from the batch's first trouble; never
    #: past the campaign's deadline. 0: trouble is dead-lettered after ``max_attempts`` like the rest.
    retry_horizon_s: float = 3600.0
    #: dramatiq retries of a batch that raised, and their backoff window in milliseconds.
    broker_max_retries: int = 20
    broker_min_backoff_ms: int = 500
    broker_max_backoff_ms: int = 30_000
    #: How long a batch waits for Redis to come back before it gives up (below the time limit).
    outage_budget_s: float = 600.0
    #: First and longest wait between two tries while Redis is unreachable.
    outage_first_wait_s: float = 0.2
    outage_max_wait_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be at least 1, got {self.max_attempts}")
        for name in ("backoff_multiplier_s", "backoff_max_s", "long_wait_s", "outage_first_wait_s", "retry_horizon_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"RetryPolicy.{name} must not be negative, got {getattr(self, name)}")

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(max_attempts=settings.max_attempts, retry_horizon_s=settings.retry_horizon_s)

    # -- a message's provider attempts ---------------------------------------------------------

    def send_stop(self) -> stop_base:
        """When in-process retries of a send round end."""
        return stop_when_exhausted(self.max_attempts) | stop_when_wait_exceeds(self.long_wait_s)

    def send_wait(self) -> wait_base:
        """Wait between two send rounds inside tenacity (its attempt 1 is the second round)."""
        return wait_at_least_retry_after(
            wait_random_exponential(multiplier=self.backoff_multiplier_s, max=self.backoff_max_s)
        )

    def first_retry_wait(self, retry_after: float) -> float:
        """Wait after the first round, which runs outside tenacity (most sends succeed, and a
        tenacity loop costs more CPU than the request): jitter over twice the first window."""
        return max(retry_after, random.uniform(0.0, min(self.backoff_max_s, 2 * self.backoff_multiplier_s)))

    def gives_up(self, last: SendRound) -> bool:
        """Whether ``last`` ends the in-process retries (the same test as :meth:`send_stop`)."""
        return not last.pending or _exhausted(last, self.max_attempts) or _too_long(last, self.long_wait_s)

    def send_retrying(self, sleep: Callable[[float], Awaitable[None]]) -> AsyncRetrying:
        """The tenacity loop of the second and later send rounds; its result is the last round."""

        def last_result(state: RetryCallState) -> Any:
            return state.outcome.result() if state.outcome else None

        return AsyncRetrying(
            retry=retry_if_result(lambda last: bool(last.pending)),
            stop=self.send_stop(),
            wait=self.send_wait(),
            sleep=sleep,
            retry_error_callback=last_result,
        )

    # -- the broker ---------------------------------------------------------------------------

    def broker_retries(self) -> BrokerRetries:
        return BrokerRetries(
            max_retries=self.broker_max_retries,
            min_backoff=self.broker_min_backoff_ms,
            max_backoff=self.broker_max_backoff_ms,
        )

    # -- a Redis outage inside a worker -------------------------------------------------------

    def outage_stop(self) -> stop_base:
        return stop_after_delay(self.outage_budget_s)

    def outage_wait(self) -> wait_base:
        """0.2 s, 0.4 s, 0.8 s ... at most ``outage_max_wait_s``."""
        return wait_exponential(multiplier=self.outage_first_wait_s, max=self.outage_max_wait_s)

    def reconnecting(
        self,
        errors: tuple[type[BaseException], ...],
        what: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Retrying:
        """Tries again on ``errors`` until ``outage_budget_s`` has passed, then re-raises the last."""

        def warn(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            log.warning("%s: Redis unavailable (%s); retrying in %.1fs", what, type(exc).__name__, delay)

        return Retrying(
            retry=retry_if_exception_type(errors),
            stop=self.outage_stop(),
            wait=self.outage_wait(),
            sleep=sleep,
            before_sleep=warn,
            reraise=True,
        )
