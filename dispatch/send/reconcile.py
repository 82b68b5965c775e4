"""Deciding messages in doubt: requests that were issued and whose answer was never recorded.

A request is in doubt when its worker died with it on the wire, or when the provider's answer was
lost (a timeout or a connection cut after the request left). Resending it blindly duplicates the
message at a provider that ignores idempotency keys (Twilio, SendGrid, FCM), and dropping it may
miss a recipient. So the evidence is gathered first, in this order (the engine applies it):

1. this worker's own journal (it still knows the answer: a Redis blip lost the write);
2. a delivery receipt that arrived for the message (it was sent);
3. the provider honours our idempotency key: send again with the same key (the provider answers
   with the original message);
4. the provider's own lookup (:meth:`channels.base.Channel.lookup`: Twilio's Messages list,
   SendGrid's Email Activity API where the deployment has it): found -> sent; not found -> send
   again;
5. nothing can tell: wait for evidence up to ``in_doubt_wait_s`` after the request was issued
   when evidence may still come (the lookup failed and may work later; the provider posts
   delivery receipts), then apply the provider's policy (``Settings.in_doubt``): ``hold`` (failed
   and dead-lettered with code ``in_doubt``, counted in the campaign's ``in_doubt`` counter, for an
   operator: ``dispatch retry-failed`` sends them again), ``resend`` (accept a possible duplicate)
   or ``drop`` (failed with code ``in_doubt_dropped``: accept a possible miss).

Every decision is counted on ``dispatch_in_doubt_total{provider, resolution}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from channels.base import Channel, Found, InFlight, NotFound

__all__ = ["RESOLUTIONS", "Reconciler", "Verdict"]

#: What a verdict says: the message was sent; send it (again); it failed for good as ``code``;
#: wait for evidence (it stays in doubt, the batch comes back later).
Decision = Literal["sent", "send", "fail", "wait"]
#: Labels of ``dispatch_in_doubt_total``'s ``resolution``.
RESOLUTIONS: Final = (
    "journal",
    "receipt",
    "idempotent",
    "found",
    "not_found",
    "waiting",
    "held",
    "resent",
    "dropped",
)


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    #: Why (one of :data:`RESOLUTIONS`).
    resolution: str
    provider_id: str = ""
    #: The failure code of a ``fail`` verdict.
    code: str = ""


class Reconciler:
    """Turns the evidence about requests in doubt into verdicts (see the module doc)."""

    def __init__(
        self,
        *,
        policies: Mapping[str, str],
        wait_s: float,
        receipt_providers: frozenset[str] = frozenset(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policies = dict(policies)
        self._wait_s = wait_s
        self._receipt_providers = receipt_providers
        self._clock = clock

    def policy(self, provider: str) -> str:
        return self._policies.get(provider, self._policies.get("*", "hold"))

    async def decide(self, channel: Channel, flights: Sequence[InFlight], receipts: Sequence[bool]) -> list[Verdict]:
        """One verdict per request in doubt; ``receipts[i]``: a delivery receipt arrived for it."""
        verdicts: list[Verdict | None] = [None] * len(flights)
        ask: list[int] = []
        for i, has_receipt in enumerate(receipts):
            if has_receipt:
                verdicts[i] = Verdict("sent", "receipt")
            elif channel.supports_idempotency:
                verdicts[i] = Verdict("send", "idempotent")
            else:
                ask.append(i)
        if ask:
            answers = await channel.lookup([flights[i] for i in ask])
            now = self._clock()
            can_wait = channel.can_lookup or channel.provider in self._receipt_providers
            for i, answer in zip(ask, answers, strict=True):
                if isinstance(answer, Found):
                    verdicts[i] = Verdict("sent", "found", answer.provider_id)
                elif isinstance(answer, NotFound):
                    verdicts[i] = Verdict("send", "not_found")
                elif can_wait and now - flights[i].issued_at < self._wait_s:
                    verdicts[i] = Verdict("wait", "waiting")
                else:
                    verdicts[i] = self._by_policy(channel.provider)
        return [v if v is not None else Verdict("wait", "waiting") for v in verdicts]

    def _by_policy(self, provider: str) -> Verdict:
        action = self.policy(provider)
        if action == "resend":
            return Verdict("send", "resent")
        if action == "drop":
            return Verdict("fail", "dropped", code="in_doubt_dropped")
        return Verdict("fail", "held", code="in_doubt")
