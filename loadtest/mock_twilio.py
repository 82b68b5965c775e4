"""Twilio Messages API twin: ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``.

Validates like Twilio (basic auth, required fields, E.164 ``To``), answers with Twilio's message
resource or error JSON, and after acceptance may POST signed ``StatusCallback`` requests. Like
Twilio it ignores ``Idempotency-Key`` unless ``MockConfig.honour_idempotency`` is set.

The lookups of the real API, in its wire format:

- ``GET .../Messages.json``: the account's messages, newest first, filtered by ``To``, ``From``
  and ``DateSent`` / ``DateSent<`` / ``DateSent>`` (a UTC date ``YYYY-MM-DD``; ``<`` is on or
  before, ``>`` on or after), paged by ``PageSize`` (1-1,000, default 50), ``Page`` and
  ``PageToken`` (``PA`` + the last sid of the previous page) with ``next_page_uri``. As at
  Twilio, ``date_sent`` is null while a message is ``queued`` (for
  ``MockConfig.twilio_sent_after_s``), so a ``DateSent`` filter misses just-accepted messages.
- ``GET .../Messages/{Sid}.json``: one message, or 404 with error 20404.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, date, datetime
from email.utils import format_datetime
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson
from aiohttp import web

from channels.segments import segments
from loadtest.mock_core import MockState
from loadtest.mock_lookup import SmsRecord

__all__ = ["TWILIO_MESSAGE_PATH", "TWILIO_PATH", "rfc2822", "twilio_error", "twilio_routes", "twilio_signature"]

TWILIO_PATH: Final = "/2010-04-01/Accounts/{account_sid}/Messages.json"
TWILIO_MESSAGE_PATH: Final = "/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json"
_E164: Final = re.compile(r"^\+[1-9]\d{6,14}$")
_BODY_MAX: Final = 1600
#: Twilio's list page sizes: default and largest.
_PAGE_SIZE: Final = 50
_PAGE_SIZE_MAX: Final = 1000
#: What a sent US SMS segment costs in the mock (Twilio prices are negative strings).
_PRICE_PER_SEGMENT: Final = 0.0079


def twilio_error(status: int, code: int, message: str, retry_after: float | None = None) -> web.Response:
    """Twilio's error JSON: ``{"code", "message", "more_info", "status"}``."""
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _fault_error(status: int, message: str, retry_after: float | None) -> web.Response:
    code = {401: 20003, 429: 20429, 500: 20500, 503: 20503}.get(status, 20500)
    return twilio_error(status, code, message, retry_after)


def twilio_signature(url: str, params: Mapping[str, str], auth_token: str) -> str:
    """X-Twilio-Signature: base64(HMAC-SHA1(token, url + sorted name+value pairs))."""
    payload = url + "".join(f"{name}{params[name]}" for name in sorted(params))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _authorised(request: web.Request, state: MockState) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    config = state.config
    return hmac.compare_digest(user, config.account_sid) and hmac.compare_digest(password, config.auth_token)


def rfc2822(ts: float) -> str:
    """A time as Twilio writes it: ``Thu, 03 Dec 2026 20:06:27 +0000``."""
    return _rfc2822_second(int(ts))


@functools.lru_cache(maxsize=4096)
def _rfc2822_second(second: int) -> str:
    # cached: at thousands of messages a second most share their second (formatting costs ~10 us)
    return format_datetime(datetime.fromtimestamp(second, UTC))


def _date_sent(state: MockState, record: SmsRecord, now: float) -> float | None:
    """When the message left the queue, or None while it is ``queued``."""
    sent = record.created + state.config.twilio_sent_after_s
    return sent if now >= sent else None


def _resource(state: MockState, record: SmsRecord, now: float) -> dict[str, Any]:
    """The Message resource, as Twilio's create, fetch and list answer it."""
    account = state.config.account_sid
    sid = record.sid
    sent = _date_sent(state, record, now)
    parts = segments(record.body)
    return {
        "account_sid": account,
        "api_version": "2010-04-01",
        "body": record.body,
        "date_created": rfc2822(record.created),
        "date_sent": None if sent is None else rfc2822(sent),
        "date_updated": rfc2822(record.created if sent is None else sent),
        "direction": "outbound-api",
        "error_code": None,
        "error_message": None,
        "from": record.from_,
        "messaging_service_sid": record.messaging_service_sid,
        "num_media": "0",
        "num_segments": str(parts),
        "price": None if sent is None else f"{-_PRICE_PER_SEGMENT * parts:.5f}",
        "price_unit": "USD",
        "sid": sid,
        "status": "queued" if sent is None else "sent",
        "subresource_uris": {
            "media": f"/2010-04-01/Accounts/{account}/Messages/{sid}/Media.json",
        },
        "to": record.to,
        "uri": f"/2010-04-01/Accounts/{account}/Messages/{sid}.json",
    }


def _validate(state: MockState, form: Mapping[str, str]) -> web.Response | None:
    to = form.get("To", "")
    if not to:
        return twilio_error(400, 21604, "A 'To' phone number is required.")
    if not form.get("Body"):
        return twilio_error(400, 21602, "Message body is required.")
    if not form.get("From") and not form.get("MessagingServiceSid"):
        return twilio_error(400, 21603, "A 'From' phone number is required.")
    if not _E164.match(to):
        return twilio_error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
    if to in state.config.unsubscribed:
        return twilio_error(400, 21610, "Attempt to send to unsubscribed recipient")
    if to in state.config.not_mobile:
        return twilio_error(400, 21614, f"'To' number {to} is not a valid mobile number")
    if state.faults.refuses(to):
        return twilio_error(400, 21408, f"Permission to send an SMS has not been enabled for the region of {to}")
    if len(form["Body"]) > _BODY_MAX:
        return twilio_error(400, 21617, "The concatenated message body exceeds the 1600 character limit.")
    return None


async def _status_callbacks(state: MockState, resource: Mapping[str, Any], url: str) -> None:
    receipts = state.receipts
    sender = state.callback_sender
    if receipts is None or sender is None:
        return
    failed = state.rng.random() < receipts.fail_ratio
    statuses = ["sent"] if receipts.twilio_intermediate else []
    statuses.append("undelivered" if failed else "delivered")
    await asyncio.sleep(receipts.delay_s)
    for status in statuses:
        params = {
            "AccountSid": str(resource["account_sid"]),
            "ApiVersion": "2010-04-01",
            "From": str(resource["from"] or ""),
            "MessageSid": str(resource["sid"]),
            "MessageStatus": status,
            "SmsSid": str(resource["sid"]),
            "SmsStatus": status,
            "To": str(resource["to"]),
        }
        if status == "undelivered":
            params["ErrorCode"] = "30003"  # unreachable destination handset
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": twilio_signature(url, params, state.config.auth_token),
            "I-Twilio-Idempotency-Token": f"{resource['sid']}-{status}",
        }
        await sender(url, urlencode(params).encode(), headers)


def twilio_routes(state: MockState) -> list[web.RouteDef]:
    async def create_message(request: web.Request) -> web.StreamResponse:
        if not _authorised(request, state):
            return twilio_error(401, 20003, "Authenticate")
        if request.match_info["account_sid"] != state.config.account_sid:
            return twilio_error(404, 20404, f"The requested resource {request.path} was not found")
        fault = await state.inject_faults(request, _fault_error)
        if fault is not None:
            return fault
        posted = await request.post()
        form = {name: value for name, value in posted.items() if isinstance(value, str)}
        # From the replay check to the ledger entry nothing awaits: a concurrent request with
        # the same Idempotency-Key cannot slip in between.
        replay = state.replay("sms", request)
        if replay is not None:
            return replay
        invalid = _validate(state, form)
        if invalid is not None:
            state.ledger.rejected += 1
            return invalid
        if not state.admit():
            return twilio_error(429, 20429, "Too Many Requests", 1.0)
        now = time.time()
        record = state.sms.add(
            sid="SM" + secrets.token_hex(16),
            to=form["To"],
            from_=form.get("From"),
            messaging_service_sid=form.get("MessagingServiceSid"),
            body=form["Body"],
            created=now,
        )
        resource = _resource(state, record, now)
        response = web.Response(status=201, body=orjson.dumps(resource), content_type="application/json")
        detail = {"body": record.body, "from": record.from_, "msid": record.messaging_service_sid}
        state.ledger.record(
            "sms",
            record.to,
            record.body,
            now=now,
            key=request.headers.get("Idempotency-Key"),
            provider_id=record.sid,
            detail=detail,
        )
        state.remember("sms", request, response)
        callback = form.get("StatusCallback")
        if state.on_accept is not None:
            state.on_accept("sms", dict(parse_qsl(urlsplit(callback or "").query)).get("ref"), form["To"], form["Body"])
        if callback:
            state.spawn(_status_callbacks(state, resource, callback))
        await state.after_accept(request)
        return response

    def refused(request: web.Request) -> web.Response | None:
        if not _authorised(request, state):
            return twilio_error(401, 20003, "Authenticate")
        if request.match_info["account_sid"] != state.config.account_sid:
            return twilio_error(404, 20404, f"The requested resource {request.path} was not found")
        return None

    async def list_messages(request: web.Request) -> web.StreamResponse:
        refusal = refused(request)
        if refusal is not None:
            return refusal
        fault = await state.inject_faults(request, _fault_error)
        if fault is not None:
            return fault
        try:
            page = _message_page(state, request)
        except ValueError as exc:
            return twilio_error(400, 20001, str(exc))
        return web.Response(body=orjson.dumps(page), content_type="application/json")

    async def fetch_message(request: web.Request) -> web.StreamResponse:
        refusal = refused(request)
        if refusal is not None:
            return refusal
        fault = await state.inject_faults(request, _fault_error)
        if fault is not None:
            return fault
        record = state.sms.get(request.match_info["sid"])
        if record is None:
            return twilio_error(404, 20404, f"The requested resource {request.path} was not found")
        resource = _resource(state, record, time.time())
        return web.Response(body=orjson.dumps(resource), content_type="application/json")

    return [
        web.post(TWILIO_PATH, create_message),
        web.get(TWILIO_PATH, list_messages),
        web.get(TWILIO_MESSAGE_PATH, fetch_message),
    ]


def _day(query: Mapping[str, str], name: str) -> date | None:
    value = query.get(name)
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"Invalid {name}: expected a date YYYY-MM-DD") from None


def _int(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = query.get(name)
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise ValueError(f"Invalid {name}: expected an integer from {low} to {high}")
    return int(value)


def _message_page(state: MockState, request: web.Request) -> dict[str, Any]:
    """One page of Twilio's Messages list for ``request``'s filters (``ValueError``: bad filter)."""
    query = request.query
    to, from_ = query.get("To"), query.get("From")
    on, on_or_before, on_or_after = _day(query, "DateSent"), _day(query, "DateSent<"), _day(query, "DateSent>")
    dated = on is not None or on_or_before is not None or on_or_after is not None
    size = _int(query, "PageSize", _PAGE_SIZE, 1, _PAGE_SIZE_MAX)
    number = _int(query, "Page", 0, 0, 1_000_000)
    token = query.get("PageToken")
    before_seq = None
    skip = number * size
    if token is not None:
        after = state.sms.get(token.removeprefix("PA"))
        if not token.startswith("PA") or after is None:
            raise ValueError("Invalid PageToken")
        before_seq, skip = after.seq, 0
    now = time.time()
    items: list[dict[str, Any]] = []
    last: SmsRecord | None = None
    more = False
    for record in state.sms.newest_first(to, before_seq=before_seq):
        if from_ is not None and record.from_ != from_:
            continue
        if dated:
            sent = _date_sent(state, record, now)
            if sent is None:  # queued: no date_sent yet, as at Twilio
                continue
            day = datetime.fromtimestamp(sent, UTC).date()
            if (
                (on is not None and day != on)
                or (on_or_before is not None and day > on_or_before)
                or (on_or_after is not None and day < on_or_after)
            ):
                continue
        if skip:
            skip -= 1
            continue
        if len(items) == size:
            more = True
            break
        items.append(_resource(state, record, now))
        last = record
    base = request.path
    kept = [(name, value) for name, value in query.items() if name not in ("Page", "PageSize", "PageToken")]

    def uri(page: int, page_token: str | None = None) -> str:
        params = [*kept, ("PageSize", str(size)), ("Page", str(page))]
        if page_token is not None:
            params.append(("PageToken", page_token))
        return f"{base}?{urlencode(params)}"

    start = number * size
    return {
        "end": start + len(items) - 1 if items else start,
        "first_page_uri": uri(0),
        "messages": items,
        "next_page_uri": uri(number + 1, f"PA{last.sid}") if more and last is not None else None,
        "page": number,
        "page_size": size,
        "previous_page_uri": uri(number - 1) if number > 0 else None,
        "start": start,
        "uri": request.path_qs,
    }
