"""The channel contract: one async call sends a batch and returns one typed result per message.

A channel states its capabilities as class attributes (``max_batch``, ``messages_per_request``,
``supports_idempotency``) so the planner can shard for it and the predictor can cost it; what a
message may hold (body limits) is the channel spec's, in ``channels.registry``. It
never returns a bare bool: each message's outcome is ``Sent`` (with the provider's id),
``Retryable`` (with ``retry_after`` when the provider gave one) or ``Permanent`` (with the
provider's error code).

Reconciliation: when a worker died with requests on the wire, their fate is in doubt
(``InFlight``). Before anything is resent to a provider that ignores idempotency keys, the engine
asks the channel: ``lookup`` answers one ``LookupResult`` per request: ``Found`` (the provider has
it: it was sent), ``NotFound`` (the provider has no record: safe to send again) or ``Undecided``
(no lookup API, the lookup failed, or the provider's records may not be complete yet). A channel
with a lookup sets ``can_lookup``; the default answers ``Undecided`` for every request.
Lookups never put addresses into reasons, logs or exceptions.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

__all__ = [
    "Channel",
    "Found",
    "InFlight",
    "LookupResult",
    "Message",
    "NotFound",
    "Permanent",
    "Result",
    "Retryable",
    "Sent",
    "Undecided",
    "send_each",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One rendered message for one recipient, ready for a provider.

    ``ref`` is our opaque message reference (campaign, batch, index): it is what providers carry
    back in callbacks; never an address. ``idempotency_key`` is stable across retries and
    redeliveries of the same message.
    """

    ref: str
    address: str
    body: str
    idempotency_key: str
    subject: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Sent:
    """The provider accepted the message."""

    ref: str
    provider_id: str


@dataclass(frozen=True, slots=True)
class Retryable:
    """A transient failure; try again (after ``retry_after`` seconds if the provider said)."""

    ref: str
    reason: str
    status: int | None = None
    retry_after: float | None = None
    #: True when the provider may have accepted the message anyway (timeout, connection lost
    #: after the request went out): resending is safe only with an honoured idempotency key.
    ambiguous: bool = False


@dataclass(frozen=True, slots=True)
class Permanent:
    """The provider rejected the message for good (invalid number, unsubscribed, ...)."""

    ref: str
    code: str
    reason: str
    status: int | None = None
    #: True when the address itself is bad or opted out and should be suppressed.
    suppress: bool = False
    #: True when the refusal is about this provider's reach (a region it does not serve, its own
    #: per-number cap), not the message: another provider may accept it (failover).
    reroutable: bool = False


Result = Sent | Retryable | Permanent


@dataclass(frozen=True, slots=True)
class InFlight:
    """A request whose fate is in doubt: it was on the wire when its worker died."""

    #: Our opaque ref (campaign.batch.index).
    ref: str
    address: str
    #: The rendered body as it was sent.
    body: str
    subject: str | None
    idempotency_key: str
    #: Epoch seconds when the request was issued.
    issued_at: float


@dataclass(frozen=True, slots=True)
class Found:
    """The provider has the message: it was sent (``provider_id`` as ``send`` would give it)."""

    ref: str
    provider_id: str


@dataclass(frozen=True, slots=True)
class NotFound:
    """The provider has no record of the message: safe to send again."""

    ref: str


@dataclass(frozen=True, slots=True)
class Undecided:
    """Cannot tell (no lookup API, the lookup failed, the provider's records may lag)."""

    ref: str
    reason: str


LookupResult = Found | NotFound | Undecided


async def send_each(requests: Iterable[Awaitable[Result]]) -> list[Result]:
    """Run one request per message concurrently, for per-message APIs.

    Every request finishes before anything is raised (no task is left running); a
    ``ProviderError`` of the call as a whole (bad credentials) or a bug is then re-raised.
    """
    outcomes = await asyncio.gather(*requests, return_exceptions=True)
    results: list[Result] = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(outcome)
    return results


class Channel(ABC):
    """A provider adapter. Subclasses set the capability attributes and implement ``send``."""

    #: The channel it serves (a name in the registry, ``channels.registry``): "sms", "email", ...
    name: ClassVar[str]
    #: Provider label used in metrics (bounded cardinality).
    provider: ClassVar[str]
    #: Most messages one ``send`` call should get (the provider's batch API limit, or a
    #: per-message API's sensible chunk).
    max_batch: ClassVar[int] = 100
    #: Messages one provider *request* carries (1 for per-message APIs; SendGrid: 1,000). The
    #: engine bounds in-flight requests, so it hands a channel this many messages per call.
    messages_per_request: ClassVar[int] = 1
    #: Whether the provider honours our idempotency key (so an in-flight message whose worker
    #: died may be resent safely with the same key). A plain attribute, not a ClassVar: an
    #: instance may set it from its configuration (Twilio honours the key only behind a proxy
    #: or mock that implements it).
    supports_idempotency: bool = False
    #: Whether ``lookup`` can ask the provider what it has (a plain attribute, like
    #: ``supports_idempotency``: SendGrid's lookup needs a paid add-on the configuration enables).
    can_lookup: bool = False

    def cost(self, message: Message) -> int:
        """Rate-limit units one message costs (SMS: segments). Default: 1."""
        return 1

    @abstractmethod
    async def send(self, messages: Sequence[Message]) -> list[Result]:
        """Send ``messages``; return exactly one result per message, in the same order.

        Raises ``ProviderError`` subclasses only for failures of the call as a whole that the
        channel could not attribute to messages.
        """

    async def lookup(self, messages: Sequence[InFlight]) -> list[LookupResult]:
        """Ask the provider about in-doubt requests: one result per message, in the same order.

        Never raises for a provider failure: that is ``Undecided`` with a reason (no address in it).
        The default (no lookup API) answers ``Undecided`` for each.
        """
        return [Undecided(message.ref, "no lookup API") for message in messages]

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources the channel owns (not a shared HTTP session)."""
