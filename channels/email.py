"""Email through SendGrid's v3 Mail Send API.

``POST {base_url}/v3/mail/send`` with ``Authorization: Bearer <api key>`` and a JSON body holding
up to 1,000 personalizations (one per message here, so at most 1,000 recipients per request).

Per recipient (one personalization each):

- ``to``: the address; ``subject``: ``Message.subject`` (else the configured default);
- ``dynamic_template_data`` from ``Message.attributes`` when a dynamic template (``d-...``) is
  configured, otherwise ``substitutions`` (legacy tags such as ``-first_name-`` in the body);
- ``custom_args``: ``{"ref": <our opaque ref>}`` and nothing else: custom args cannot be
  redacted later, so they never hold an address or a name;
- ``headers``: ``List-Unsubscribe`` (the configured mailto and/or URL template, ``{ref}``
  replaced) and ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058).

Messages of one batch that share a body (and so content) go in one request; distinct bodies go in
separate requests (content is per request in SendGrid). :meth:`SendGridEmail.substitution_template`
turns a campaign's ``string.Template`` body into one body with substitution tags and per-recipient
``substitutions`` (:class:`Substitution`), so a batch personalized by name is still one request
and the engine does not render 1,000 bodies.

Results: 202 -> every message ``Sent`` with provider id ``<X-Message-Id>:<ref>``; 429 -> every
message ``Retryable`` with ``retry_after`` from ``Retry-After`` or ``X-RateLimit-Reset``; 5xx and
transport failures -> ``Retryable``; 400 whose errors name ``personalizations.<i>`` -> those
messages ``Permanent`` and the others resent once without them (SendGrid rejects the whole
request); 413 -> the request is split in halves; 401/403 -> raises ``ProviderAccountError`` (the
engine pauses the campaign); a 400 no message explains -> raises ``PermanentProviderError``.

``cost()`` is 1 per message: SendGrid's limits count requests and recipients, and a message is
one recipient. A rate limit on *requests* should divide by ``max_batch``.

Reconciliation (``lookup``) uses SendGrid's Email Activity API, a paid add-on: only when
``SendGridConfig.activity_api`` says the deployment has it (setting ``email_activity_api``;
otherwise ``can_lookup`` is false and every request is ``Undecided``). Each in-doubt request is
one ``GET /v3/messages?limit=10&query=unique_args['ref']="<ref>"`` (our ``custom_args`` carry the
ref, and nothing else identifies a recipient without the address): a message listed is
``Found(provider_id=<X-Message-Id>:<ref>)``, the form ``send`` gives (the activity feed's
``msg_id`` is the ``X-Message-Id`` followed by ``.filter...``). The feed lags by seconds to
minutes, so an empty answer is ``NotFound`` only for a request issued at least
``activity_lag_s`` ago, else ``Undecided("activity feed may lag")``. HTTP errors and timeouts
are ``Undecided``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode

import aiohttp
import orjson

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
)
from channels.errors import (
    ChannelConfigError,
    PermanentProviderError,
    ProviderAccountError,
    ProviderError,
    RetryableProviderError,
)
from channels.registry import ProviderSettings, ProviderSpec

__all__ = [
    "ACTIVITY_LAG_S",
    "MAX_PERSONALIZATIONS",
    "PROVIDER",
    "SendGridConfig",
    "SendGridEmail",
    "Substitution",
    "compile_substitution",
]

#: SendGrid's per-request limit on personalizations (and on recipients in total).
MAX_PERSONALIZATIONS: Final = 1000
_PERSONALIZATION_FIELD: Final = re.compile(r"^personalizations\.(\d+)")
#: Seconds the Email Activity feed may lag behind mail send: an empty answer for a request issued
#: more recently proves nothing.
ACTIVITY_LAG_S: Final = 120.0
#: Activity queries in flight at once (the Email Activity API's rate limit is low).
LOOKUP_CONCURRENCY: Final = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class SendGridConfig:
    """Where and as whom to send. ``base_url`` is ``https://api.sendgrid.com`` or a mock's URL."""

    base_url: str
    api_key: str
    from_email: str
    from_name: str | None = None
    default_subject: str | None = None
    #: A dynamic template id (``d-...``): attributes become ``dynamic_template_data``.
    template_id: str | None = None
    content_type: str = "text/plain"
    #: ``List-Unsubscribe`` targets; ``{ref}`` is replaced by the message's ref.
    unsubscribe_url: str | None = None
    unsubscribe_mailto: str | None = None
    timeout_s: float = 30.0
    #: Set only when the endpoint honours ``Idempotency-Key`` (an idempotent proxy, the mock with
    #: ``honour_idempotency``; SendGrid does not).
    honours_idempotency: bool = False
    #: The account has the Email Activity API (a paid add-on): reconciliation may look up.
    activity_api: bool = False
    #: Seconds an email may take to show in the activity feed (see ``ACTIVITY_LAG_S``).
    activity_lag_s: float = ACTIVITY_LAG_S

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ChannelConfigError("SendGridConfig.base_url must be an http(s) URL")
        if not self.api_key or not self.from_email:
            raise ChannelConfigError("SendGridConfig needs api_key and from_email")
        if self.unsubscribe_url is None and self.unsubscribe_mailto is None:
            raise ChannelConfigError(
                "SendGridConfig needs unsubscribe_url or unsubscribe_mailto: bulk senders must "
                "offer one-click unsubscribe (List-Unsubscribe)"
            )
        if self.timeout_s <= 0:
            raise ChannelConfigError("SendGridConfig.timeout_s must be positive")
        if self.activity_lag_s < 0:
            raise ChannelConfigError("SendGridConfig.activity_lag_s must not be negative")


@dataclass(frozen=True, slots=True)
class Substitution:
    """A ``string.Template`` body as SendGrid legacy substitutions: one body with a tag where each
    placeholder was, and each recipient's value per tag. What SendGrid sends a recipient is then
    exactly ``Template(body).safe_substitute(attributes)`` (an unknown name keeps its placeholder).
    """

    body: str
    #: (tag, attribute name, placeholder text kept when the recipient has no such attribute)
    tags: tuple[tuple[str, str, str], ...]

    def values(self, attributes: Mapping[str, str] | None) -> dict[str, str]:
        """One recipient's ``substitutions``."""
        if not attributes:
            return {tag: kept for tag, _, kept in self.tags}
        return {tag: str(attributes[name]) if name in attributes else kept for tag, name, kept in self.tags}


def compile_substitution(template: str) -> Substitution | None:
    """``template`` (``string.Template`` syntax) as substitution tags, or ``None`` when that would
    not give the same text: ``$$`` or a stray ``$`` (rendered differently without attributes), or a
    tag that also occurs in the template's own text."""
    pieces: list[str] = []
    tags: dict[str, tuple[str, str]] = {}
    placed: dict[str, int] = {}
    position = 0
    for match in string.Template.pattern.finditer(template):
        named, braced = match.group("named"), match.group("braced")
        name = named or braced
        if name is None:  # "$$" or an ill-formed "$"
            return None
        tag = f"-{name}-" if named else f"-{{{name}}}-"
        pieces.append(template[position : match.start()])
        pieces.append(tag)
        tags[tag] = (name, match.group(0))
        placed[tag] = placed.get(tag, 0) + 1
        position = match.end()
    pieces.append(template[position:])
    body = "".join(pieces)
    if any(body.count(tag) != count for tag, count in placed.items()):
        return None
    return Substitution(body, tuple((tag, name, kept) for tag, (name, kept) in tags.items()))


class SendGridEmail(Channel):
    """SendGrid v3 mail send: up to 1,000 recipients per request."""

    name = "email"
    provider = "sendgrid"
    max_batch = MAX_PERSONALIZATIONS
    messages_per_request = MAX_PERSONALIZATIONS

    def __init__(
        self, session: aiohttp.ClientSession, config: SendGridConfig, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._session = session
        self._config = config
        self._url = f"{config.base_url.rstrip('/')}/v3/mail/send"
        self._activity_url = f"{config.base_url.rstrip('/')}/v3/messages"
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self._clock = clock
        self.supports_idempotency = config.honours_idempotency
        self.can_lookup = config.activity_api
        self._attributes_key = "dynamic_template_data" if config.template_id else "substitutions"
        targets = []
        if config.unsubscribe_mailto:
            targets.append(f"<mailto:{config.unsubscribe_mailto}>")
        if config.unsubscribe_url:
            targets.append(f"<{config.unsubscribe_url}>")
        #: ``List-Unsubscribe`` split at each ``{ref}``: a message's header is ``ref.join(parts)``.
        self._unsubscribe_parts = ", ".join(targets).split("{ref}")

    @property
    def config(self) -> SendGridConfig:
        return self._config

    def substitution_template(self, template: str) -> Substitution | None:
        """The campaign body as substitutions (see :func:`compile_substitution`); ``None`` with a
        dynamic template (attributes are ``dynamic_template_data`` there) or when the body cannot
        be expressed with tags: the caller then renders each body itself."""
        if self._config.template_id:
            return None
        return compile_substitution(template)

    async def send(self, messages: Sequence[Message]) -> list[Result]:
        # Content is per request: one group per distinct body (a template ignores bodies).
        groups: dict[str, list[int]] = {}
        for index, message in enumerate(messages):
            groups.setdefault("" if self._config.template_id else message.body, []).append(index)
        chunks = [
            indices[start : start + MAX_PERSONALIZATIONS]
            for indices in groups.values()
            for start in range(0, len(indices), MAX_PERSONALIZATIONS)
        ]
        outcomes = await asyncio.gather(
            *(self._send_request([messages[i] for i in chunk], resend=True) for chunk in chunks),
            return_exceptions=True,
        )
        results: list[Result | None] = [None] * len(messages)
        for chunk, outcome in zip(chunks, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                raise outcome  # PermanentProviderError (bad key, bad sender) or a bug
            for index, result in zip(chunk, outcome, strict=True):
                results[index] = result
        return [result for result in results if result is not None]

    # -- one request ----------------------------------------------------------------------------

    def _personalization(self, message: Message) -> dict[str, Any]:
        ref = message.ref
        personalization: dict[str, Any] = {
            "to": [{"email": message.address}],
            "custom_args": {"ref": ref},
            "headers": self._unsubscribe_headers(ref),
        }
        subject = message.subject or self._config.default_subject
        if subject is not None:
            personalization["subject"] = subject
        if message.attributes:
            personalization[self._attributes_key] = dict(message.attributes)
        return personalization

    def _unsubscribe_headers(self, ref: str) -> dict[str, str]:
        # the header's parts around each {ref} are joined once in __init__ (one per message here)
        headers = {"List-Unsubscribe": ref.join(self._unsubscribe_parts)}
        if self._config.unsubscribe_url:  # one-click needs an HTTPS target to POST to
            headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        return headers

    def _payload(self, messages: Sequence[Message]) -> dict[str, Any]:
        config = self._config
        sender: dict[str, str] = {"email": config.from_email}
        if config.from_name:
            sender["name"] = config.from_name
        payload: dict[str, Any] = {
            "personalizations": [self._personalization(m) for m in messages],
            "from": sender,
        }
        if config.template_id:
            payload["template_id"] = config.template_id
        else:
            payload["content"] = [{"type": config.content_type, "value": messages[0].body}]
        return payload

    def _headers(self, messages: Sequence[Message]) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {self._config.api_key}",
            "Content-Type": "application/json",
        }
        if self.supports_idempotency:
            joined = "\n".join(sorted(m.idempotency_key for m in messages))
            headers["Idempotency-Key"] = hashlib.sha256(joined.encode()).hexdigest()
        return headers

    async def _send_request(self, messages: Sequence[Message], *, resend: bool) -> list[Result]:
        try:
            with translate_errors(self.provider):
                async with self._session.post(
                    self._url,
                    data=orjson.dumps(self._payload(messages)),
                    headers=self._headers(messages),
                    timeout=self._timeout,
                ) as response:
                    raw = await response.read()
                    status, headers = response.status, response.headers
        except RetryableProviderError as exc:
            return [retryable_from(m.ref, exc) for m in messages]
        return await self._results(messages, status, headers, raw, resend=resend)

    async def _results(
        self,
        messages: Sequence[Message],
        status: int,
        headers: Mapping[str, str],
        raw: bytes,
        *,
        resend: bool,
    ) -> list[Result]:
        if status in (200, 202):
            message_id = headers.get("X-Message-Id", "")
            return [Sent(m.ref, f"{message_id}:{m.ref}") for m in messages]
        if status == 429 or status >= 500:
            retry_after = _retry_after(headers)
            reason = "sendgrid: rate limited" if status == 429 else f"sendgrid: HTTP {status}"
            return [Retryable(m.ref, reason, status=status, retry_after=retry_after) for m in messages]
        if status == 413 and len(messages) > 1:
            half = len(messages) // 2
            first, second = await asyncio.gather(
                self._send_request(messages[:half], resend=resend),
                self._send_request(messages[half:], resend=resend),
            )
            return first + second
        errors = _errors(raw)
        if status in (401, 403):
            raise ProviderAccountError(
                f"sendgrid: HTTP {status} (check api_key and sender verification)", status=status
            )
        bad = {
            int(match.group(1))
            for error in errors
            if (match := _PERSONALIZATION_FIELD.match(str(error.get("field") or "")))
        }
        bad = {i for i in bad if i < len(messages)}
        if not bad:
            if status == 413:  # one recipient alone is too large: its content is
                return [Permanent(messages[0].ref, "413", "sendgrid: payload too large", status)]
            fields = sorted({str(error.get("field")) for error in errors})
            raise PermanentProviderError(f"sendgrid: request rejected (HTTP {status}, fields {fields})", status=status)
        results: list[Result | None] = [None] * len(messages)
        for i in bad:
            field = _field_of(errors, i)
            results[i] = Permanent(
                messages[i].ref,
                str(status),
                f"sendgrid: invalid personalization ({field})",
                status,
                suppress=field.endswith(".email"),
            )
        rest = [i for i in range(len(messages)) if i not in bad]
        if rest and resend:
            resent = await self._send_request([messages[i] for i in rest], resend=False)
            for i, result in zip(rest, resent, strict=True):
                results[i] = result
        else:
            for i in rest:
                reason = "sendgrid: request rejected for other recipients"
                results[i] = Retryable(messages[i].ref, reason, status=status)
        return [result for result in results if result is not None]

    # -- reconciliation -------------------------------------------------------------------------

    async def lookup(self, messages: Sequence[InFlight]) -> list[LookupResult]:
        if not self.can_lookup:
            return await super().lookup(messages)
        gate = asyncio.Semaphore(LOOKUP_CONCURRENCY)

        async def one(message: InFlight) -> LookupResult:
            async with gate:
                return await self._lookup_one(message)

        return list(await asyncio.gather(*(one(message) for message in messages)))

    async def _lookup_one(self, message: InFlight) -> LookupResult:
        ref = message.ref
        query = f"unique_args['ref']=\"{_quoted(ref)}\""
        url = f"{self._activity_url}?{urlencode({'limit': '10', 'query': query})}"
        try:
            with translate_errors(self.provider + " lookup"):
                async with self._session.get(
                    url, headers={"Authorization": f"Bearer {self._config.api_key}"}, timeout=self._timeout
                ) as response:
                    raw = await response.read()
                    status = response.status
        except ProviderError as exc:
            return Undecided(ref, str(exc))
        if status in (401, 403):
            return Undecided(ref, f"sendgrid lookup: HTTP {status} (is the Email Activity add-on enabled for the key?)")
        if status != 200:
            return Undecided(ref, f"sendgrid lookup: HTTP {status}")
        listed = (json_or_none(raw) or {}).get("messages")
        if not isinstance(listed, list):
            return Undecided(ref, "sendgrid lookup: unreadable answer")
        for item in listed:
            msg_id = item.get("msg_id") if isinstance(item, dict) else None
            if isinstance(msg_id, str) and msg_id:
                return Found(ref, f"{msg_id.split('.', 1)[0]}:{ref}")
        if self._clock() - message.issued_at >= self._config.activity_lag_s:
            return NotFound(ref)
        return Undecided(ref, "activity feed may lag")


def _quoted(value: str) -> str:
    """``value`` inside a double-quoted activity query string."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _errors(raw: bytes) -> list[Mapping[str, Any]]:
    payload = json_or_none(raw) or {}
    errors = payload.get("errors")
    if not isinstance(errors, list):
        return []
    return [error for error in errors if isinstance(error, dict)]


def _field_of(errors: Sequence[Mapping[str, Any]], index: int) -> str:
    for error in errors:
        field = str(error.get("field") or "")
        match = _PERSONALIZATION_FIELD.match(field)
        if match and int(match.group(1)) == index:
            return field
    return f"personalizations.{index}"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    retry_after = parse_retry_after(headers.get("Retry-After"))
    if retry_after is not None:
        return retry_after
    reset = headers.get("X-RateLimit-Reset")
    if reset and reset.strip().isdigit():
        return max(0.0, int(reset) - time.time())
    return None


def from_settings(session: aiohttp.ClientSession, settings: ProviderSettings) -> SendGridEmail:
    """The adapter from the ``email_*`` settings."""
    return SendGridEmail(
        session,
        SendGridConfig(
            base_url=settings.text("base_url"),
            api_key=settings.text("api_key"),
            from_email=settings.text("from"),
            unsubscribe_url=settings.text("unsubscribe_url"),
            honours_idempotency=settings.flag("honours_idempotency"),
            activity_api=settings.flag("activity_api"),
        ),
    )


#: SendGrid in the registry (``channels.standard.default_registry``). It has a lookup API, the
#: Email Activity API, but as a paid add-on: an adapter can look up only when the setting
#: ``email_activity_api`` says the account has it (``SendGridEmail.can_lookup``).
PROVIDER: Final = ProviderSpec(
    adapter=SendGridEmail,
    settings_section="email",
    factory=from_settings,
    idempotency_configurable=True,
    receipts="event_webhook",
    callback_path="/callbacks/sendgrid",
    lookup_api=True,
)
