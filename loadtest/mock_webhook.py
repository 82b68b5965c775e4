"""Our signed webhook's twin: ``POST /webhook`` verifies ``X-Dispatch-Signature`` like a receiver.

Answers 401 to a bad or stale signature, 400 to a payload without ``to``/``body``, 422
``{"code": "unknown_recipient", "suppress": true}`` to recipients starting with ``bad``, and 200
``{"id": "wh_..."}`` on acceptance. With ``ReceiptConfig.webhook_receipt_url`` set it then posts
our signed receipts (``{"events": [...]}``) there.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import orjson
from aiohttp import web

from channels.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, signed_headers, verify_webhook
from loadtest.mock_core import MockState

__all__ = ["WEBHOOK_PATH", "webhook_routes"]

WEBHOOK_PATH = "/webhook"


def _error(status: int, message: str, retry_after: float | None) -> web.Response:
    headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
    return web.json_response({"error": message}, status=status, headers=headers)


async def _receipt(state: MockState, ref: str, provider_id: str) -> None:
    receipts = state.receipts
    sender = state.callback_sender
    if receipts is None or receipts.webhook_receipt_url is None or sender is None:
        return
    await asyncio.sleep(receipts.delay_s)
    failed = state.rng.random() < receipts.fail_ratio
    event: dict[str, Any] = {
        "event_id": secrets.token_hex(8),
        "ref": ref,
        "status": "failed" if failed else "delivered",
        "provider_id": provider_id,
        "code": "recipient_unreachable" if failed else None,
        "occurred_at": time.time(),
    }
    body = orjson.dumps({"events": [event]})
    headers = {"Content-Type": "application/json", **signed_headers(state.config.webhook_secret, body)}
    await sender(receipts.webhook_receipt_url, body, headers)


def webhook_routes(state: MockState) -> list[web.RouteDef]:
    async def receive(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if not verify_webhook(
            state.config.webhook_secret,
            request.headers.get(TIMESTAMP_HEADER),
            request.headers.get(SIGNATURE_HEADER),
            raw,
        ):
            return _error(401, "bad or stale signature", None)
        fault = await state.inject_faults(request, _error)
        if fault is not None:
            return fault
        replay = state.replay("webhook", request)
        if replay is not None:
            return replay
        try:
            payload = orjson.loads(raw)
            to, body, ref = payload["to"], payload["body"], payload.get("ref")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            state.ledger.rejected += 1
            return web.json_response({"code": "invalid_payload"}, status=400)
        if not isinstance(to, str) or not isinstance(body, str) or not to:
            state.ledger.rejected += 1
            return web.json_response({"code": "invalid_payload"}, status=400)
        if to.startswith("bad"):
            state.ledger.rejected += 1
            return web.json_response({"code": "unknown_recipient", "suppress": True}, status=422)
        if not state.admit():
            return _error(429, "too many requests", 1.0)
        provider_id = "wh_" + secrets.token_hex(12)
        state.ledger.record("webhook", to, body)
        response = web.json_response({"id": provider_id})
        state.remember("webhook", request, response)
        if isinstance(ref, str):
            state.spawn(_receipt(state, ref, provider_id))
        await state.after_accept(request)
        return response

    return [web.post(WEBHOOK_PATH, receive)]
