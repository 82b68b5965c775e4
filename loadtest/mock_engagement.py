"""Mock recipients: opens, clicks, replies and opt-outs at configured rates, with ground truth.

Given the messages a mock provider accepted (:class:`Accepted`: ref, channel, address, the body
as sent; :class:`AcceptedLog` collects them from a running mock), :class:`EngagementEmitter`
decides per message, with its own seeded RNG, what the recipient does
(:class:`EngagementRates`) and does it over real HTTP, as the real parties would:

- email: SendGrid's signed event webhook (ECDSA, as ``mock_sendgrid``) with ``open`` (or
  ``open`` + ``sg_machine_open: true``), ``click``, ``unsubscribe`` events carrying the ref in
  their custom args, sent in one signed batch per call;
- SMS: a click requests every ``/r/<token>`` link found in the body (GET, a phone browser's
  User-Agent, redirects not followed); a reply or an opt-out is a Twilio inbound-message webhook
  (signed ``X-Twilio-Signature``) from the recipient's number, ``STOP`` or a text.

:attr:`EngagementEmitter.truth` is, per ref, the set of ledger events the emitted traffic must
produce, and :meth:`EngagementEmitter.counts` their totals per event, so a test compares the
ledger with it exactly. Each number must have received one message (a reply is credited to a
number's last message).
"""

from __future__ import annotations

import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp
import orjson
from cryptography.hazmat.primitives.asymmetric import ec

from channels.receipts import twilio_signature
from loadtest.mock_sendgrid import sign_sendgrid_events

__all__ = ["HUMAN_USER_AGENT", "Accepted", "AcceptedLog", "EngagementEmitter", "EngagementRates"]

#: A phone browser's User-Agent (a human click).
HUMAN_USER_AGENT = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
_TRACKED = re.compile(r"https?://\S+?/r/[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class EngagementRates:
    """Probabilities per message (each drawn independently; reply and opt-out exclude each other)."""

    p_open: float = 0.0
    p_machine_open: float = 0.0
    p_click: float = 0.0
    p_reply: float = 0.0
    p_optout: float = 0.0


@dataclass(frozen=True, slots=True)
class Accepted:
    ref: str
    channel: str
    address: str
    body: str = ""


@dataclass
class AcceptedLog:
    """The messages a mock provider accepted: ``mock.on_accept(log)`` (``MockProvider.on_accept``)."""

    accepted: list[Accepted] = field(default_factory=list)

    def __call__(self, channel: str, ref: str | None, address: str, body: str) -> None:
        if ref is not None:  # a message without our ref cannot be engaged with in the ledger
            self.accepted.append(Accepted(ref, channel, address, body))

    def take(self) -> list[Accepted]:
        """The messages accepted since the last call (one round's)."""
        taken, self.accepted = self.accepted, []
        return taken


@dataclass
class EngagementEmitter:
    """Emits engagement for accepted messages to our endpoints; remembers what it emitted."""

    session: aiohttp.ClientSession
    rates: EngagementRates
    seed: int = 0
    sendgrid_url: str | None = None
    sendgrid_key: ec.EllipticCurvePrivateKey | None = None
    twilio_inbound_url: str | None = None
    twilio_auth_token: str | None = None
    twilio_number: str = "+15005550006"
    #: ref -> ledger events the emitted traffic must produce.
    truth: dict[str, set[str]] = field(default_factory=dict)
    #: HTTP answers that were not a success (a test asserts there are none).
    failures: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def counts(self) -> Counter[str]:
        """Messages per ledger event in :attr:`truth`."""
        return Counter(event for events in self.truth.values() for event in events)

    async def emit(self, accepted: Iterable[Accepted], rates: EngagementRates | None = None) -> None:
        """One round: decide and emit each message's engagement (``rates`` replaces the default)."""
        chosen = rates or self.rates
        emails: list[dict[str, object]] = []
        for message in accepted:
            events = self.truth.setdefault(message.ref, set())
            if message.channel == "email":
                emails.extend(self._email(message, chosen, events))
            elif message.channel == "sms":
                await self._sms(message, chosen, events)
        if emails:
            await self._send_sendgrid(emails)

    def _draw(self, p: float) -> bool:
        return self._rng.random() < p

    def _email(self, message: Accepted, rates: EngagementRates, events: set[str]) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        base = {"email": message.address, "ref": message.ref, "timestamp": int(time.time())}
        if self._draw(rates.p_machine_open):
            out.append({**base, "event": "open", "sg_machine_open": True, "sg_event_id": secrets.token_hex(8)})
            events.add("machine_open")
        if self._draw(rates.p_open):
            out.append({**base, "event": "open", "sg_machine_open": False, "sg_event_id": secrets.token_hex(8)})
            events.add("open")
        if self._draw(rates.p_click):
            out.append({**base, "event": "click", "url": "https://example.com/", "sg_event_id": secrets.token_hex(8)})
            events.add("click")
        if self._draw(rates.p_optout):
            out.append({**base, "event": "unsubscribe", "sg_event_id": secrets.token_hex(8)})
            events.add("optout")
        return out

    async def _sms(self, message: Accepted, rates: EngagementRates, events: set[str]) -> None:
        if self._draw(rates.p_click):
            links = _TRACKED.findall(message.body)
            for link in links:
                async with self.session.get(
                    link, headers={"User-Agent": HUMAN_USER_AGENT}, allow_redirects=False
                ) as response:
                    if response.status != 302:
                        self.failures.append(response.status)
            if links:
                events.add("click")
        if self._draw(rates.p_optout):
            await self._inbound(message.address, "STOP")
            events.add("optout")
        elif self._draw(rates.p_reply):
            await self._inbound(message.address, "Thanks, see you there")
            events.add("reply")

    async def _inbound(self, phone: str, body: str) -> None:
        assert self.twilio_inbound_url is not None and self.twilio_auth_token is not None
        params = {
            "From": phone,
            "To": self.twilio_number,
            "Body": body,
            "MessageSid": "SM" + secrets.token_hex(16),
            "AccountSid": "AC" + "0" * 32,
            "NumMedia": "0",
        }
        signature = twilio_signature(self.twilio_inbound_url, params, self.twilio_auth_token)
        async with self.session.post(
            self.twilio_inbound_url,
            data=urlencode(params),
            headers={"X-Twilio-Signature": signature, "Content-Type": "application/x-www-form-urlencoded"},
        ) as response:
            if response.status != 200:
                self.failures.append(response.status)

    async def _send_sendgrid(self, events: Sequence[dict[str, object]]) -> None:
        assert self.sendgrid_url is not None and self.sendgrid_key is not None
        body = orjson.dumps(list(events))
        async with self.session.post(
            self.sendgrid_url, data=body, headers=sign_sendgrid_events(self.sendgrid_key, body)
        ) as response:
            if response.status != 204:
                self.failures.append(response.status)
