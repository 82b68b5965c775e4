"""FCM HTTP v1 twin: ``POST /v1/projects/{project}/messages:send``, one message per request.

Errors use Google's JSON shape with an ``FcmError`` detail. Tokens starting with ``bad`` are
``UNREGISTERED`` (404); an empty token or one with whitespace is ``INVALID_ARGUMENT`` naming
``message.token``. Like FCM it ignores ``Idempotency-Key`` unless
``MockConfig.honour_idempotency`` is set.

It is also Google's OAuth token endpoint (``POST /token``, the JWT-bearer grant a service
account's ``token_uri`` points to): it checks the grant's form and the assertion's claims (``iss``,
``aud`` = Google's token URL or this one, the FCM scope; not its signature: the twin holds no public keys), and answers
``{"access_token", "expires_in", "token_type"}``. Minted tokens are accepted by the send endpoint
besides the configured static one until ``POST /_mock/fcm/revoke`` (a rotated key: every minted
token is refused with 401); ``GET /_mock/fcm/tokens`` counts mints.
"""

from __future__ import annotations

import base64
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


#: The grant type of a service account's token request (RFC 7523).
JWT_BEARER: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
#: The audience of a service account's JWT grant.
GOOGLE_TOKEN_URI: Final = "https://oauth2.googleapis.com/token"
#: Seconds a minted token lives (Google's: an hour).
TOKEN_LIFETIME_S: Final = 3600


def _claims(assertion: str) -> dict[str, Any] | None:
    """The JWT's claims (not verified), or None when it is not a JWT."""
    parts = assertion.split(".")
    if len(parts) != 3:
        return None
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        return None
    return decoded if isinstance(decoded, dict) else None


def fcm_routes(state: MockState) -> list[web.RouteDef]:
    minted: set[str] = set()
    mints = 0

    def token_error(status: int, error: str, description: str) -> web.Response:
        body = {"error": error, "error_description": description}
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")

    async def token(request: web.Request) -> web.StreamResponse:
        nonlocal mints
        form = await request.post()
        claims = _claims(str(form.get("assertion", "")))
        if form.get("grant_type") != JWT_BEARER or claims is None:
            return token_error(400, "invalid_request", "Invalid JWT bearer grant.")
        if state.timed_fault() == "unauthorized":
            return token_error(400, "invalid_grant", "Invalid JWT Signature.")
        # google-auth addresses the grant to Google's token endpoint whatever token_uri it posts to
        audiences = {GOOGLE_TOKEN_URI, f"{request.scheme}://{request.host}{request.path}"}
        if not claims.get("iss") or claims.get("aud") not in audiences:
            return token_error(400, "invalid_grant", "Invalid JWT: bad iss or aud.")
        if FCM_SCOPE not in str(claims.get("scope", "")).split():
            return token_error(400, "invalid_scope", "The FCM scope is missing.")
        mints += 1
        access = f"ya29.mock-{mints}-{secrets.token_hex(8)}"
        minted.add(access)
        body = {"access_token": access, "expires_in": TOKEN_LIFETIME_S, "token_type": "Bearer"}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def revoke(request: web.Request) -> web.Response:
        minted.clear()
        return web.Response(body=orjson.dumps({"revoked": True}), content_type="application/json")

    async def token_stats(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"minted": mints, "valid": len(minted)}), content_type="application/json")

    def authorised(token: str) -> bool:
        return token in minted or hmac.compare_digest(token, state.config.fcm_access_token)

    async def send(request: web.Request) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not authorised(token):
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

    return [
        web.post(FCM_PATH, send),
        web.post("/token", token),
        web.post("/_mock/fcm/revoke", revoke),
        web.get("/_mock/fcm/tokens", token_stats),
    ]
