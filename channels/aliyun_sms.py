"""SMS through Aliyun's Short Message Service (Dysmsapi 2017-05-25, ``SendSms``).

One RPC-style request per message: ``POST {base_url}/`` with the form ``Action=SendSms``,
``PhoneNumbers``, ``SignName``, ``TemplateCode``, ``TemplateParam`` (JSON), ``OutId`` (our
``ref``: it comes back in Aliyun's receipts) and the common parameters (``AccessKeyId``,
``Format=JSON``, ``RegionId``, ``SignatureMethod=HMAC-SHA1``, ``SignatureNonce``,
``SignatureVersion=1.0``, ``Timestamp`` in UTC, ``Version``), signed with signature v1:
``base64(HMAC-SHA1(secret + "&", "POST&%2F&" + enc(sorted, encoded query)))`` where ``enc`` is
RFC 3986 percent-encoding (:func:`rpc_signature`). Aliyun sends template messages only: the
rendered body goes into the template parameter ``template_param`` (default ``content``) of an
approved template whose text is that parameter. Numbers go without ``+`` (mainland China also
without ``86``), as Aliyun documents. Aliyun has no idempotency keys.

Answers (``{"Code", "Message", "BizId", "RequestId"}``):

- ``Code: "OK"`` -> ``Sent(provider_id=<BizId>)``
- ``isv.MOBILE_NUMBER_ILLEGAL`` -> ``Permanent(suppress=True)``
- ``isv.BUSINESS_LIMIT_CONTROL`` (per-number caps), ``isv.BLACK_KEY_CONTROL_LIMIT`` and other
  refusals of this message -> ``Permanent``; the per-number cap is Aliyun's own
  (``reroutable``: another provider may take the message)
- ``isv.AMOUNT_NOT_ENOUGH`` (balance), unknown or abnormal account, product not enabled, bad
  signature or template, ``InvalidAccessKeyId.*``, ``SignatureDoesNotMatch`` -> raises
  ``ProviderAccountError`` (the engine pauses the campaign)
- ``Throttling.*``, ``isp.SYSTEM_ERROR``, 5xx, timeouts, connection failures -> ``Retryable``
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final
from urllib.parse import quote

import aiohttp
import orjson

from channels._http import json_or_none, parse_retry_after, retryable_from, translate_errors
from channels.base import Channel, Message, Permanent, Result, Retryable, Sent, send_each
from channels.errors import ChannelConfigError, ProviderAccountError, RetryableProviderError
from channels.registry import ProviderSettings, ProviderSpec
from channels.segments import segments

__all__ = [
    "ACCOUNT_CODES",
    "PROVIDER",
    "AliyunConfig",
    "AliyunSms",
    "aliyun_number",
    "percent_encode",
    "rpc_signature",
]

API_VERSION: Final = "2017-05-25"
#: Codes that refuse the account or its configuration, not a message: pause, never fail.
ACCOUNT_CODES: Final = frozenset(
    {
        "isv.AMOUNT_NOT_ENOUGH",
        "isv.ACCOUNT_NOT_EXISTS",
        "isv.ACCOUNT_ABNORMAL",
        "isv.OUT_OF_SERVICE",
        "isv.PRODUCT_UN_SUBSCRIPT",
        "isv.PRODUCT_UNSUBSCRIBE",
        "isp.RAM_PERMISSION_DENY",
        "isv.SMS_SIGNATURE_ILLEGAL",
        "isv.SMS_TEMPLATE_ILLEGAL",
        "InvalidAccessKeyId.NotFound",
        "InvalidAccessKeyId.Inactive",
        "SignatureDoesNotMatch",
        "Forbidden.RAM",
    }
)
#: The address itself cannot receive SMS: suppress it.
SUPPRESS_CODES: Final = frozenset({"isv.MOBILE_NUMBER_ILLEGAL"})
#: Aliyun's own limits on this message: another provider may accept it.
REROUTABLE_CODES: Final = frozenset({"isv.BUSINESS_LIMIT_CONTROL", "isv.DAY_LIMIT_CONTROL"})
_RETRYABLE_PREFIXES: Final = ("Throttling", "isp.SYSTEM_ERROR", "ServiceUnavailable", "InternalError")


def percent_encode(value: str) -> str:
    """RFC 3986 percent-encoding, as Aliyun's signature v1 wants it (space ``%20``, ``~`` kept)."""
    return quote(value, safe="~")


def rpc_signature(method: str, params: Mapping[str, str], secret: str) -> str:
    """Aliyun RPC signature v1 of ``params`` (which must not hold ``Signature``)."""
    canonical = "&".join(f"{percent_encode(k)}={percent_encode(params[k])}" for k in sorted(params))
    to_sign = f"{method}&{percent_encode('/')}&{percent_encode(canonical)}"
    digest = hmac.new(f"{secret}&".encode(), to_sign.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def aliyun_number(e164: str) -> str:
    """An E.164 number as Aliyun takes it: no ``+``; mainland China without ``86``."""
    digits = e164.removeprefix("+")
    return digits[2:] if digits.startswith("86") else digits


@dataclass(frozen=True, slots=True, kw_only=True)
class AliyunConfig:
    """``base_url`` is ``https://dysmsapi.aliyuncs.com`` or a mock's URL."""

    base_url: str
    access_key_id: str
    access_key_secret: str
    sign_name: str
    template_code: str
    #: The template's one parameter the rendered body goes into.
    template_param: str = "content"
    region_id: str = "cn-hangzhou"
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ChannelConfigError("AliyunConfig.base_url must be an http(s) URL")
        if not self.access_key_id or not self.access_key_secret:
            raise ChannelConfigError("AliyunConfig needs access_key_id and access_key_secret")
        if not self.sign_name or not self.template_code:
            raise ChannelConfigError("AliyunConfig needs sign_name and template_code")
        if self.timeout_s <= 0:
            raise ChannelConfigError("AliyunConfig.timeout_s must be positive")


class AliyunSms(Channel):
    """Aliyun SendSms: one request per message, a batch sent concurrently."""

    name = "sms"
    provider = "aliyun"
    max_batch = 100

    def __init__(self, session: aiohttp.ClientSession, config: AliyunConfig) -> None:
        self._session = session
        self._config = config
        self._url = config.base_url.rstrip("/") + "/"
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)

    @property
    def config(self) -> AliyunConfig:
        return self._config

    def cost(self, message: Message) -> int:
        return segments(message.body)

    async def send(self, messages: Sequence[Message]) -> list[Result]:
        return await send_each(self._send_one(message) for message in messages)

    def signed_form(self, message: Message) -> dict[str, str]:
        config = self._config
        params = {
            "AccessKeyId": config.access_key_id,
            "Action": "SendSms",
            "Format": "JSON",
            "OutId": message.ref,
            "PhoneNumbers": aliyun_number(message.address),
            "RegionId": config.region_id,
            "SignName": config.sign_name,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureNonce": secrets.token_hex(16),
            "SignatureVersion": "1.0",
            "TemplateCode": config.template_code,
            "TemplateParam": orjson.dumps({config.template_param: message.body}).decode(),
            "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "Version": API_VERSION,
        }
        params["Signature"] = rpc_signature("POST", params, config.access_key_secret)
        return params

    async def _send_one(self, message: Message) -> Result:
        form = self.signed_form(message)
        body = "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in form.items())
        try:
            with translate_errors(self.provider):
                async with self._session.post(
                    self._url,
                    data=body.encode(),
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                    timeout=self._timeout,
                ) as response:
                    raw = await response.read()
                    return self._result(message.ref, response.status, response.headers, raw)
        except RetryableProviderError as exc:
            return retryable_from(message.ref, exc)

    def _result(self, ref: str, status: int, headers: Mapping[str, str], raw: bytes) -> Result:
        payload = json_or_none(raw) or {}
        code = str(payload.get("Code") or "")
        if status == 200 and code == "OK":
            biz_id = payload.get("BizId")
            if not isinstance(biz_id, str) or not biz_id:
                return Permanent(ref, "no-bizid", "aliyun accepted without a BizId", status)
            return Sent(ref, biz_id)
        label = code or f"HTTP {status}"
        reason = f"aliyun: {label}"  # Aliyun's Message may quote the number: never kept
        if status == 429 or status >= 500 or code.startswith(_RETRYABLE_PREFIXES):
            # a throttled call answers 200/400 with a Throttling code: say 429, what it means
            kind = 429 if code.startswith("Throttling") else (status if status >= 500 or status == 429 else 503)
            return Retryable(ref, reason, status=kind, retry_after=_retry_after(headers))
        if code in ACCOUNT_CODES or status in (401, 403):
            raise ProviderAccountError(
                f"aliyun: {label} (check the balance, access key, sign name and template)", status=status, code=code
            )
        return Permanent(
            ref,
            label,
            reason,
            status,
            suppress=code in SUPPRESS_CODES,
            reroutable=code in REROUTABLE_CODES,
        )


def _retry_after(headers: Mapping[str, str]) -> float | None:
    return parse_retry_after(headers.get("Retry-After"))


def from_settings(session: aiohttp.ClientSession, settings: ProviderSettings) -> AliyunSms:
    """The adapter from the ``aliyun_*`` settings."""
    return AliyunSms(
        session,
        AliyunConfig(
            base_url=settings.text("base_url"),
            access_key_id=settings.text("access_key_id"),
            access_key_secret=settings.text("access_key_secret"),
            sign_name=settings.text("sign_name"),
            template_code=settings.text("template_code"),
        ),
    )


#: Aliyun SMS in the registry: no idempotency keys; receipts and QuerySendDetails are not wired yet.
PROVIDER: Final = ProviderSpec(adapter=AliyunSms, settings_section="aliyun", factory=from_settings)
