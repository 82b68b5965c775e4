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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp

from channels._http import json_or_none, parse_retry_after, retryable_from, translate_errors
from channels.base import Channel, Message, Permanent, Result, Retryable, Sent, send_each
from channels.errors import (
    ChannelConfigError,
    ProviderAccountError,
    RetryableProviderError,
)
from channels.registry import ProviderSettings, ProviderSpec
from channels.segments import encoding, segments

__all__ = [
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
    #: Set only when the endpoint honours ``Idempotency-Key`` (the mock does, Twilio does not).
    honours_idempotency: bool = False

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ChannelConfigError("TwilioConfig.base_url must be an http(s) URL")
        if not self.account_sid or not self.auth_token:
            raise ChannelConfigError("TwilioConfig needs account_sid and auth_token")
        if not (self.from_number or self.messaging_service_sid):
            raise ChannelConfigError("TwilioConfig needs from_number or messaging_service_sid")
        if self.timeout_s <= 0:
            raise ChannelConfigError("TwilioConfig.timeout_s must be positive")


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

    def __init__(self, session: aiohttp.ClientSession, config: TwilioConfig) -> None:
        self._session = session
        self._config = config
        self._url = f"{config.base_url.rstrip('/')}/2010-04-01/Accounts/{config.account_sid}/Messages.json"
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
