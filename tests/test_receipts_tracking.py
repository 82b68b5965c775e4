"""Provider receipts, end to end over sockets: the mock sends signed Twilio status callbacks to our
endpoint, which verifies them and moves the message records to delivered/failed."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import redis.asyncio as aredis
from aiohttp import web

from channels.sms import TwilioConfig, TwilioSms
from dispatch.config import load_settings
from dispatch.plan.manifest import Manifest
from dispatch.send.engine import Engine, SendStep, render_step
from dispatch.send.receipts import build_receipt_app
from dispatch.send.retry import RetryPolicy
from dispatch.send.tracking import MessageRecord, Tracker, campaign_counters
from dispatch.store import keys
from loadtest.mock_core import MockConfig, ReceiptConfig
from loadtest.mock_provider import MockProvider

SID, TOKEN = "AC" + "1" * 32, "receipt-test-token"


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def test_signed_receipts_update_records_and_forgeries_change_nothing(aredis_client: aredis.Redis) -> None:
    import redis

    settings = load_settings({"DISPATCH_SMS_AUTH_TOKEN": TOKEN, "DISPATCH_SMS_ACCOUNT_SID": SID})
    # placeholder app to learn our URL first: the signature covers the exact callback URL
    holder = web.Application()
    runner, base = await _start(holder)
    await runner.cleanup()
    app, applier = build_receipt_app(settings, aredis_client, public_base_url=base)
    port = int(base.rsplit(":", 1)[1])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    cid = "rcpt-1"
    rows = [[f"r{i}", f"+4474001234{i:02d}", None] for i in range(20)]
    sync = redis.Redis(connection_pool=redis.ConnectionPool(**aredis_client.connection_pool.connection_kwargs))
    import orjson

    sync.set(keys.batch(cid, 0), orjson.dumps([0, rows]))
    sync.set(keys.manifest(cid), _manifest(cid, len(rows)).encode())
    sync.hset(keys.control(cid), "state", "running")
    sync.close()

    mock_config = MockConfig(
        account_sid=SID, auth_token=TOKEN, receipts=ReceiptConfig(delay_s=0.05, fail_ratio=0.25), seed=3
    )
    async with MockProvider(mock_config) as mock, aiohttp.ClientSession() as session:
        channel = TwilioSms(
            session,
            TwilioConfig(
                base_url=mock.url,
                account_sid=SID,
                auth_token=TOKEN,
                from_number="+15005550006",
                status_callback_url=f"{base}/callbacks/twilio",
                honours_idempotency=True,
            ),
        )
        engine = Engine(
            client=aredis_client,
            tracker=Tracker(aredis_client, ttl_s=3600),
            channels={"sms": channel},
            steps=[render_step, SendStep(RetryPolicy(max_attempts=3))],
            owner="test-worker",
            concurrency=8,
        )
        outcome = await engine.send_batch(cid, 0)
        assert outcome.requeue_after is None
        deadline = time.monotonic() + 10
        while applier.applied + applier.deferred < 20 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

        # a forged callback (wrong signature) is refused and changes nothing
        before = await aredis_client.hgetall(keys.records(cid, 0))
        async with session.post(
            f"{base}/callbacks/twilio?ref={cid}.0.0",
            data={"MessageSid": "SMforged", "MessageStatus": "undelivered", "ErrorCode": "30003"},
            headers={"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"},
        ) as response:
            assert response.status in (401, 403)
        assert await aredis_client.hgetall(keys.records(cid, 0)) == before
    await runner.cleanup()

    sync = redis.Redis(connection_pool=redis.ConnectionPool(**aredis_client.connection_pool.connection_kwargs))
    counters = campaign_counters(sync, cid)
    sync.close()
    assert counters["sent"] == 20
    assert counters["delivered"] + counters["undelivered"] + counters["bounced"] == 20
    assert counters["undelivered"] + counters["bounced"] > 0  # fail_ratio 0.25 over 20 messages, seeded
    states = {MessageRecord.decode(v).state for k, v in before.items() if k.isdigit()}
    assert states <= {"delivered", "failed", "bounced", "sent"}


def _manifest(cid: str, n: int) -> Manifest:
    """The manifest of a hand-made one-batch campaign of ``n`` SMS saying "hi"."""
    return Manifest(
        campaign_id=cid,
        fingerprint="test",
        channel="sms",
        body="hi",
        total=n,
        accepted=n,
        rejected={},
        batches=1,
        batch_size=n,
        cost_units=n,
        checksum="",
        snapshot_bytes=0,
        created_at=0.0,
        prediction={"duration_s": 0.0, "verdict": "no_deadline"},
    )
