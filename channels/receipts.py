r"""Delivery receipts: verify provider callbacks and parse them into typed ``Receipt``s.

Three endpoints (``receipt_routes``):

- ``POST /callbacks/twilio``: Twilio ``StatusCallback`` (form-encoded). ``X-Twilio-Signature`` is
  base64(HMAC-SHA1(auth token, public URL + POST params sorted by name, name+value each)). The
  URL is ``public_base_url`` + the request's raw path and query (as Twilio called it, proxies
  notwithstanding); our ``ref`` rides in that query (``?ref=``, see ``channels.sms``). Twilio signs
  some callbacks over the URL with its scheme's default port written out (``:443``/``:80``) and
  some without, so a signature over either form is accepted (its own validators do the same);
  a URL with another port has only the one form.
- ``POST /callbacks/sendgrid``: a batch of SendGrid events (JSON list). ECDSA P-256/SHA-256
  signature over timestamp + raw body in ``X-Twilio-Email-Event-Webhook-Signature`` (base64
  DER), time in ``X-Twilio-Email-Event-Webhook-Timestamp``; the verification key is the
  base64 DER public key SendGrid shows. Our ``ref`` is the event's custom arg.
- ``POST /callbacks/webhook``: our own receipts, ``{"events": [{"ref", "status",
  "provider_id", "code", "occurred_at", "event_id"}]}`` signed as in ``channels.signing``.

Refusals change nothing (``on_receipts`` is not called): a body over the bound -> 413; a forged,
altered or stale (timestamp outside tolerance) callback -> 401; a replay of a callback already
processed -> 403. The ``ReplayGuard`` remembers, for ``replay_ttl_s``, what the signature
vouches for in canonical form, never the signature header's text (which a replayer can vary
without the secret: ``v1=`` lists, an ECDSA ``(r, n - s)``, the other port form of a Twilio
URL): the request path and parsed form for Twilio, the timestamp (as a number) and a hash of the
raw body for SendGrid and our webhook receipts. If ``on_receipts`` fails the replay mark is
released and the provider gets 500, so its retry is processed. Twilio callbacks carry no
timestamp, so only the replay guard bounds their reuse.

Engagement (``on_engagement``, optional): the SendGrid route also turns ``open`` (with
``sg_machine_open: true`` a ``machine_open``), ``click``, ``unsubscribe``/``group_unsubscribe``
(``optout``) and ``spamreport`` into :class:`EngagementEvent`\ s; two more routes take inbound
replies, which name no ref (the consumer finds the recipient's last message):

- ``POST /callbacks/twilio/inbound``: Twilio's inbound-message webhook (form: ``From``, ``To``,
  ``Body``, ``MessageSid``), signed with ``X-Twilio-Signature`` exactly as the status callback;
  the replay key is the ``MessageSid``; answered with empty TwiML (no automatic reply).
- ``POST /callbacks/aliyun/replies?token=SECRET``: Aliyun's SMS reply push (``SmsUp``: a JSON
  list of ``{phone_number, content, send_time, sign_name, dest_code, sequence_id}``). Aliyun
  signs nothing it pushes to an HTTP URL, so the route is authenticated by a secret of ours in
  the URL's query (compared in constant time; the access log never shows a query string), and
  a push is processed once by its replies' ``sequence_id``\ s (or a hash of the body when one
  is missing). Aliyun retries any answer but a 200 (1, 5 and 10 minutes later), so the route
  answers ``200 {"code": 0}``, to a repeat of a processed push too. Run it behind TLS;
  restricting the source addresses to Aliyun's at the proxy adds a second lock.

An :class:`EngagementEvent` carries the recipient's ``address`` only where the consumer needs
it (an opt-out to suppress, a reply to find its message by): never log or label it.

Each ``Receipt`` names the ``channel`` whose messages its provider sends: the consumer applies it
only to a message of that channel (a Twilio callback never touches an email).

Receipts can still arrive twice (providers deliver at least once, and a provider's own retry is
re-signed) and out of order: ``Receipt.event_key`` identifies the event for the consumer's dedup,
``occurred_at`` orders it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Final, Literal, Protocol
from urllib.parse import parse_qsl, urlsplit

import orjson
import redis.asyncio as aredis
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from channels.email import SendGridEmail
from channels.errors import ChannelConfigError
from channels.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_webhook
from channels.sms import TwilioSms
from channels.webhook import SignedWebhook

__all__ = [
    "ALIYUN_REPLY_TOKEN_PARAM",
    "SENDGRID_SIGNATURE_HEADER",
    "SENDGRID_TIMESTAMP_HEADER",
    "TWILIO_SIGNATURE_HEADER",
    "EngagementEvent",
    "InboundReply",
    "MemoryReplayGuard",
    "OnEngagement",
    "OnReceipts",
    "Receipt",
    "ReceiptStatus",
    "RedisReplayGuard",
    "ReplayGuard",
    "load_sendgrid_public_key",
    "parse_aliyun_replies",
    "parse_sendgrid_engagement",
    "parse_sendgrid_events",
    "parse_twilio_callback",
    "parse_twilio_inbound",
    "parse_webhook_receipts",
    "receipt_routes",
    "twilio_signature",
    "twilio_url_forms",
    "verify_sendgrid_signature",
    "verify_twilio_signature",
]

ReceiptStatus = Literal["delivered", "failed", "bounced", "sent"]

TWILIO_SIGNATURE_HEADER: Final = "X-Twilio-Signature"
SENDGRID_SIGNATURE_HEADER: Final = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER: Final = "X-Twilio-Email-Event-Webhook-Timestamp"

_TWILIO_STATUS: Final[Mapping[str, ReceiptStatus]] = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "failed": "failed",
    "undelivered": "failed",
}
_SENDGRID_EVENT: Final[Mapping[str, ReceiptStatus]] = {
    "processed": "sent",
    "delivered": "delivered",
    "bounce": "bounced",
    "blocked": "bounced",
    "dropped": "failed",
}
_STATUSES: Final = frozenset({"delivered", "failed", "bounced", "sent"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """One delivery event for one of our messages."""

    ref: str
    provider: str
    #: The channel whose messages ``provider`` sends (a receipt applies to no other channel's).
    channel: str
    provider_id: str | None
    status: ReceiptStatus
    code: str | None
    occurred_at: float
    #: Identifies the event (not the request): equal keys are the same event delivered twice.
    event_key: str


EngagementKind = Literal["open", "machine_open", "click", "optout", "spamreport"]

#: SendGrid engagement events -> ours (``open`` becomes ``machine_open`` with ``sg_machine_open``).
_SENDGRID_ENGAGEMENT: Final[Mapping[str, EngagementKind]] = {
    "open": "open",
    "click": "click",
    "unsubscribe": "optout",
    "group_unsubscribe": "optout",
    "spamreport": "spamreport",
}
#: The query parameter holding the Aliyun reply route's secret.
ALIYUN_REPLY_TOKEN_PARAM: Final = "token"


@dataclass(frozen=True, slots=True, kw_only=True)
class EngagementEvent:
    """What a recipient did with one of our messages (named by ``ref``)."""

    ref: str
    event: EngagementKind
    channel: str
    occurred_at: float
    #: The address to suppress (``optout`` and ``spamreport`` only; never logged).
    address: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundReply:
    """An SMS a recipient sent back: no ref, only the number (never logged) and the text."""

    provider: str
    phone: str
    body: str
    occurred_at: float


class ReceiptError(ValueError):
    """A verified callback whose content cannot be understood (answered 400)."""


# -- signatures ---------------------------------------------------------------------------------


def twilio_signature(url: str, params: Mapping[str, str], auth_token: str) -> str:
    """The ``X-Twilio-Signature`` Twilio computes for a POST of ``params`` to ``url``."""
    payload = url + "".join(f"{name}{params[name]}" for name in sorted(params))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


#: Ports a URL may leave out (Twilio signs with and without them).
_DEFAULT_PORTS: Final[Mapping[str, int]] = {"https": 443, "http": 80}


def twilio_url_forms(url: str) -> list[str]:
    """``url`` as given and, when its port is its scheme's default (stated or not), the other
    spelling: ``https://h/p`` and ``https://h:443/p``. Any other port has only the one form."""
    parts = urlsplit(url)
    default = _DEFAULT_PORTS.get(parts.scheme.lower())
    start = len(parts.scheme) + 3  # after "scheme://": the rest of the URL is kept byte for byte
    if default is None or not parts.hostname or url[start : start + len(parts.netloc)] != parts.netloc:
        return [url]
    try:
        port = parts.port
    except ValueError:
        return [url]
    if port is None and not parts.netloc.endswith(":"):
        other = f"{parts.netloc}:{default}"
    elif port == default:
        other = parts.netloc.rsplit(":", 1)[0]
    else:
        return [url]
    return [url, url[:start] + other + url[start + len(parts.netloc) :]]


def verify_twilio_signature(url: str, params: Mapping[str, str], signature: str | None, auth_token: str) -> bool:
    """True when ``signature`` is Twilio's over ``url`` in one of its ``twilio_url_forms``."""
    if not signature:
        return False
    given = signature.encode()
    # every form is compared (no early exit): timing says nothing about which one matched
    matches = [
        hmac.compare_digest(twilio_signature(form, params, auth_token).encode(), given)
        for form in twilio_url_forms(url)
    ]
    return any(matches)


def load_sendgrid_public_key(key: str) -> ec.EllipticCurvePublicKey:
    """SendGrid's verification key (base64 DER, as its settings page shows it, or PEM)."""
    try:
        if key.lstrip().startswith("-----BEGIN"):
            loaded = serialization.load_pem_public_key(key.encode())
        else:
            loaded = serialization.load_der_public_key(base64.b64decode(key))
    except (ValueError, binascii.Error) as exc:
        raise ChannelConfigError("sendgrid_public_key is not a valid public key") from exc
    if not isinstance(loaded, ec.EllipticCurvePublicKey):
        raise ChannelConfigError("sendgrid_public_key must be an elliptic-curve (P-256) key")
    return loaded


def verify_sendgrid_signature(
    public_key: ec.EllipticCurvePublicKey,
    payload: bytes,
    signature: str | None,
    timestamp: str | None,
) -> bool:
    """ECDSA/SHA-256 over ``timestamp + payload``; ``signature`` is base64 DER."""
    if not signature or not timestamp:
        return False
    try:
        public_key.verify(
            base64.b64decode(signature, validate=True),
            timestamp.encode() + payload,
            ec.ECDSA(hashes.SHA256()),
        )
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


# -- replay guard -------------------------------------------------------------------------------


class ReplayGuard(Protocol):
    """Remembers processed callbacks: ``claim`` is True only the first time for a key."""

    async def claim(self, key: str, ttl_s: int) -> bool: ...

    async def release(self, key: str) -> None: ...


def _guard_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class RedisReplayGuard:
    """``SET key 1 NX EX ttl``: shared by every process that receives callbacks."""

    def __init__(self, client: aredis.Redis, *, prefix: str = "dispatch:callback-seen:") -> None:
        self._client = client
        self._prefix = prefix

    async def claim(self, key: str, ttl_s: int) -> bool:
        stored = await self._client.set(self._prefix + _guard_key(key), b"1", nx=True, ex=ttl_s)
        return bool(stored)

    async def release(self, key: str) -> None:
        await self._client.delete(self._prefix + _guard_key(key))


class MemoryReplayGuard:
    """One process's guard (a single receiver, tests of other parts, the mock's own use)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._expiry: dict[str, float] = {}

    async def claim(self, key: str, ttl_s: int) -> bool:
        now = self._clock()
        digest = _guard_key(key)
        if self._expiry.get(digest, 0.0) > now:
            return False
        if len(self._expiry) > 100_000:
            self._expiry = {k: t for k, t in self._expiry.items() if t > now}
        self._expiry[digest] = now + ttl_s
        return True

    async def release(self, key: str) -> None:
        self._expiry.pop(_guard_key(key), None)


# -- parsing ------------------------------------------------------------------------------------


def parse_twilio_callback(params: Mapping[str, str], ref: str | None, *, now: float | None = None) -> list[Receipt]:
    """A Twilio status callback as receipts (none for queued/sending/accepted)."""
    status = _TWILIO_STATUS.get(params.get("MessageStatus", ""))
    if status is None:
        return []
    if not ref:
        raise ReceiptError("twilio callback without a ref in its URL")
    sid = params.get("MessageSid") or params.get("SmsSid")
    code = params.get("ErrorCode") or None
    return [
        Receipt(
            ref=ref,
            provider=TwilioSms.provider,
            channel=TwilioSms.name,
            provider_id=sid,
            status=status,
            code=code,
            occurred_at=time.time() if now is None else now,
            event_key=f"twilio:{sid}:{params.get('MessageStatus')}",
        )
    ]


def parse_sendgrid_events(events: Any) -> list[Receipt]:
    """SendGrid's event batch as receipts; events without our ref or status are skipped."""
    if not isinstance(events, list):
        raise ReceiptError("sendgrid events must be a JSON list")
    receipts = []
    for event in events:
        if not isinstance(event, dict):
            continue
        name = str(event.get("event", ""))
        status = _SENDGRID_EVENT.get(name)
        if name == "bounce" and event.get("type") == "blocked":
            status = "bounced"
        ref = event.get("ref")
        if status is None or not isinstance(ref, str):
            continue
        message_id = event.get("sg_message_id")
        code = event.get("status") if status in ("bounced", "failed") else None
        if status == "failed" and code is None:
            code = name
        timestamp = event.get("timestamp")
        receipts.append(
            Receipt(
                ref=ref,
                provider=SendGridEmail.provider,
                channel=SendGridEmail.name,
                provider_id=message_id if isinstance(message_id, str) else None,
                status=status,
                code=None if code is None else str(code),
                occurred_at=float(timestamp) if isinstance(timestamp, int | float) else time.time(),
                event_key=f"sendgrid:{message_id or ref}:{name}",
            )
        )
    return receipts


def parse_sendgrid_engagement(events: Any) -> list[EngagementEvent]:
    """SendGrid's opens, clicks, unsubscribes and spam reports that carry our ref."""
    if not isinstance(events, list):
        raise ReceiptError("sendgrid events must be a JSON list")
    out = []
    for event in events:
        if not isinstance(event, dict):
            continue
        kind = _SENDGRID_ENGAGEMENT.get(str(event.get("event", "")))
        ref = event.get("ref")
        if kind is None or not isinstance(ref, str):
            continue
        if kind == "open" and event.get("sg_machine_open") is True:
            kind = "machine_open"
        timestamp = event.get("timestamp")
        email = event.get("email")
        out.append(
            EngagementEvent(
                ref=ref,
                event=kind,
                channel=SendGridEmail.name,
                occurred_at=float(timestamp) if isinstance(timestamp, int | float) else time.time(),
                address=email if kind in ("optout", "spamreport") and isinstance(email, str) else None,
            )
        )
    return out


def parse_twilio_inbound(params: Mapping[str, str], *, now: float | None = None) -> InboundReply:
    """Twilio's inbound-message webhook as a reply."""
    phone = params.get("From", "")
    if not phone:
        raise ReceiptError("twilio inbound message without From")
    return InboundReply(
        provider=TwilioSms.provider,
        phone=phone,
        body=params.get("Body", ""),
        occurred_at=time.time() if now is None else now,
    )


def parse_aliyun_replies(payload: Any, *, now: float | None = None) -> list[InboundReply]:
    """Aliyun's ``SmsUp`` push: a JSON list of replies (``phone_number``, ``content``, ...)."""
    if not isinstance(payload, list):
        raise ReceiptError("aliyun replies must be a JSON list")
    out = []
    for item in payload:
        if not isinstance(item, dict):
            raise ReceiptError("each aliyun reply must be an object")
        phone, content = item.get("phone_number"), item.get("content")
        if not isinstance(phone, str) or not phone or not isinstance(content, str):
            raise ReceiptError("each aliyun reply needs phone_number and content")
        out.append(
            InboundReply(
                provider="aliyun",
                phone=phone,
                body=content,
                occurred_at=_aliyun_time(item.get("send_time"), now),
            )
        )
    return out


def _aliyun_time(value: Any, now: float | None) -> float:
    """``send_time`` is ``YYYY-MM-DD HH:MM:SS`` in Beijing time (UTC+8)."""
    if isinstance(value, str):
        try:
            parsed = datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=_BEIJING)
        except ValueError:
            pass
        else:
            return parsed.timestamp()
    return time.time() if now is None else now


_BEIJING: Final = timezone(timedelta(hours=8))


def parse_webhook_receipts(payload: Any) -> list[Receipt]:
    """Our signed receipts: ``{"events": [{"ref", "status", ...}]}``."""
    events = payload.get("events") if isinstance(payload, dict) else None
    if not isinstance(events, list):
        raise ReceiptError('webhook receipts must be {"events": [...]}')
    receipts = []
    for event in events:
        if not isinstance(event, dict):
            raise ReceiptError("each webhook receipt must be an object")
        ref, status = event.get("ref"), event.get("status")
        if not isinstance(ref, str) or status not in _STATUSES:
            raise ReceiptError("each webhook receipt needs a ref and a known status")
        provider_id, code = event.get("provider_id"), event.get("code")
        occurred = event.get("occurred_at")
        event_id = event.get("event_id")
        receipts.append(
            Receipt(
                ref=ref,
                provider=SignedWebhook.provider,
                channel=SignedWebhook.name,
                provider_id=provider_id if isinstance(provider_id, str) else None,
                status=status,
                code=code if isinstance(code, str) else None,
                occurred_at=float(occurred) if isinstance(occurred, int | float) else time.time(),
                event_key=f"webhook:{event_id}" if event_id else f"webhook:{ref}:{status}",
            )
        )
    return receipts


# -- routes -------------------------------------------------------------------------------------

#: What the routes call with the receipts of one verified callback.
OnReceipts = Callable[[list[Receipt]], Awaitable[None]]
#: What the routes call with the engagement of one verified callback: events that name their
#: message, and replies that do not.
OnEngagement = Callable[[list[EngagementEvent], list[InboundReply]], Awaitable[None]]


class _BodyTooLarge(Exception):
    pass


async def _read_bounded(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def receipt_routes(
    on_receipts: OnReceipts,
    *,
    twilio_auth_token: str | None,
    sendgrid_public_key: str | None,
    webhook_secret: str | None,
    replay_guard: ReplayGuard,
    public_base_url: str,
    prefix: str = "/callbacks",
    max_body_bytes: int = 1024 * 1024,
    tolerance_s: float = 300.0,
    replay_ttl_s: int = 7 * 24 * 3600,
    on_engagement: OnEngagement | None = None,
    aliyun_reply_secret: str | None = None,
) -> list[web.RouteDef]:
    """Routes for each configured provider (a ``None`` or empty credential leaves its route out).
    With ``on_engagement``, SendGrid's engagement events go to it too, and the inbound-reply
    routes are mounted (Twilio's with its auth token, Aliyun's with ``aliyun_reply_secret``)."""
    base = public_base_url.rstrip("/")
    sendgrid_key = load_sendgrid_public_key(sendgrid_public_key) if sendgrid_public_key else None

    async def process(
        replay_key: str,
        receipts: Sequence[Receipt],
        events: Sequence[EngagementEvent] = (),
        replies: Sequence[InboundReply] = (),
        *,
        answer: Callable[[], web.Response] = lambda: web.Response(status=204),
        replay_answer: Callable[[], web.Response] | None = None,
    ) -> web.Response:
        if not await replay_guard.claim(replay_key, replay_ttl_s):
            return replay_answer() if replay_answer is not None else _refuse(403, "replayed callback")
        try:
            if receipts:
                await on_receipts(list(receipts))
            if (events or replies) and on_engagement is not None:
                await on_engagement(list(events), list(replies))
        except Exception:
            await replay_guard.release(replay_key)  # let the provider's retry through
            raise
        return answer()

    async def twilio(request: web.Request) -> web.StreamResponse:
        assert twilio_auth_token is not None
        try:
            raw = await _read_bounded(request, max_body_bytes)
            params = dict(parse_qsl(raw.decode(), keep_blank_values=True))
        except _BodyTooLarge:
            return _refuse(413, "body too large")
        except UnicodeDecodeError:
            return _refuse(400, "body is not UTF-8")
        signature = request.headers.get(TWILIO_SIGNATURE_HEADER)
        if not verify_twilio_signature(base + request.raw_path, params, signature, twilio_auth_token):
            return _refuse(401, "bad signature")
        try:
            receipts = parse_twilio_callback(params, request.query.get("ref"))
        except ReceiptError as exc:
            return _refuse(400, str(exc))
        return await process(_twilio_replay_key(request.raw_path, params), receipts)

    async def signed_json(
        request: web.Request,
        kind: str,
        *,
        signature_header: str,
        timestamp_header: str,
        verify: Callable[[bytes, str | None, str | None], bool],
        parse: Callable[[Any], list[Receipt]],
        engagement: Callable[[Any], list[EngagementEvent]] | None = None,
    ) -> web.StreamResponse:
        """A JSON body signed over timestamp + body (SendGrid events, our webhook receipts)."""
        try:
            raw = await _read_bounded(request, max_body_bytes)
        except _BodyTooLarge:
            return _refuse(413, "body too large")
        timestamp = request.headers.get(timestamp_header)
        if not verify(raw, request.headers.get(signature_header), timestamp):
            return _refuse(401, "bad or stale signature")
        assert timestamp is not None  # a verified signature has a (digit-only) timestamp
        try:
            payload = orjson.loads(raw)
            receipts = parse(payload)
            events = engagement(payload) if engagement is not None and on_engagement is not None else []
        except (orjson.JSONDecodeError, ReceiptError) as exc:
            return _refuse(400, str(exc))
        return await process(_signed_body_replay_key(kind, timestamp, raw), receipts, events)

    def sendgrid_verify(raw: bytes, signature: str | None, timestamp: str | None) -> bool:
        assert sendgrid_key is not None
        return _fresh(timestamp, tolerance_s) and verify_sendgrid_signature(sendgrid_key, raw, signature, timestamp)

    def webhook_verify(raw: bytes, signature: str | None, timestamp: str | None) -> bool:
        assert webhook_secret is not None
        return verify_webhook(webhook_secret, timestamp, signature, raw, tolerance_s=tolerance_s)

    async def sendgrid(request: web.Request) -> web.StreamResponse:
        return await signed_json(
            request,
            "sendgrid",
            signature_header=SENDGRID_SIGNATURE_HEADER,
            timestamp_header=SENDGRID_TIMESTAMP_HEADER,
            verify=sendgrid_verify,
            parse=parse_sendgrid_events,
            engagement=parse_sendgrid_engagement,
        )

    async def webhook(request: web.Request) -> web.StreamResponse:
        return await signed_json(
            request,
            "webhook",
            signature_header=SIGNATURE_HEADER,
            timestamp_header=TIMESTAMP_HEADER,
            verify=webhook_verify,
            parse=parse_webhook_receipts,
        )

    async def twilio_inbound(request: web.Request) -> web.StreamResponse:
        assert twilio_auth_token is not None
        try:
            raw = await _read_bounded(request, max_body_bytes)
            params = dict(parse_qsl(raw.decode(), keep_blank_values=True))
        except _BodyTooLarge:
            return _refuse(413, "body too large")
        except UnicodeDecodeError:
            return _refuse(400, "body is not UTF-8")
        signature = request.headers.get(TWILIO_SIGNATURE_HEADER)
        if not verify_twilio_signature(base + request.raw_path, params, signature, twilio_auth_token):
            return _refuse(401, "bad signature")
        try:
            reply = parse_twilio_inbound(params)
        except ReceiptError as exc:
            return _refuse(400, str(exc))
        sid = params.get("MessageSid") or params.get("SmsSid")
        replay_key = f"twilio-inbound:{sid}" if sid else _twilio_replay_key(request.raw_path, params)
        return await process(replay_key, (), (), [reply], answer=_empty_twiml)

    async def aliyun_replies(request: web.Request) -> web.StreamResponse:
        assert aliyun_reply_secret is not None
        given = request.query.get(ALIYUN_REPLY_TOKEN_PARAM, "")
        if not hmac.compare_digest(given.encode(), aliyun_reply_secret.encode()):
            return _refuse(401, "bad token")
        try:
            raw = await _read_bounded(request, max_body_bytes)
        except _BodyTooLarge:
            return _refuse(413, "body too large")
        try:
            payload = orjson.loads(raw)
            replies = parse_aliyun_replies(payload)
        except (orjson.JSONDecodeError, ReceiptError) as exc:
            return _refuse(400, str(exc))
        ids = [str(item.get("sequence_id", "")) for item in payload]
        replay_key = "aliyun:" + ",".join(ids) if all(ids) else f"aliyun:{hashlib.sha256(raw).hexdigest()}"
        # Aliyun retries anything but a 200 (1, 5, 10 minutes later): a retry of a push we
        # processed (its answer was lost) is acknowledged, not refused
        return await process(replay_key, (), (), replies, answer=_aliyun_ok, replay_answer=_aliyun_ok)

    routes = []
    if twilio_auth_token:
        routes.append(web.post(f"{prefix}/twilio", twilio))
        if on_engagement is not None:
            routes.append(web.post(f"{prefix}/twilio/inbound", twilio_inbound))
    if aliyun_reply_secret and on_engagement is not None:
        routes.append(web.post(f"{prefix}/aliyun/replies", aliyun_replies))
    if sendgrid_key is not None:
        routes.append(web.post(f"{prefix}/sendgrid", sendgrid))
    if webhook_secret:
        routes.append(web.post(f"{prefix}/webhook", webhook))
    return routes


def _empty_twiml() -> web.Response:
    """Twilio's "no reply" answer to an inbound message."""
    return web.Response(status=200, body=_EMPTY_TWIML, content_type="text/xml")


_EMPTY_TWIML: Final = b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def _aliyun_ok() -> web.Response:
    """The answer Aliyun's push wants: HTTP 200 and a numeric ``code`` (0)."""
    return web.json_response({"code": 0, "msg": "ok"})


def _twilio_replay_key(raw_path: str, params: Mapping[str, str]) -> str:
    """What a Twilio signature vouches for, in one spelling whichever URL form was signed."""
    return "twilio:" + orjson.dumps([raw_path, sorted(params.items())]).decode()


def _signed_body_replay_key(kind: str, timestamp: str, raw: bytes) -> str:
    """What a timestamp + body signature vouches for: the time as a number, the exact bytes."""
    return f"{kind}:{int(timestamp)}:{hashlib.sha256(raw).hexdigest()}"


def _fresh(timestamp: str | None, tolerance_s: float) -> bool:
    if not timestamp or not (timestamp.isascii() and timestamp.isdigit()):
        return False
    return abs(time.time() - int(timestamp)) <= tolerance_s
