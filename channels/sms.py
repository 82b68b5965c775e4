"""SMS through Twilio's Messages API.

One form-encoded ``POST {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json`` per message,
HTTP basic auth (AccountSid:AuthToken). ``StatusCallback`` is the configured URL with
``ref=<message.ref>`` appended, so delivery callbacks carry our opaque reference back. Every
request carries ``Idempotency-Key``: the mock provider (and an idempotent proxy) honour it, real
Twilio ignores it, so ``supports_idempotency`` follows ``TwilioConfig.honours_idempotency``.

Responses map to results as follows:

- 200/201: ``Sent(provider_id=<sid>)``
- 429: ``Retryable`` with ``retry_after`` from ``Retry-After``
- 5xx, timeouts, connection failures: ``Retryable`` (timeouts and lost connections are
  ``ambiguous``: the message may have gone out)
- other 4xx: ``Permanent(code=<Twilio error code>)``; ``suppress`` for codes that say the
  address is bad or opted out (21211, 21610, 21614)
- 401/403/404: the account is refused (credentials, account sid); ``send`` raises
  ``ProviderAccountError`` (the engine pauses the campaign)

Reconciliation (``lookup``): Twilio has no idempotency keys, so an in-doubt request is looked up
in the account's Messages list, ``GET .../Messages.json?To=<number>`` (plus ``From`` when a from
number is configured), newest first, paging back (``next_page_uri``) until ``date_created`` is
older than the earliest ``issued_at - LOOKUP_SKEW_S``. ``DateSent`` is not used: Twilio leaves
``date_sent`` null while a message is queued, so the filter would miss exactly the messages just
accepted. The Message resource does not show our ref (only the ``StatusCallback`` carries it),
so the evidence is the same ``to`` and ``body`` with ``date_created`` within ``LOOKUP_SKEW_S`` of
``issued_at``; when one lookup has several in-doubt requests with the same body to one number,
each listed message is claimed by at most one of them (the nearest in time first). A listed
match is ``Found(provider_id=<sid>)``; none is ``NotFound``; an HTTP error, timeout, or a number
with more than ``LOOKUP_MAX_PAGES`` pages in the window is ``Undecided`` (with a reason that
never holds the number).
"""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp

from channels._http import json_or_none, parse_retry_after, retryable_from, translate_errors
from channels.base import (
    Channel,
    Found,
    InFlight,
    LookupResult,
    Message,
    NotFound,
    Permanent,
    Result,
    Retryable,
    Sent,
    Undecided,
    send_each,
)
from channels.errors import (
    ChannelConfigError,
    ProviderAccountError,
    ProviderError,
    RetryableProviderError,
)
from channels.registry import ProviderSettings, ProviderSpec
from channels.segments import encoding, segments

__all__ = [
    "LOOKUP_MAX_PAGES",
    "LOOKUP_SKEW_S",
    "PROVIDER",
    "REROUTABLE_CODES",
    "SUPPRESS_CODES",
    "TWILIO_ERRORS",
    "TwilioConfig",
    "TwilioSms",
    "encoding",
    "segments",
    "with_ref",
]

#: Twilio error codes meaning the address itself cannot receive SMS: suppress it.
SUPPRESS_CODES: Final = frozenset({21211, 21610, 21614})

#: Twilio error codes about this account's reach, not the message (region not enabled, no route
#: from the sender): another provider may accept the message.
REROUTABLE_CODES: Final = frozenset({21408, 21612})

#: Short, PII-free descriptions of the Twilio error codes we expect (reasons end up in logs).
TWILIO_ERRORS: Final[Mapping[int, str]] = {
    20003: "authentication failed",
    20404: "resource not found",
    20429: "too many requests",
    21211: "invalid 'To' number",
    21408: "permission to send to this region not enabled",
    21602: "message body required",
    21603: "'From' or MessagingServiceSid required",
    21604: "'To' number required",
    21606: "'From' number cannot send SMS",
    21610: "recipient unsubscribed (STOP)",
    21612: "cannot route to this number from the sender",
    21614: "'To' is not a mobile number",
    21617: "body exceeds 1600 characters",
    30001: "queue overflow",
}

_MISCONFIGURED: Final = frozenset({401, 403, 404})

#: Seconds either side of ``issued_at`` a listed message's ``date_created`` may lie and still be
#: the in-doubt request: our clock and Twilio's differ, and a request waits in queues.
LOOKUP_SKEW_S: Final = 300.0
#: Pages of one number's messages a lookup reads at most; beyond, it is ``Undecided``.
LOOKUP_MAX_PAGES: Final = 20
#: Numbers looked up at once (Twilio's list API has its own, lower, concurrency limits).
LOOKUP_CONCURRENCY: Final = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class TwilioConfig:
    """Where and as whom to send. ``base_url`` is ``https://api.twilio.com`` or a mock's URL."""

    base_url: str
    account_sid: str
    auth_token: str
    from_number: str | None = None
    messaging_service_sid: str | None = None
    status_callback_url: str | None = None
    timeout_s: float = 10.0
    #: Set only when the endpoint honours ``Idempotency-Key`` (an idempotent proxy, the mock with
    #: ``honour_idempotency``; Twilio does not).
    honours_idempotency: bool = False
    #: ``PageSize`` of the Messages list lookups (Twilio: 1-1,000).
    lookup_page_size: int = 100

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ChannelConfigError("TwilioConfig.base_url must be an http(s) URL")
        if not self.account_sid or not self.auth_token:
            raise ChannelConfigError("TwilioConfig needs account_sid and auth_token")
        if not (self.from_number or self.messaging_service_sid):
            raise ChannelConfigError("TwilioConfig needs from_number or messaging_service_sid")
        if self.timeout_s <= 0:
            raise ChannelConfigError("TwilioConfig.timeout_s must be positive")
        if not 1 <= self.lookup_page_size <= 1000:
            raise ChannelConfigError("TwilioConfig.lookup_page_size must be from 1 to 1000")


def with_ref(url: str, ref: str) -> str:
    """``url`` with ``ref=<ref>`` added to its query string (existing parameters kept)."""
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), ("ref", ref)]
    return urlunsplit(parts._replace(query=urlencode(query)))


class TwilioSms(Channel):
    """Twilio Programmable Messaging: one request per message, a batch sent concurrently."""

    name = "sms"
    provider = "twilio"
    #: Messages one ``send`` call sends concurrently (one HTTP request each).
    max_batch = 100
    #: Twilio refuses bodies over 1,600 characters (error 21617).
    #: The Messages list answers reconciliation lookups.
    can_lookup = True

    def __init__(self, session: aiohttp.ClientSession, config: TwilioConfig) -> None:
        self._session = session
        self._config = config
        self._base_url = config.base_url.rstrip("/")
        self._url = f"{self._base_url}/2010-04-01/Accounts/{config.account_sid}/Messages.json"
        self._authorization = aiohttp.encode_basic_auth(config.account_sid, config.auth_token)
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self.supports_idempotency = config.honours_idempotency

    @property
    def config(self) -> TwilioConfig:
        return self._config

    def cost(self, message: Message) -> int:
        """Segments: what Twilio's rate limits and prices count."""
        return segments(message.body)

    async def send(self, messages: Sequence[Message]) -> list[Result]:
        return await send_each(self._send_one(message) for message in messages)

    def _form(self, message: Message) -> dict[str, str]:
        config = self._config
        form = {"To": message.address, "Body": message.body}
        if config.messaging_service_sid:
            form["MessagingServiceSid"] = config.messaging_service_sid
        if config.from_number:
            form["From"] = config.from_number
        if config.status_callback_url:
            form["StatusCallback"] = with_ref(config.status_callback_url, message.ref)
        return form

    async def _send_one(self, message: Message) -> Result:
        try:
            with translate_errors(self.provider):
                async with self._session.post(
                    self._url,
                    # pre-encoded: aiohttp's FormData for a dict costs more CPU than the request
                    data=urlencode(self._form(message)).encode(),
                    headers={
                        "Authorization": self._authorization,
                        "Content-Type": "application/x-www-form-urlencoded",
                        "Idempotency-Key": message.idempotency_key,
                    },
                    timeout=self._timeout,
                ) as response:
                    raw = await response.read()
                    return self._result(message.ref, response.status, response.headers, raw)
        except RetryableProviderError as exc:
            return retryable_from(message.ref, exc)

    def _result(self, ref: str, status: int, headers: Mapping[str, str], raw: bytes) -> Result:
        payload = json_or_none(raw) or {}
        if status in (200, 201):
            sid = payload.get("sid")
            if not isinstance(sid, str):
                # Accepted but unreadable: resending could duplicate, so it is not Retryable.
                return Permanent(ref, "no-sid", "twilio accepted without a message sid", status)
            return Sent(ref, sid)
        code = _code(payload)
        reason = _reason(code, status)
        if status == 429:
            return Retryable(ref, reason, status=status, retry_after=parse_retry_after(headers.get("Retry-After")))
        if status >= 500:
            return Retryable(ref, reason, status=status, retry_after=parse_retry_after(headers.get("Retry-After")))
        if status in _MISCONFIGURED:
            raise ProviderAccountError(
                f"twilio: {reason} (check account sid, auth token and base_url)",
                status=status,
                code=None if code is None else str(code),
            )
        return Permanent(
            ref,
            str(code if code is not None else status),
            reason,
            status,
            suppress=code in SUPPRESS_CODES,
            reroutable=code in REROUTABLE_CODES,
        )

    # -- reconciliation -------------------------------------------------------------------------

    async def lookup(self, messages: Sequence[InFlight]) -> list[LookupResult]:
        by_number: dict[str, list[int]] = {}
        for index, message in enumerate(messages):
            by_number.setdefault(message.address, []).append(index)
        results: list[LookupResult] = [Undecided(m.ref, "not looked up") for m in messages]
        gate = asyncio.Semaphore(LOOKUP_CONCURRENCY)

        async def one(number: str, indices: list[int]) -> None:
            async with gate:
                answers = await self._lookup_number(number, [messages[i] for i in indices])
            for index, answer in zip(indices, answers, strict=True):
                results[index] = answer

        await asyncio.gather(*(one(number, indices) for number, indices in by_number.items()))
        return results

    async def _lookup_number(self, number: str, group: Sequence[InFlight]) -> list[LookupResult]:
        since = min(m.issued_at for m in group) - LOOKUP_SKEW_S
        try:
            listed = await self._listed(number, since)
        except ProviderError as exc:
            return [Undecided(m.ref, str(exc)) for m in group]
        return match_listed(group, listed)

    async def _listed(self, number: str, since: float) -> list[Listed]:
        """The number's messages created at or after ``since`` (newest first)."""
        params = {"To": number, "PageSize": str(self._config.lookup_page_size)}
        if self._config.from_number:
            params["From"] = self._config.from_number
        url: str | None = f"{self._url}?{urlencode(params)}"
        listed: list[Listed] = []
        for _ in range(LOOKUP_MAX_PAGES):
            if url is None:
                return listed
            page = await self._page(url)
            items = page.get("messages")
            if not isinstance(items, list):
                raise RetryableProviderError("twilio lookup: unreadable messages page")
            older = False
            for item in items:
                entry = _listed_entry(item, self._config.messaging_service_sid)
                if entry is None:
                    continue
                if entry.created < since:
                    older = True
                    break
                listed.append(entry)
            next_uri = page.get("next_page_uri")
            url = None if older or not isinstance(next_uri, str) or not next_uri else self._base_url + next_uri
        if url is None:
            return listed
        raise RetryableProviderError(f"twilio lookup: more than {LOOKUP_MAX_PAGES} pages of messages to the number")

    async def _page(self, url: str) -> Mapping[str, Any]:
        with translate_errors(self.provider + " lookup"):
            async with self._session.get(
                url, headers={"Authorization": self._authorization}, timeout=self._timeout
            ) as response:
                raw = await response.read()
                status = response.status
        if status != 200:
            code = _code(json_or_none(raw) or {})
            raise ProviderError(f"twilio lookup: {_reason(code, status)} (HTTP {status})", status=status)
        payload = json_or_none(raw)
        if payload is None:
            raise ProviderError("twilio lookup: the answer is not JSON", status=status)
        return payload


@dataclass(frozen=True, slots=True)
class Listed:
    """A message of Twilio's Messages list, as reconciliation compares it."""

    sid: str
    body: str
    created: float


def _listed_entry(item: object, messaging_service_sid: str | None) -> Listed | None:
    if not isinstance(item, dict):
        return None
    sid, body, created = item.get("sid"), item.get("body"), item.get("date_created")
    if not (isinstance(sid, str) and isinstance(body, str) and isinstance(created, str)):
        return None
    if messaging_service_sid and item.get("messaging_service_sid") not in (None, messaging_service_sid):
        return None
    try:
        when = email.utils.parsedate_to_datetime(created).timestamp()
    except (TypeError, ValueError):
        return None
    return Listed(sid, body, when)


def match_listed(group: Sequence[InFlight], listed: Sequence[Listed]) -> list[LookupResult]:
    """Each in-doubt request of one number against the number's listed messages.

    A listed message is evidence for a request when its body is the request's and it was created
    within ``LOOKUP_SKEW_S`` of ``issued_at``; each listed message is claimed by one request at
    most, the requests taken in order of issue and each claiming its nearest unclaimed match.
    """
    claimed: set[str] = set()
    results: dict[int, LookupResult] = {}
    for index in sorted(range(len(group)), key=lambda i: group[i].issued_at):
        message = group[index]
        matches = [
            entry
            for entry in listed
            if entry.sid not in claimed
            and entry.body == message.body
            and abs(entry.created - message.issued_at) <= LOOKUP_SKEW_S
        ]
        if matches:
            best = min(matches, key=lambda entry: abs(entry.created - message.issued_at))
            claimed.add(best.sid)
            results[index] = Found(message.ref, best.sid)
        else:
            results[index] = NotFound(message.ref)
    return [results[i] for i in range(len(group))]


def _code(payload: Mapping[str, Any]) -> int | None:
    code = payload.get("code")
    if isinstance(code, int):
        return code
    if isinstance(code, str) and code.isdigit():
        return int(code)
    return None


def _reason(code: int | None, status: int) -> str:
    if code is None:
        return f"twilio: HTTP {status}"
    return f"twilio {code}: {TWILIO_ERRORS.get(code, 'error')}"


def from_settings(session: aiohttp.ClientSession, settings: ProviderSettings) -> TwilioSms:
    """The adapter from the ``sms_*`` settings; receipts go to the provider's callback URL."""
    return TwilioSms(
        session,
        TwilioConfig(
            base_url=settings.text("base_url"),
            account_sid=settings.text("account_sid"),
            auth_token=settings.text("auth_token"),
            from_number=settings.text("from"),
            status_callback_url=settings.callback_url,
            honours_idempotency=settings.flag("honours_idempotency"),
        ),
    )


#: Twilio in the registry (``channels.standard.default_registry``).
PROVIDER: Final = ProviderSpec(
    adapter=TwilioSms,
    settings_section="sms",
    factory=from_settings,
    idempotency_configurable=True,
    receipts="status_callback",
    callback_path="/callbacks/twilio",
    lookup_api=True,
)
