"""FCM HTTP v1 twin: ``POST /v1/projects/{project}/messages:send``, one message per request.

Errors use Google's JSON shape with an ``FcmError`` detail. Tokens starting with ``bad`` are
``UNREGISTERED`` (404); an empty token or one with whitespace is ``INVALID_ARGUMENT`` naming
``message.token``. Like FCM it ignores ``Idempotency-Key`` unless
``MockConfig.honour_idempotency`` is set.
"""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Any, Final

import orjson
from aiohttp import web

from loadtest.mock_core import MockState

__all__ = ["FCM_PATH", "fcm_error", "fcm_routes"]

FCM_PATH: Final = "/v1/projects/{project}/messages:send"
_FCM_ERROR: Final = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_GOOGLE_STATUS: Final = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def fcm_error(
    status: int,
    message: str,
    error_code: str | None = None,
    *,
    field: str | None = None,
    retry_after: float | None = None,
) -> web.Response:
    details: list[dict[str, Any]] = []
    if error_code is not None:
        details.append({"@type": _FCM_ERROR, "errorCode": error_code})
    if field is not None:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": field, "description": message}],
            }
        )
    body: dict[str, Any] = {
        "error": {"code": status, "message": message, "status": _GOOGLE_STATUS.get(status, "UNKNOWN")}
    }
    if details:
        body["error"]["details"] = details
    headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _fault_error(status: int, message: str, retry_after: float | None) -> web.Response:
    code = {429: "QUOTA_EXCEEDED", 500: "INTERNAL", 503: "UNAVAILABLE"}.get(status)
    return fcm_error(status, message, code, retry_after=retry_after)


def fcm_routes(state: MockState) -> list[web.RouteDef]:
    async def send(request: web.Request) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not hmac.compare_digest(token, state.config.fcm_access_token):
            return fcm_error(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential.",
            )
        fault = await state.inject_faults(request, _fault_error)
        if fault is not None:
            return fault
        raw = await request.read()
        replay = state.replay("push", request)
        if replay is not None:
            return replay
        try:
            payload = orjson.loads(raw)
            message = payload["message"]
            device = message.get("token", "")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            state.ledger.rejected += 1
            return fcm_error(400, "Invalid JSON payload received.", "INVALID_ARGUMENT")
        if not isinstance(device, str) or not device or any(c.isspace() for c in device):
            state.ledger.rejected += 1
            return fcm_error(
                400,
                "The registration token is not a valid FCM registration token",
                "INVALID_ARGUMENT",
                field="message.token",
            )
        if device.startswith("bad"):
            state.ledger.rejected += 1
            return fcm_error(404, "Requested entity was not found.", "UNREGISTERED")
        if not state.admit():
            return _fault_error(429, "Quota exceeded for quota metric 'Messages'.", 1.0)
        project = request.match_info["project"]
        name = f"projects/{project}/messages/0:{int(time.time() * 1000)}%{secrets.token_hex(8)}"
        notification = message.get("notification") or {}
        content = f"{notification.get('title')}\x00{notification.get('body')}\x00{message.get('data')}"
        state.ledger.record("push", device, content, key=request.headers.get("Idempotency-Key"), provider_id=name)
        response = web.Response(body=orjson.dumps({"name": name}), content_type="application/json")
        state.remember("push", request, response)
        await state.after_accept(request)
        return response

    return [web.post(FCM_PATH, send)]
