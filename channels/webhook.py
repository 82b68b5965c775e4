"""Signed JSON webhooks: for WeChat-style gateways and in-house systems.

One ``POST <url>`` per message, body (JSON)::

    {"ref": <our opaque ref>, "to": <address>, "subject": <str|null>, "body": <str>,
     "attributes": {<str>: <str>}}

Headers::

    Content-Type: application/json
    Idempotency-Key: <message.idempotency_key>       stable across retries of one message
    X-Dispatch-Timestamp: <unix seconds>
    X-Dispatch-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>

The receiver verifies the signature over the raw bytes with a constant-time compare and refuses
timestamps more than a few minutes off (see ``channels.signing.verify_webhook``).

Answers: 2xx -> ``Sent`` (provider id from the JSON ``id`` if any, else the ref); 429 ->
``Retryable`` with ``Retry-After``; 5xx and transport failures -> ``Retryable``; 401/403 -> raises
``PermanentProviderError`` (wrong secret); other 4xx -> ``Permanent`` with the JSON ``code`` (or
the status), ``suppress`` when the receiver says ``{"suppress": true}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import orjson

from channels._http import json_or_none, parse_retry_after, retryable_from, translate_errors
from channels.base import Channel, Message, Permanent, Result, Retryable, Sent, send_each
from channels.errors import ChannelConfigError, PermanentProviderError, RetryableProviderError
from channels.registry import ProviderSettings, ProviderSpec
from channels.signing import signed_headers

__all__ = ["PROVIDER", "SignedWebhook", "WebhookConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookConfig:
    url: str
    secret: str
    timeout_s: float = 10.0
    #: Set when the receiver deduplicates on ``Idempotency-Key``.
    honours_idempotency: bool = False

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ChannelConfigError("WebhookConfig.url must be an http(s) URL")
        if len(self.secret) < 16:
            raise ChannelConfigError("WebhookConfig.secret must be at least 16 characters")
        if self.timeout_s <= 0:
            raise ChannelConfigError("WebhookConfig.timeout_s must be positive")


class SignedWebhook(Channel):
    """One signed JSON POST per message, the batch sent concurrently."""

    name = "webhook"
    provider = "webhook"
    max_batch = 100

    def __init__(self, session: aiohttp.ClientSession, config: WebhookConfig) -> None:
        self._session = session
        self._config = config
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self.supports_idempotency = config.honours_idempotency

    @property
    def config(self) -> WebhookConfig:
        return self._config

    async def send(self, messages: Sequence[Message]) -> list[Result]:
        return await send_each(self._send_one(m) for m in messages)

    @staticmethod
    def body(message: Message) -> bytes:
        """The exact bytes posted (and signed) for ``message``."""
        return orjson.dumps(
            {
                "ref": message.ref,
                "to": message.address,
                "subject": message.subject,
                "body": message.body,
                "attributes": dict(message.attributes),
            }
        )

    async def _send_one(self, message: Message) -> Result:
        body = self.body(message)
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": message.idempotency_key,
            **signed_headers(self._config.secret, body),
        }
        try:
            with translate_errors(self.provider):
                async with self._session.post(
                    self._config.url, data=body, headers=headers, timeout=self._timeout
                ) as response:
                    raw = await response.read()
                    return self._result(message.ref, response.status, response.headers, raw)
        except RetryableProviderError as exc:
            return retryable_from(message.ref, exc)

    @staticmethod
    def _result(ref: str, status: int, headers: Mapping[str, str], raw: bytes) -> Result:
        payload: Mapping[str, Any] = json_or_none(raw) or {}
        if 200 <= status < 300:
            provider_id = payload.get("id")
            return Sent(ref, provider_id if isinstance(provider_id, str) else ref)
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(headers.get("Retry-After"))
            return Retryable(ref, f"webhook: HTTP {status}", status=status, retry_after=retry_after)
        if status in (401, 403):
            raise PermanentProviderError(f"webhook: HTTP {status} (check the shared secret)", status=status)
        code = payload.get("code")
        code_text = code if isinstance(code, str) else str(status)
        return Permanent(
            ref,
            code_text,
            f"webhook: rejected ({code_text})",
            status,
            suppress=payload.get("suppress") is True,
        )


def from_settings(session: aiohttp.ClientSession, settings: ProviderSettings) -> SignedWebhook:
    """The adapter from the ``webhook_*`` settings."""
    return SignedWebhook(
        session,
        WebhookConfig(
            url=settings.text("url"),
            secret=settings.text("secret"),
            honours_idempotency=settings.flag("honours_idempotency"),
        ),
    )


#: Our signed webhooks in the registry (``channels.standard.default_registry``).
PROVIDER: Final = ProviderSpec(
    adapter=SignedWebhook,
    settings_section="webhook",
    factory=from_settings,
    idempotency_configurable=True,
    receipts="signed_webhook",
    callback_path="/callbacks/webhook",
)
