"""Delivery receipts: the mock's signed callbacks reach receipt_routes; forgeries change nothing."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp
import orjson
import pytest
import redis.asyncio as aredis
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from channels.base import Message, Sent
from channels.email import SendGridConfig, SendGridEmail
from channels.receipts import (
    MemoryReplayGuard,
    Receipt,
    RedisReplayGuard,
    ReplayGuard,
    receipt_routes,
    twilio_signature,
    verify_twilio_signature,
)
from channels.signing import signed_headers
from channels.sms import TwilioConfig, TwilioSms
from channels.webhook import SignedWebhook, WebhookConfig
from loadtest.mock_provider import MockConfig, MockProvider, ReceiptConfig
from loadtest.mock_sendgrid import sign_sendgrid_events

SID = "AC" + "5" * 32
TOKEN = "twilio-token"
SECRET = "webhook-secret-0123456789"


@dataclass
class Receiver:
    url: str
    receipts: list[Receipt] = field(default_factory=list)
    calls: int = 0
    fail_next: bool = False

    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait_for(self, count: int) -> list[Receipt]:
        async with asyncio.timeout(10), self.arrived:
            await self.arrived.wait_for(lambda: len(self.receipts) >= count)
        return self.receipts


ReceiverFactory = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def receiver_factory(aredis_client: aredis.Redis) -> AsyncIterator[ReceiverFactory]:
    runners: list[web.AppRunner] = []

    async def start(sendgrid_public_key: str | None = None, guard: ReplayGuard | None = None) -> Receiver:
        receiver = Receiver(url="")

        async def on_receipts(receipts: list[Receipt]) -> None:
            receiver.calls += 1
            if receiver.fail_next:
                receiver.fail_next = False
                raise RuntimeError("database down")
            async with receiver.arrived:
                receiver.receipts.extend(receipts)
                receiver.arrived.notify_all()

        # The routes need their public URL before the router freezes: bind the socket first.
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        receiver.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = web.Application()
        app.add_routes(
            receipt_routes(
                on_receipts,
                twilio_auth_token=TOKEN,
                sendgrid_public_key=sendgrid_public_key,
                webhook_secret=SECRET,
                replay_guard=guard or RedisReplayGuard(aredis_client),
                public_base_url=receiver.url,
                max_body_bytes=64 * 1024,
            )
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        runners.append(runner)
        return receiver

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    config = MockConfig(account_sid=SID, auth_token=TOKEN, webhook_secret=SECRET, seed=11)
    async with MockProvider(config) as provider:
        yield provider


def sms_message(i: int) -> Message:
    return Message(ref=f"c:b:{i}", address=f"+1555000{i:04d}", body="hi", idempotency_key=f"c:b:{i}")


# -- end to end: the mock's callbacks --------------------------------------------------------------


async def test_twilio_status_callbacks(
    mock: MockProvider, receiver_factory: ReceiverFactory, http: aiohttp.ClientSession
) -> None:
    receiver = await receiver_factory()
    mock.set_receipts(ReceiptConfig(delay_s=0.05, fail_ratio=0.5, twilio_intermediate=True))
    config = TwilioConfig(
        base_url=mock.url,
        account_sid=SID,
        auth_token=TOKEN,
        from_number="+15005550006",
        status_callback_url=f"{receiver.url}/callbacks/twilio",
    )
    results = await TwilioSms(http, config).send([sms_message(i) for i in range(6)])
    receipts = await receiver.wait_for(12)  # "sent" then the final status for each
    sids = {r.ref: r.provider_id for r in results if isinstance(r, Sent)}
    assert len(sids) == 6
    assert {(r.ref, r.provider_id) for r in receipts} == set(sids.items())
    finals = [r for r in receipts if r.status != "sent"]
    assert len(finals) == 6
    assert {r.status for r in finals} <= {"delivered", "failed"}
    assert all(r.code == "30003" for r in finals if r.status == "failed")
    assert len({r.event_key for r in receipts}) == 12
    assert receiver.calls == 12  # one signed request per status


async def test_sendgrid_events(
    mock: MockProvider, receiver_factory: ReceiverFactory, http: aiohttp.ClientSession
) -> None:
    receiver = await receiver_factory(sendgrid_public_key=mock.sendgrid_public_key)
    mock.set_receipts(ReceiptConfig(delay_s=0.05, sendgrid_event_url=f"{receiver.url}/callbacks/sendgrid"))
    config = SendGridConfig(
        base_url=mock.url,
        api_key=mock.config.sendgrid_api_key,
        from_email="a@example.test",
        unsubscribe_mailto="u@example.test",
    )
    batch = [Message(ref=f"e:{i}", address=f"u{i}@example.test", body="x", idempotency_key=f"e:{i}") for i in range(3)]
    await SendGridEmail(http, config).send(batch)
    receipts = await receiver.wait_for(6)
    assert sorted((r.ref, r.status) for r in receipts) == sorted(
        [(f"e:{i}", status) for i in range(3) for status in ("sent", "delivered")]
    )
    assert all(r.provider == "sendgrid" and r.provider_id for r in receipts)
    assert receiver.calls == 1  # one signed batch


async def test_webhook_receipts(
    mock: MockProvider, receiver_factory: ReceiverFactory, http: aiohttp.ClientSession
) -> None:
    receiver = await receiver_factory()
    mock.set_receipts(ReceiptConfig(delay_s=0.05, webhook_receipt_url=f"{receiver.url}/callbacks/webhook"))
    channel = SignedWebhook(http, WebhookConfig(url=f"{mock.url}/webhook", secret=SECRET))
    (sent,) = await channel.send([sms_message(1)])
    (receipt,) = await receiver.wait_for(1)
    assert isinstance(sent, Sent)
    assert (receipt.ref, receipt.provider, receipt.provider_id, receipt.status) == (
        "c:b:1",
        "webhook",
        sent.provider_id,
        "delivered",
    )


# -- refusals ---------------------------------------------------------------------------------------


def twilio_form(ref: str = "c:b:1") -> tuple[str, dict[str, str]]:
    return f"/callbacks/twilio?ref={ref}", {
        "MessageSid": "SM" + "1" * 32,
        "MessageStatus": "delivered",
        "To": "+15551230000",
    }


async def post_twilio(
    http: aiohttp.ClientSession, receiver: Receiver, path: str, params: dict[str, str], signature: str
) -> int:
    async with http.post(
        receiver.url + path,
        data=urlencode(params),
        headers={"X-Twilio-Signature": signature, "Content-Type": "application/x-www-form-urlencoded"},
    ) as response:
        return response.status


async def test_twilio_forged_altered_replayed(receiver_factory: ReceiverFactory, http: aiohttp.ClientSession) -> None:
    receiver = await receiver_factory()
    path, params = twilio_form()
    good = twilio_signature(receiver.url + path, params, TOKEN)
    assert (
        await post_twilio(http, receiver, path, params, twilio_signature(receiver.url + path, params, "guess")) == 401
    )
    altered = {**params, "MessageStatus": "failed"}
    assert await post_twilio(http, receiver, path, altered, good) == 401
    assert await post_twilio(http, receiver, path.replace("c:b:1", "c:b:2"), params, good) == 401  # other ref
    assert await post_twilio(http, receiver, path, params, "") == 401
    assert receiver.calls == 0
    assert await post_twilio(http, receiver, path, params, good) == 204
    assert await post_twilio(http, receiver, path, params, good) == 403  # replayed
    assert receiver.calls == 1
    (receipt,) = receiver.receipts
    assert (receipt.ref, receipt.status, receipt.provider_id) == ("c:b:1", "delivered", params["MessageSid"])


async def test_failed_processing_releases_the_replay_mark(
    receiver_factory: ReceiverFactory, http: aiohttp.ClientSession
) -> None:
    receiver = await receiver_factory()
    path, params = twilio_form()
    signature = twilio_signature(receiver.url + path, params, TOKEN)
    receiver.fail_next = True
    assert await post_twilio(http, receiver, path, params, signature) == 500
    assert await post_twilio(http, receiver, path, params, signature) == 204  # the provider's retry
    assert len(receiver.receipts) == 1


async def test_body_size_is_bounded(receiver_factory: ReceiverFactory, http: aiohttp.ClientSession) -> None:
    receiver = await receiver_factory()
    body = b'{"events": []}' + b" " * (65 * 1024)
    headers = signed_headers(SECRET, body)
    async with http.post(f"{receiver.url}/callbacks/webhook", data=body, headers=headers) as response:
        assert response.status == 413
    assert receiver.calls == 0


async def test_webhook_stale_altered_replayed(receiver_factory: ReceiverFactory, http: aiohttp.ClientSession) -> None:
    receiver = await receiver_factory()
    body = orjson.dumps({"events": [{"ref": "r1", "status": "delivered", "event_id": "e1", "occurred_at": 1.0}]})
    url = f"{receiver.url}/callbacks/webhook"

    async def post(data: bytes, headers: dict[str, str]) -> int:
        async with http.post(url, data=data, headers=headers) as response:
            return response.status

    assert await post(body, signed_headers(SECRET, body, now=time.time() - 301)) == 401  # stale
    assert await post(body.replace(b"delivered", b"failed"), signed_headers(SECRET, body)) == 401  # altered
    assert await post(body, signed_headers("not-the-secret-at-all", body)) == 401  # forged
    assert receiver.calls == 0
    headers = signed_headers(SECRET, body)
    assert await post(body, headers) == 204
    assert await post(body, headers) == 403  # replayed
    assert receiver.calls == 1
    assert receiver.receipts[0].event_key == "webhook:e1"


async def test_sendgrid_forged_stale_replayed(receiver_factory: ReceiverFactory, http: aiohttp.ClientSession) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = base64.b64encode(
        key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).decode()
    receiver = await receiver_factory(sendgrid_public_key=public)
    url = f"{receiver.url}/callbacks/sendgrid"
    body = orjson.dumps(
        [
            {"event": "bounce", "ref": "r1", "status": "5.1.1", "sg_message_id": "m.1", "timestamp": 1700000000},
            {"event": "open", "ref": "r1", "sg_message_id": "m.1", "timestamp": 1700000001},
            {"event": "delivered", "sg_message_id": "m.2", "timestamp": 1700000002},  # not ours: no ref
        ]
    )

    async def post(data: bytes, headers: dict[str, str]) -> int:
        async with http.post(url, data=data, headers=headers) as response:
            return response.status

    other = ec.generate_private_key(ec.SECP256R1())
    assert await post(body, sign_sendgrid_events(other, body)) == 401  # forged
    good = sign_sendgrid_events(key, body)
    assert await post(body + b" ", good) == 401  # altered
    stale = dict(good, **{"X-Twilio-Email-Event-Webhook-Timestamp": str(int(time.time()) - 3600)})
    assert await post(body, stale) == 401
    assert receiver.calls == 0
    assert await post(body, good) == 204
    assert await post(body, good) == 403  # replayed
    (receipt,) = receiver.receipts
    assert (receipt.ref, receipt.status, receipt.code, receipt.occurred_at) == ("r1", "bounced", "5.1.1", 1700000000.0)


def test_verify_twilio_signature_known_vector() -> None:
    # The example from Twilio's security documentation.
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+12349013030",
        "Digits": "1234",
        "From": "+12349013030",
        "To": "+18005551212",
    }
    assert twilio_signature(url, params, "12345") == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    assert verify_twilio_signature(url, params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=", "12345")
    assert not verify_twilio_signature(url, params, None, "12345")


@pytest.fixture(params=["redis", "memory"])
async def guard(request: pytest.FixtureRequest, aredis_client: aredis.Redis) -> ReplayGuard:
    if request.param == "redis":
        return RedisReplayGuard(aredis_client)
    return MemoryReplayGuard()


async def test_replay_guard_contract(guard: ReplayGuard) -> None:
    assert await guard.claim("sig-1", 60)
    assert not await guard.claim("sig-1", 60)
    assert await guard.claim("sig-2", 60)
    await guard.release("sig-1")
    assert await guard.claim("sig-1", 60)


async def test_redis_guard_expires(aredis_client: aredis.Redis) -> None:
    guard = RedisReplayGuard(aredis_client, prefix="t:")
    assert await guard.claim("k", 1)
    keys = await aredis_client.keys("t:*")
    assert len(keys) == 1
    assert 0 < await aredis_client.ttl(keys[0]) <= 1
