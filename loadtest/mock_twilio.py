"""Twilio Messages API twin: ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``.

Validates like Twilio (basic auth, required fields, E.164 ``To``), answers with Twilio's message
resource or error JSON, and after acceptance may POST signed ``StatusCallback`` requests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from email.utils import formatdate
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson
from aiohttp import web

from channels.segments import segments
from loadtest.mock_core import MockState

__all__ = ["TWILIO_PATH", "twilio_error", "twilio_routes", "twilio_signature"]

TWILIO_PATH: Final = "/2010-04-01/Accounts/{account_sid}/Messages.json"
_E164: Final = re.compile(r"^\+[1-9]\d{6,14}$")
_BODY_MAX: Final = 1600


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
    code = {429: 20429, 500: 20500, 503: 20503}.get(status, 20500)
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


def _resource(state: MockState, form: Mapping[str, str]) -> dict[str, Any]:
    sid = "SM" + secrets.token_hex(16)
    account = state.config.account_sid
    now = formatdate(usegmt=False)
    body = form["Body"]
    return {
        "account_sid": account,
        "api_version": "2010-04-01",
        "body": body,
        "date_created": now,
        "date_sent": None,
        "date_updated": now,
        "direction": "outbound-api",
        "error_code": None,
        "error_message": None,
        "from": form.get("From"),
        "messaging_service_sid": form.get("MessagingServiceSid"),
        "num_media": "0",
        "num_segments": str(segments(body)),
        "price": None,
        "price_unit": "USD",
        "sid": sid,
        "status": "queued",
        "subresource_uris": {
            "media": f"/2010-04-01/Accounts/{account}/Messages/{sid}/Media.json",
        },
        "to": form["To"],
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
        resource = _resource(state, form)
        response = web.Response(status=201, body=orjson.dumps(resource), content_type="application/json")
        state.ledger.record("sms", form["To"], form["Body"], now=time.time())
        state.remember("sms", request, response)
        callback = form.get("StatusCallback")
        if state.on_accept is not None:
            state.on_accept("sms", dict(parse_qsl(urlsplit(callback or "").query)).get("ref"), form["To"], form["Body"])
        if callback:
            state.spawn(_status_callbacks(state, resource, callback))
        await state.after_accept(request)
        return response

    return [web.post(TWILIO_PATH, create_message)]
