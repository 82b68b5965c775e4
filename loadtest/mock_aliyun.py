"""Aliyun SMS twin (Dysmsapi 2017-05-25): ``POST /aliyun/`` with ``Action=SendSms``.

Checks the RPC signature v1 with the configured AccessKey secret (``channels.aliyun_sms.
rpc_signature``), the common parameters and the number, and answers Aliyun's JSON
``{"Code", "Message", "BizId", "RequestId"}``. Refusals come as Aliyun sends them: a bad key is
HTTP 404 ``InvalidAccessKeyId.NotFound``, a bad signature 400 ``SignatureDoesNotMatch``, business
errors HTTP 200 with an ``isv.*`` code (``FaultMix.balance_exhausted``: ``isv.AMOUNT_NOT_ENOUGH``;
``FaultMix.refuse_prefixes``: ``isv.BUSINESS_LIMIT_CONTROL``), throttling 400 ``Throttling.User``.
No idempotency: Aliyun has none. Accepted messages go into the shared ledger as ``sms`` to their
E.164 number, so a message sent through Twilio and Aliyun both counts as a duplicate when both
twins share a mock.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from typing import Final

import orjson
from aiohttp import web

from channels.aliyun_sms import API_VERSION, rpc_signature
from loadtest.mock_core import MockState

__all__ = ["ALIYUN_PATH", "aliyun_error", "aliyun_routes", "e164_of"]

ALIYUN_PATH: Final = "/aliyun/"
_STATUS_CODES: Final = {401: (404, "InvalidAccessKeyId.NotFound"), 429: (400, "Throttling.User")}


def aliyun_error(status: int, code: str, message: str) -> web.Response:
    body = {"Code": code, "Message": message, "RequestId": str(uuid.uuid4()).upper()}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _fault_error(status: int, message: str, retry_after: float | None) -> web.Response:
    http, code = _STATUS_CODES.get(status, (status, "ServiceUnavailable" if status == 503 else "InternalError"))
    return aliyun_error(http, code, message)


def e164_of(number: str) -> str:
    """Aliyun's number as E.164: a mainland mobile (11 digits from 1) gets ``+86``."""
    return f"+86{number}" if len(number) == 11 and number.startswith("1") else f"+{number}"


def aliyun_routes(state: MockState) -> list[web.RouteDef]:
    async def rpc(request: web.Request) -> web.StreamResponse:
        posted = await request.post()
        form = {name: value for name, value in posted.items() if isinstance(value, str)}
        config = state.config
        if form.get("AccessKeyId") != config.aliyun_access_key_id:
            return aliyun_error(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        signature = form.pop("Signature", "")
        expected = rpc_signature(request.method, form, config.aliyun_access_key_secret)
        if not hmac.compare_digest(signature, expected):
            return aliyun_error(400, "SignatureDoesNotMatch", "Specified signature does not match our calculation.")
        if form.get("Action") != "SendSms" or form.get("Version") != API_VERSION:
            return aliyun_error(400, "InvalidAction.NotFound", "Specified api is not found.")
        fault = await state.inject_faults(request, _fault_error)
        if fault is not None:
            return fault
        number = form.get("PhoneNumbers", "")
        try:
            content = str(orjson.loads(form.get("TemplateParam", "{}")).get("content", ""))
        except (orjson.JSONDecodeError, AttributeError):
            state.ledger.rejected += 1
            return aliyun_error(200, "isv.INVALID_JSON_PARAM", "JSON parameter is invalid.")
        if not number.isdigit() or not 5 <= len(number) <= 15:
            state.ledger.rejected += 1
            return aliyun_error(200, "isv.MOBILE_NUMBER_ILLEGAL", "Invalid mobile number.")
        if not form.get("SignName") or not form.get("TemplateCode"):
            return aliyun_error(200, "isv.SMS_SIGNATURE_ILLEGAL", "Sign name or template missing.")
        if state.faults.balance_exhausted:
            state.ledger.faults["balance"] += 1
            return aliyun_error(200, "isv.AMOUNT_NOT_ENOUGH", "Account balance is not enough.")
        address = e164_of(number)
        if state.faults.refuses(address):
            state.ledger.rejected += 1
            return aliyun_error(200, "isv.BUSINESS_LIMIT_CONTROL", "Number-level flow control.")
        if not state.admit():
            return _fault_error(429, "Throttling.User", None)
        state.ledger.record("sms", address, content)
        biz_id = f"{secrets.randbelow(10**15):015d}^0"
        body = {"Code": "OK", "Message": "OK", "BizId": biz_id, "RequestId": str(uuid.uuid4()).upper()}
        response = web.Response(body=orjson.dumps(body), content_type="application/json")
        await state.after_accept(request)
        return response

    return [web.post(ALIYUN_PATH, rpc)]
