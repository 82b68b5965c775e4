"""Push notifications through Firebase Cloud Messaging's HTTP v1 API.

``POST {base_url}/v1/projects/{project_id}/messages:send`` with ``Authorization: Bearer <token>``
and ``{"message": {"token", "notification": {"title", "body"}, "data"}}``: one message per
request (FCM's batch endpoint was shut down in June 2024); a batch is sent concurrently.
Minting the OAuth access token (service account, one hour) is the caller's job: pass a
:class:`channels.tokens.TokenProvider` in ``FcmConfig.tokens`` (a 401 then gets one new token and
one resend of that message), or a static ``access_token`` / ``token_source`` coroutine.

Results: 200 -> ``Sent(provider_id=<name>)``. Errors read Google's JSON
``{"error": {"code", "status", "message", "details": [{"@type": ...FcmError, "errorCode"}]}}``:

- ``UNREGISTERED``, ``SENDER_ID_MISMATCH`` and ``INVALID_ARGUMENT`` about the token ->
  ``Permanent(suppress=True)`` (the token is dead or not ours); other ``INVALID_ARGUMENT`` ->
  ``Permanent``
- ``QUOTA_EXCEEDED`` / 429 -> ``Retryable`` with ``retry_after``; ``UNAVAILABLE``,
  ``INTERNAL``, 5xx and transport failures -> ``Retryable``
- 401 / 403 other than the above (bad credentials, wrong project) -> raises
  ``ProviderAccountError`` (the engine pauses the campaign); with ``tokens``, a 401 first gets
  one forced token refresh and one resend
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import orjson

from channels._http import json_or_none, parse_retry_after, retryable_from, translate_errors
from channels.base import Channel, Message, Permanent, Result, Retryable, Sent, send_each
from channels.errors import ChannelConfigError, ProviderAccountError, RetryableProviderError
from channels.registry import ProviderSettings, ProviderSpec
from channels.tokens import TokenProvider

__all__ = ["FCM_ERROR_TYPE", "PROVIDER", "FcmConfig", "FcmPush", "fcm_error_code"]

#: ``@type`` of the detail that carries FCM's own error code.
FCM_ERROR_TYPE: Final = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_DEAD_TOKEN: Final = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
_RETRYABLE: Final = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"})


@dataclass(frozen=True, slots=True, kw_only=True)
class FcmConfig:
    """``base_url`` is ``https://fcm.googleapis.com`` or a mock's URL."""

    base_url: str
    project_id: str
    access_token: str | None = None
    #: Returns a current access token (called per batch); overrides ``access_token``.
    token_source: Callable[[], Awaitable[str]] | None = None
    #: Shared, refreshed tokens (``channels.tokens``); overrides both of the above.
    tokens: TokenProvider | None = None
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ChannelConfigError("FcmConfig.base_url must be an http(s) URL")
        if not self.project_id:
            raise ChannelConfigError("FcmConfig needs project_id")
        if not self.access_token and self.token_source is None and self.tokens is None:
            raise ChannelConfigError("FcmConfig needs access_token, token_source or tokens")
        if self.timeout_s <= 0:
            raise ChannelConfigError("FcmConfig.timeout_s must be positive")


def fcm_error_code(payload: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(FCM errorCode, Google status) from an error body; either may be None."""
    error = payload.get("error")
    if not isinstance(error, dict):
        return None, None
    status = error.get("status") if isinstance(error.get("status"), str) else None
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and detail.get("@type") == FCM_ERROR_TYPE:
            code = detail.get("errorCode")
            if isinstance(code, str):
                return code, status
    return None, status


def _about_token(payload: Mapping[str, Any]) -> bool:
    """Whether an INVALID_ARGUMENT names the registration token."""
    error = payload.get("error")
    if not isinstance(error, dict):
        return False
    for detail in error.get("details") or []:
        for violation in (detail.get("fieldViolations") or []) if isinstance(detail, dict) else []:
            if isinstance(violation, dict) and violation.get("field") == "message.token":
                return True
    return "registration token" in str(error.get("message", "")).lower()


class FcmPush(Channel):
    """FCM HTTP v1: one request per message, the batch sent concurrently."""

    name = "push"
    provider = "fcm"
    max_batch = 500
    #: FCM refuses payloads over 4 KB.

    def __init__(self, session: aiohttp.ClientSession, config: FcmConfig) -> None:
        self._session = session
        self._config = config
        self._url = f"{config.base_url.rstrip('/')}/v1/projects/{config.project_id}/messages:send"
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)

    @property
    def config(self) -> FcmConfig:
        return self._config

    async def send(self, messages: Sequence[Message]) -> list[Result]:
        tokens, source = self._config.tokens, self._config.token_source
        token: str | None
        if tokens is not None:
            token = await tokens.current()
        else:
            token = await source() if source is not None else self._config.access_token
        return await send_each(self._send_refreshing(m, token or "") for m in messages)

    async def _send_refreshing(self, message: Message, token: str) -> Result:
        """One message; with ``tokens``, a 401 gets one new token and one resend (a 401 means the
        request was refused, so the resend cannot duplicate)."""
        tokens = self._config.tokens
        try:
            return await self._send_one(message, f"Bearer {token}")
        except ProviderAccountError as exc:
            if tokens is None or exc.status != 401:
                raise
        return await self._send_one(message, f"Bearer {await tokens.refresh(token)}")

    @staticmethod
    def _payload(message: Message) -> dict[str, Any]:
        notification = {"body": message.body}
        if message.subject:
            notification["title"] = message.subject
        body: dict[str, Any] = {"token": message.address, "notification": notification}
        if message.attributes:
            body["data"] = dict(message.attributes)
        return {"message": body}

    async def _send_one(self, message: Message, authorization: str) -> Result:
        try:
            with translate_errors(self.provider):
                async with self._session.post(
                    self._url,
                    data=orjson.dumps(self._payload(message)),
                    headers={"Authorization": authorization, "Content-Type": "application/json"},
                    timeout=self._timeout,
                ) as response:
                    raw = await response.read()
                    return self._result(message.ref, response.status, response.headers, raw)
        except RetryableProviderError as exc:
            return retryable_from(message.ref, exc)

    def _result(self, ref: str, status: int, headers: Mapping[str, str], raw: bytes) -> Result:
        payload = json_or_none(raw) or {}
        if status == 200:
            name = payload.get("name")
            if not isinstance(name, str):
                return Permanent(ref, "no-name", "fcm accepted without a message name", status)
            return Sent(ref, name)
        code, google_status = fcm_error_code(payload)
        label = code or google_status or f"HTTP {status}"
        reason = f"fcm: {label}"
        if status == 429 or status >= 500 or code in _RETRYABLE:
            retry_after = parse_retry_after(headers.get("Retry-After"))
            return Retryable(ref, reason, status=status, retry_after=retry_after)
        if code in _DEAD_TOKEN:
            return Permanent(ref, code or label, reason, status, suppress=True)
        if code == "INVALID_ARGUMENT" or google_status == "INVALID_ARGUMENT":
            return Permanent(ref, "INVALID_ARGUMENT", reason, status, suppress=_about_token(payload))
        if status in (401, 403) or code == "THIRD_PARTY_AUTH_ERROR":
            raise ProviderAccountError(
                f"fcm: {label} (check the service account or access token, and the project id)",
                status=status,
                code=code,
            )
        return Permanent(ref, label, reason, status)


def from_settings(session: aiohttp.ClientSession, settings: ProviderSettings) -> FcmPush:
    """The adapter from the ``push_*`` settings."""
    if settings.tokens is not None:  # minted from a service account and shared (dispatch.send.tokens)
        config = FcmConfig(
            base_url=settings.text("base_url"), project_id=settings.text("project"), tokens=settings.tokens
        )
    else:
        config = FcmConfig(
            base_url=settings.text("base_url"),
            project_id=settings.text("project"),
            access_token=settings.text("access_token"),
        )
    return FcmPush(session, config)


#: FCM in the registry (``channels.standard.default_registry``): no idempotency key, no delivery
#: receipts, no lookup of sent messages.
PROVIDER: Final = ProviderSpec(adapter=FcmPush, settings_section="push", factory=from_settings)
