"""SendGrid v3 Mail Send twin: ``POST /v3/mail/send``, plus signed event-webhook batches.

Validates like SendGrid (bearer key, <= 1,000 personalizations and recipients, addresses, from,
content) and answers with SendGrid's error shape ``{"errors": [{"message", "field", "help"}]}``.
Accepted requests get 202 and ``X-Message-Id``; with ``ReceiptConfig.sendgrid_event_url`` set,
events (processed, then delivered or bounce) follow, signed with ECDSA P-256 like SendGrid's
signed event webhook (``public_key_b64`` is the verification key). Like SendGrid it ignores
``Idempotency-Key`` unless ``MockConfig.honour_idempotency`` is set.

The Email Activity API (a paid add-on at SendGrid: served only with ``MockConfig.email_activity``,
else 403): ``GET /v3/messages?limit=N&query=...`` with the activity query language's equality
clauses joined by ``AND`` (``to_email="a@b.c" AND unique_args['ref']="c.1.7"``; fields
``to_email``, ``from_email``, ``subject``, ``msg_id``, ``status``, ``unique_args['<name>']``),
answering ``{"messages": [{"from_email", "msg_id", "subject", "to_email", "status",
"opens_count", "clicks_count", "last_event_time"}]}``, newest first. An email shows in the feed
``MockConfig.email_activity_lag_s`` after acceptance (SendGrid's feed lags).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from loadtest.mock_core import MockState
from loadtest.mock_lookup import EmailRecord

__all__ = ["SendGridTwin", "sendgrid_error", "sign_sendgrid_events"]

_EMAIL: Final = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_LIMIT: Final = 1000
_TO_REQUIRED: Final = (
    "The to array is required for all personalization objects, and must have at least one email "
    "object with a valid email address."
)
_HELP: Final = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
#: One clause of the activity query language: ``name="value"`` or ``unique_args['name']="value"``.
_CLAUSE: Final = re.compile(r"""\s*(?:unique_args\[['"]([^'"\]]+)['"]\]|(\w+))\s*=\s*"((?:[^"\\]|\\.)*)"\s*""")
_AND: Final = re.compile(r"AND\s+", re.IGNORECASE)
_QUERY_FIELDS: Final = frozenset({"to_email", "from_email", "subject", "msg_id", "status"})
#: The activity feed's ``limit``: default and largest.
_ACTIVITY_LIMIT: Final = 10
_ACTIVITY_LIMIT_MAX: Final = 1000


def parse_activity_query(query: str) -> list[tuple[str, str]]:
    """``[(field, value)]`` of an activity query; ``unique_args['x']`` becomes ``unique_args.x``.

    Raises ``ValueError`` for what the mock does not understand (OR, NOT, IN, unknown fields).
    """
    clauses: list[tuple[str, str]] = []
    text = query.strip()
    position = 0
    while position < len(text):
        if clauses:
            joined = _AND.match(text, position)
            if joined is None:
                raise ValueError(f"expected AND at {text[position : position + 20]!r}")
            position = joined.end()
        match = _CLAUSE.match(text, position)
        if match is None:
            raise ValueError(f"invalid query clause at {text[position : position + 20]!r}")
        position = match.end()
        arg, name, value = match.groups()
        value = re.sub(r"\\(.)", r"\1", value)
        if arg is not None:
            clauses.append((f"unique_args.{arg}", value))
        elif name in _QUERY_FIELDS:
            clauses.append((name, value))
        else:
            raise ValueError(f"unsupported query field {name!r}")
    return clauses


def sendgrid_error(
    status: int, errors: Sequence[tuple[str, str | None]], headers: Mapping[str, str] | None = None
) -> web.Response:
    body = {
        "errors": [
            {"message": message, "field": field, "help": None if field is None else _HELP} for message, field in errors
        ]
    }
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _fault_error(status: int, message: str, retry_after: float | None) -> web.Response:
    headers = {}
    if retry_after is not None:  # SendGrid announces the reset time, not a delay
        headers = {
            "X-RateLimit-Limit": "600",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(int(time.time() + retry_after + 0.999)),
        }
    return sendgrid_error(status, [(message, None)], headers)


def sign_sendgrid_events(private_key: ec.EllipticCurvePrivateKey, body: bytes) -> dict[str, str]:
    """Headers SendGrid's signed event webhook sends with ``body``."""
    timestamp = str(int(time.time()))
    signature = private_key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }


def _validate(payload: Any) -> list[tuple[str, str | None]]:
    if not isinstance(payload, dict):
        return [("Bad Request", None)]
    errors: list[tuple[str, str | None]] = []
    personalizations = payload.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        errors.append(
            ("The personalizations field is required and must have at least one personalization.", "personalizations")
        )
        personalizations = []
    elif len(personalizations) > _LIMIT:
        errors.append(("The personalizations field must have no more than 1000 items.", "personalizations"))
    recipients = 0
    for i, item in enumerate(personalizations[:_LIMIT]):
        to = item.get("to") if isinstance(item, dict) else None
        if not isinstance(to, list) or not to:
            errors.append((_TO_REQUIRED, f"personalizations.{i}.to"))
            continue
        for j, recipient in enumerate(to):
            recipients += 1
            email = recipient.get("email") if isinstance(recipient, dict) else None
            if not isinstance(email, str) or not _EMAIL.match(email):
                errors.append(("Does not contain a valid address.", f"personalizations.{i}.to.{j}.email"))
    if recipients > _LIMIT:
        errors.append(("The total number of recipients must be less than 1000.", "personalizations"))
    sender = payload.get("from")
    if not isinstance(sender, dict) or not _EMAIL.match(str(sender.get("email", ""))):
        errors.append(("The from email does not contain a valid address.", "from.email"))
    if not payload.get("template_id") and not payload.get("content"):
        errors.append(("Unless a valid template_id is provided, the content parameter is required.", "content"))
    return errors


class SendGridTwin:
    """Routes and signing key of the SendGrid twin."""

    def __init__(self, state: MockState) -> None:
        self.state = state
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        #: The verification key, base64 DER, as SendGrid's settings page shows it.
        self.public_key_b64 = base64.b64encode(der).decode()

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v3/mail/send", self.mail_send), web.get("/v3/messages", self.activity)]

    def _authorised(self, request: web.Request) -> bool:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        return scheme == "Bearer" and hmac.compare_digest(key, self.state.config.sendgrid_api_key)

    async def mail_send(self, request: web.Request) -> web.StreamResponse:
        state = self.state
        if not self._authorised(request):
            return sendgrid_error(401, [("The provided authorization grant is invalid, expired, or revoked", None)])
        if (request.content_length or 0) > state.config.max_body_bytes:
            return sendgrid_error(413, [("Payload Too Large", None)])
        fault = await state.inject_faults(request, _fault_error)
        if fault is not None:
            return fault
        raw = await request.read()
        replay = state.replay("email", request)
        if replay is not None:
            return replay
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            state.ledger.rejected += 1
            return sendgrid_error(400, [("Bad Request", None)])
        errors = _validate(payload)
        if errors:
            state.ledger.rejected += 1
            return sendgrid_error(400, errors)
        personalizations: list[dict[str, Any]] = payload["personalizations"]
        if not state.admit(len(personalizations)):
            return _fault_error(429, "too many requests", 1.0)
        message_id = secrets.token_urlsafe(16)[:22]
        content = orjson.dumps([payload.get("content"), payload.get("template_id")]).decode()
        now = time.time()
        key = request.headers.get("Idempotency-Key")
        sender = str(payload["from"].get("email", ""))
        default_subject = payload.get("subject")
        with state.ledger.group():
            for i, item in enumerate(personalizations):
                text = f"{item.get('subject')}\x00{content}\x00{item.get('dynamic_template_data')}"
                subject = str(item.get("subject") or default_subject or "")
                custom = item.get("custom_args") or {}
                ref = custom.get("ref") if isinstance(custom, dict) else None
                for recipient in item["to"]:
                    msg_id = f"{message_id}.filter0001.{i}.0"
                    address = recipient["email"]
                    detail = {"ref": ref, "subject": subject, "from": sender}
                    state.ledger.record("email", address, text, now=now, key=key, provider_id=msg_id, detail=detail)
                    args = {} if ref is None else {"ref": str(ref)}
                    state.email.add(EmailRecord(msg_id, address, sender, subject, now, args))
                    if state.on_accept is not None:
                        state.on_accept("email", ref if isinstance(ref, str) else None, address, "")
        response = web.Response(status=202, headers={"X-Message-Id": message_id})
        state.remember("email", request, response)
        if state.receipts and state.receipts.sendgrid_event_url:
            state.spawn(self._events(message_id, personalizations))
        await state.after_accept(request)
        return response

    async def activity(self, request: web.Request) -> web.StreamResponse:
        """``GET /v3/messages``: the Email Activity API (see the module docstring)."""
        state = self.state
        if not self._authorised(request):
            return sendgrid_error(401, [("authorization required", None)])
        if not state.config.email_activity:
            return sendgrid_error(403, [("access forbidden", None)])
        fault = await state.inject_faults(request, _fault_error)
        if fault is not None:
            return fault
        limit_text = request.query.get("limit", str(_ACTIVITY_LIMIT))
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= _ACTIVITY_LIMIT_MAX:
            return sendgrid_error(400, [("limit must be an integer from 1 to 1000", "limit")])
        try:
            clauses = parse_activity_query(request.query.get("query", ""))
        except ValueError as exc:
            return sendgrid_error(400, [(str(exc), "query")])
        wanted = dict(clauses)
        now = time.time()
        visible_before = now - state.config.email_activity_lag_s
        found: list[dict[str, Any]] = []
        for record in state.email.candidates(to_email=wanted.get("to_email"), ref=wanted.get("unique_args.ref")):
            if record.created > visible_before:
                continue
            status = "delivered"
            if all(_matches(record, status, name, value) for name, value in clauses):
                found.append(
                    {
                        "from_email": record.from_email,
                        "msg_id": record.msg_id,
                        "subject": record.subject,
                        "to_email": record.to_email,
                        "status": status,
                        "opens_count": 0,
                        "clicks_count": 0,
                        "last_event_time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                )
                if len(found) == int(limit_text):
                    break
        return web.Response(body=orjson.dumps({"messages": found}), content_type="application/json")

    async def _events(self, message_id: str, personalizations: list[dict[str, Any]]) -> None:
        receipts = self.state.receipts
        sender = self.state.callback_sender
        if receipts is None or receipts.sendgrid_event_url is None or sender is None:
            return
        await asyncio.sleep(receipts.delay_s)
        events = []
        for i, item in enumerate(personalizations):
            custom = item.get("custom_args") or {}
            for recipient in item["to"]:
                sg_message_id = f"{message_id}.filter0001.{i}.0"
                base = {"email": recipient["email"], "sg_message_id": sg_message_id, **custom}
                now = int(time.time())
                events.append(
                    {**base, "event": "processed", "timestamp": now, "sg_event_id": secrets.token_urlsafe(16)}
                )
                if self.state.rng.random() < receipts.fail_ratio:
                    final = {
                        "event": "bounce",
                        "type": "bounce",
                        "status": "5.1.1",
                        "reason": "550 5.1.1 mailbox unavailable",
                    }
                else:
                    final = {"event": "delivered", "response": "250 OK"}
                events.append({**base, **final, "timestamp": now, "sg_event_id": secrets.token_urlsafe(16)})
        body = orjson.dumps(events)
        await sender(receipts.sendgrid_event_url, body, sign_sendgrid_events(self.private_key, body))


def _matches(record: EmailRecord, status: str, name: str, value: str) -> bool:
    if name == "status":
        return status == value
    if name.startswith("unique_args."):
        return record.unique_args.get(name.removeprefix("unique_args.")) == value
    return record.field_value(name) == value
