"""Receipt routes exist only with real secrets, touch only their own channel's messages, refuse
replays however the signature header is spelled, and accept genuine Twilio signatures over the
URL with or without its default port (checked with Twilio's own ``RequestValidator``).

Every callback goes over HTTP to the real applications (``dispatch serve``'s ``build_app`` and
``dispatch callbacks``' ``build_receipt_app``) and lands in real message records in Redis."""

from __future__ import annotations

import argparse
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio as aredis
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from test_api_support import Api, api_settings, running_api
from twilio.request_validator import RequestValidator

from channels.receipts import SENDGRID_SIGNATURE_HEADER, twilio_signature, twilio_url_forms
from channels.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, signed_headers
from dispatch.cli.main import cmd_callbacks
from dispatch.config import Settings
from dispatch.errors import ConfigError
from dispatch.send.receipts import DEMO_SMS_AUTH_TOKEN, ReceiptSecrets, build_receipt_app
from dispatch.send.tracking import campaign_counters
from dispatch.store import keys
from loadtest.mock_sendgrid import sign_sendgrid_events

TOKEN = "real-twilio-auth-token-7f3a"
WEBHOOK_SECRET = "receipt-webhook-secret-0123456789"
#: Order of the P-256 group: (r, N - s) is a second valid signature of the same payload.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _public_key(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def _seed_sent(client: redis.Redis, cid: str, channel: str, count: int) -> list[str]:
    """A campaign of ``channel`` whose ``count`` messages are sent (not yet delivered); their refs."""
    client.set(keys.manifest(cid), orjson.dumps({"campaign_id": cid, "channel": channel, "body": "hi"}))
    client.hset(keys.records(cid, 0), mapping={str(i): f"sent|1||P{cid}{i}||{time.time():.3f}" for i in range(count)})
    client.hset(keys.counters(cid), "sent", count)
    return [f"{cid}.0.{i}" for i in range(count)]


def _state(client: redis.Redis, ref: str) -> str:
    cid, batch, index = ref.rsplit(".", 2)
    raw = client.hget(keys.records(cid, int(batch)), index)
    assert isinstance(raw, bytes)
    return raw.decode().split("|", 1)[0]


@contextlib.asynccontextmanager
async def _serve(settings: Settings, redis_client: redis.Redis, aredis_client: aredis.Redis) -> AsyncIterator[Api]:
    """``dispatch serve``'s application on a real socket."""
    async with running_api(settings, aredis_client, redis_client) as api:
        yield api


@contextlib.asynccontextmanager
async def _receipt_app(
    settings: Settings, client: aredis.Redis, public_base_url: str
) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """``dispatch callbacks``' application on 127.0.0.1, behind ``public_base_url`` (a proxy's
    URL: the one Twilio calls and signs)."""
    app, _ = build_receipt_app(settings, client, public_base_url=public_base_url)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            yield f"http://127.0.0.1:{port}", session
    finally:
        await runner.cleanup()


async def _post_twilio(
    session: aiohttp.ClientSession, base: str, ref: str, params: dict[str, str], signature: str
) -> int:
    headers = {"X-Twilio-Signature": signature, "Content-Type": "application/x-www-form-urlencoded"}
    async with session.post(f"{base}/callbacks/twilio?ref={ref}", data=urlencode(params), headers=headers) as reply:
        return reply.status


def _twilio_params(sid: str, status: str = "undelivered") -> dict[str, str]:
    return {"MessageSid": sid, "MessageStatus": status, "ErrorCode": "30003", "AccountSid": "AC" + "0" * 32}


# -- item 7a: routes only with real secrets -----------------------------------------------------


async def test_demo_token_mounts_no_twilio_route_in_serve(
    redis_url: str, tmp_path: Path, redis_client: redis.Redis, aredis_client: aredis.Redis
) -> None:
    settings = api_settings(redis_url, tmp_path)
    assert settings.sms_auth_token.reveal() == DEMO_SMS_AUTH_TOKEN  # nothing configured: the public default
    (ref,) = _seed_sent(redis_client, "demo-sms", "sms", 1)
    async with _serve(settings, redis_client, aredis_client) as api:
        params = _twilio_params("SMforged")
        url = f"{api.base}/callbacks/twilio?ref={ref}"
        forged = twilio_signature(url, params, DEMO_SMS_AUTH_TOKEN)  # anyone can compute this
        assert await _post_twilio(api.session, api.base, ref, params, forged) == 404
        for provider in ("sendgrid", "webhook"):
            async with api.session.post(f"{api.base}/callbacks/{provider}", data=b"[]") as reply:
                assert reply.status == 404
    assert _state(redis_client, ref) == "sent"
    assert campaign_counters(redis_client, "demo-sms")["undelivered"] == 0


async def test_callbacks_app_mounts_only_configured_providers(
    redis_url: str, tmp_path: Path, aredis_client: aredis.Redis
) -> None:
    demo = api_settings(redis_url, tmp_path)
    assert ReceiptSecrets.from_settings(demo).providers == []
    app, _ = build_receipt_app(demo, aredis_client, public_base_url="https://hooks.example.test")
    assert [route.resource.canonical for route in app.router.routes() if route.resource] == []
    real = api_settings(redis_url, tmp_path, DISPATCH_SMS_AUTH_TOKEN=TOKEN)
    app, _ = build_receipt_app(real, aredis_client, public_base_url="https://hooks.example.test")
    assert {route.resource.canonical for route in app.router.routes() if route.resource} == {
        "/callbacks/twilio",
        "/callbacks/twilio/inbound",  # inbound replies: verified by the same token
    }


def test_callbacks_command_refuses_to_start_without_a_real_secret(redis_url: str, tmp_path: Path) -> None:
    args = argparse.Namespace(host="127.0.0.1", port=0, public_url=None)
    with pytest.raises(ConfigError) as refused:
        cmd_callbacks(args, api_settings(redis_url, tmp_path))
    assert "DISPATCH_SMS_AUTH_TOKEN" in str(refused.value)
    assert DEMO_SMS_AUTH_TOKEN not in str(refused.value)


async def test_serve_mounts_sendgrid_and_webhook_routes_when_configured(
    redis_url: str, tmp_path: Path, redis_client: redis.Redis, aredis_client: aredis.Redis
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    settings = api_settings(
        redis_url,
        tmp_path,
        DISPATCH_SENDGRID_PUBLIC_KEY=_public_key(key),
        DISPATCH_RECEIPT_WEBHOOK_SECRET=WEBHOOK_SECRET,
    )
    email_ref, _ = _seed_sent(redis_client, "sg-mail", "email", 2)
    (hook_ref,) = _seed_sent(redis_client, "wh-hook", "webhook", 1)
    async with _serve(settings, redis_client, aredis_client) as api:
        events = orjson.dumps([{"event": "bounce", "ref": email_ref, "status": "5.1.1", "sg_message_id": "m.1"}])
        async with api.session.post(
            f"{api.base}/callbacks/sendgrid", data=events, headers=sign_sendgrid_events(key, events)
        ) as reply:
            assert reply.status == 204
        body = orjson.dumps({"events": [{"ref": hook_ref, "status": "delivered", "event_id": "e-1"}]})
        async with api.session.post(
            f"{api.base}/callbacks/webhook", data=body, headers=signed_headers(WEBHOOK_SECRET, body)
        ) as reply:
            assert reply.status == 204
        async with api.session.post(f"{api.base}/callbacks/twilio", data=b"") as reply:
            assert reply.status == 404  # the SMS token is still the demo default
    assert _state(redis_client, email_ref) == "bounced"
    assert _state(redis_client, hook_ref) == "delivered"


# -- item 7b: a receipt touches only its own channel's messages ---------------------------------


async def test_twilio_receipt_cannot_change_an_email_message(
    redis_url: str, tmp_path: Path, redis_client: redis.Redis, aredis_client: aredis.Redis
) -> None:
    settings = api_settings(redis_url, tmp_path, DISPATCH_SMS_AUTH_TOKEN=TOKEN)
    (email_ref,) = _seed_sent(redis_client, "mail-1", "email", 1)
    (sms_ref,) = _seed_sent(redis_client, "sms-1", "sms", 1)
    async with _serve(settings, redis_client, aredis_client) as api:
        for ref, sid in ((email_ref, "SMa"), (sms_ref, "SMb")):
            params = _twilio_params(sid)
            signature = twilio_signature(f"{api.base}/callbacks/twilio?ref={ref}", params, TOKEN)
            assert await _post_twilio(api.session, api.base, ref, params, signature) == 204
    assert _state(redis_client, email_ref) == "sent"  # an SMS provider says nothing about an email
    assert campaign_counters(redis_client, "mail-1")["undelivered"] == 0
    assert _state(redis_client, sms_ref) == "failed"  # its own channel's message it does change
    assert campaign_counters(redis_client, "sms-1")["undelivered"] == 1


# -- item 7c: the replay guard keys on what was signed, not on the header text ------------------


async def test_webhook_signature_header_variants_do_not_replay(
    redis_url: str, tmp_path: Path, redis_client: redis.Redis, aredis_client: aredis.Redis
) -> None:
    settings = api_settings(redis_url, tmp_path, DISPATCH_RECEIPT_WEBHOOK_SECRET=WEBHOOK_SECRET)
    _seed_sent(redis_client, "wh-2", "webhook", 1)
    body = orjson.dumps({"events": [{"ref": "wh-2.0.0", "status": "failed", "event_id": "e-9"}]})
    headers = signed_headers(WEBHOOK_SECRET, body)
    good, stamp = headers[SIGNATURE_HEADER], headers[TIMESTAMP_HEADER]
    variants = [
        {SIGNATURE_HEADER: f"{good},v1=00", TIMESTAMP_HEADER: stamp},
        {SIGNATURE_HEADER: f"v1=00, {good}", TIMESTAMP_HEADER: stamp},
        {SIGNATURE_HEADER: f" {good} ", TIMESTAMP_HEADER: stamp},
        {SIGNATURE_HEADER: good, TIMESTAMP_HEADER: "0" + stamp},
    ]
    async with _receipt_app(settings, aredis_client, "https://hooks.example.test") as (base, session):

        async def post(extra: dict[str, str]) -> int:
            async with session.post(f"{base}/callbacks/webhook", data=body, headers=extra) as reply:
                return reply.status

        assert await post(headers) == 204
        assert [await post(variant) for variant in variants] == [403] * len(variants)
    assert campaign_counters(redis_client, "wh-2")["undelivered"] == 1


async def test_malleated_sendgrid_signature_does_not_replay(
    redis_url: str, tmp_path: Path, aredis_client: aredis.Redis
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    settings = api_settings(redis_url, tmp_path, DISPATCH_SENDGRID_PUBLIC_KEY=_public_key(key))
    body = orjson.dumps([{"event": "delivered", "ref": "nobody.0.0", "sg_message_id": "m.7"}])
    headers = sign_sendgrid_events(key, body)
    r, s = decode_dss_signature(base64.b64decode(headers[SENDGRID_SIGNATURE_HEADER]))
    malleated = base64.b64encode(encode_dss_signature(r, P256_ORDER - s)).decode()
    twin = {**headers, SENDGRID_SIGNATURE_HEADER: malleated}
    key.public_key().verify(  # the twin is a valid signature of the same payload...
        base64.b64decode(malleated),
        headers["X-Twilio-Email-Event-Webhook-Timestamp"].encode() + body,
        ec.ECDSA(hashes.SHA256()),
    )
    async with _receipt_app(settings, aredis_client, "https://hooks.example.test") as (base, session):

        async def post(extra: dict[str, str]) -> int:
            async with session.post(f"{base}/callbacks/sendgrid", data=body, headers=extra) as reply:
                return reply.status

        assert await post(headers) == 204
        assert await post(twin) == 403  # ...so it is the same callback again


async def test_twilio_other_port_form_does_not_replay(
    redis_url: str, tmp_path: Path, aredis_client: aredis.Redis
) -> None:
    settings = api_settings(redis_url, tmp_path, DISPATCH_SMS_AUTH_TOKEN=TOKEN)
    async with _receipt_app(settings, aredis_client, "https://hooks.example.test") as (base, session):
        params = _twilio_params("SMreplay", "delivered")
        validator = RequestValidator(TOKEN)
        path = "/callbacks/twilio?ref=nobody.0.0"
        plain = validator.compute_signature(f"https://hooks.example.test{path}", params)
        ported = validator.compute_signature(f"https://hooks.example.test:443{path}", params)
        assert plain != ported
        assert await _post_twilio(session, base, "nobody.0.0", params, plain) == 204
        assert await _post_twilio(session, base, "nobody.0.0", params, ported) == 403


# -- item 8: genuine Twilio signatures over either port form ------------------------------------


#: (public base URL, the scheme and host Twilio signs with, that scheme's default port)
PORT_CASES = [
    ("https://hooks.example.test", "https://hooks.example.test", 443),
    ("https://hooks.example.test:443", "https://hooks.example.test", 443),
    ("http://hooks.example.test", "http://hooks.example.test", 80),
    ("http://hooks.example.test:80/proxied", "http://hooks.example.test", 80),
]


@pytest.mark.parametrize("case", PORT_CASES, ids=[case[0] for case in PORT_CASES])
async def test_twilio_signatures_with_and_without_the_default_port_are_accepted(
    redis_url: str, tmp_path: Path, redis_client: redis.Redis, aredis_client: aredis.Redis, case: tuple[str, str, int]
) -> None:
    public_base_url, host, default_port = case
    settings = api_settings(redis_url, tmp_path, DISPATCH_SMS_AUTH_TOKEN=TOKEN)
    refs = _seed_sent(redis_client, "tw-port", "sms", 4)
    prefix = public_base_url.split("://", 1)[1].partition("/")[2]
    path_prefix = f"/{prefix}" if prefix else ""
    validator = RequestValidator(TOKEN)
    async with _receipt_app(settings, aredis_client, public_base_url) as (base, session):
        assert base.startswith("http://127.0.0.1:")  # the signed URL is the public one, not ours

        async def post(ref: str, signed_host: str, token_validator: RequestValidator) -> int:
            params = _twilio_params(f"SM{ref}", "delivered")
            url = f"{signed_host}{path_prefix}/callbacks/twilio?ref={ref}"
            signature = token_validator.compute_signature(url, params)
            if token_validator is validator:
                assert validator.validate(url, params, signature)  # Twilio's own check agrees
            return await _post_twilio(session, base, ref, params, signature)

        assert await post(refs[0], host, validator) == 204
        assert await post(refs[1], f"{host}:{default_port}", validator) == 204
        assert await post(refs[2], f"{host}:8443", validator) == 401  # another port is another URL
        assert await post(refs[3], host, RequestValidator("not-the-token")) == 401
        assert await post(refs[3], f"{host}:{default_port}", RequestValidator("not-the-token")) == 401
    assert [_state(redis_client, ref) for ref in refs] == ["delivered", "delivered", "sent", "sent"]


def test_twilio_url_forms_are_the_default_port_spellings_only() -> None:
    assert twilio_url_forms("https://h.test/cb?ref=1") == ["https://h.test/cb?ref=1", "https://h.test:443/cb?ref=1"]
    assert twilio_url_forms("http://h.test:80/cb") == ["http://h.test:80/cb", "http://h.test/cb"]
    assert twilio_url_forms("https://h.test:80/cb") == ["https://h.test:80/cb"]
    assert twilio_url_forms("http://127.0.0.1:8080/cb") == ["http://127.0.0.1:8080/cb"]
    assert twilio_url_forms("http://h.test/cb?") == ["http://h.test/cb?", "http://h.test:80/cb?"]  # kept verbatim
