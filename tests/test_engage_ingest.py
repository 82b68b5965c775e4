"""Engagement into the ledger, over real sockets and real Redis: SendGrid's signed engagement
events, tracked links (plan, render, redirect), inbound SMS replies (Twilio, Aliyun), and the
mock recipients' ground truth compared with the ledger exactly."""

from __future__ import annotations

import base64
import socket
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio as aredis
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from channels.base import Message
from channels.receipts import twilio_signature
from channels.sms import TwilioConfig, TwilioSms
from dispatch.campaign import CampaignSpec
from dispatch.config import Settings, load_settings
from dispatch.engage.ledger import batch_events, engagement_counters
from dispatch.engage.links import CLICKS, LinkSigner, LinkStep, is_bot, plan_links, tracked_length
from dispatch.engage.replies import ReplyIndex, ReplyIndexStep, is_optout
from dispatch.errors import PlanError
from dispatch.plan.manifest import Manifest
from dispatch.rules.suppression import SuppressionStore, hasher_for
from dispatch.send.engine import Item, SendContext, build_chain, render_step
from dispatch.send.receipts import build_receipt_app
from dispatch.store import keys
from loadtest.mock_engagement import HUMAN_USER_AGENT, Accepted, EngagementEmitter, EngagementRates

TOKEN = "inbound-test-token"
SID = "AC" + "7" * 32
ALIYUN = "aliyun-reply-secret-0123"


def _manifest(cid: str, n: int, *, channel: str = "sms", body: str = "hi", links: list[str] | None = None) -> Manifest:
    return Manifest(
        campaign_id=cid,
        fingerprint="test",
        channel=channel,
        body=body,
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
        links=links,
    )


@dataclass
class Server:
    base: str
    settings: Settings
    key: ec.EllipticCurvePrivateKey
    session: aiohttp.ClientSession
    sync: redis.Redis
    app: web.Application

    async def clicks_written(self) -> None:
        """The redirect records clicks just after answering: wait for them."""
        await self.app[CLICKS].flush()

    def suppression(self) -> SuppressionStore:
        return SuppressionStore(self.sync, hasher=hasher_for(self.settings))


@pytest.fixture
async def server(tmp_path: Path, aredis_client: aredis.Redis, redis_client: redis.Redis) -> AsyncIterator[Server]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    key = ec.generate_private_key(ec.SECP256R1())
    public = base64.b64encode(
        key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).decode()
    settings = load_settings(
        {
            "DISPATCH_HOME": str(tmp_path),
            "DISPATCH_SMS_AUTH_TOKEN": TOKEN,
            "DISPATCH_SMS_ACCOUNT_SID": SID,
            "DISPATCH_SENDGRID_PUBLIC_KEY": public,
            "DISPATCH_ALIYUN_REPLY_SECRET": ALIYUN,
            "DISPATCH_LINK_BASE_URL": base,
        }
    )
    app, _ = build_receipt_app(settings, aredis_client, public_base_url=base)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    async with aiohttp.ClientSession() as session:
        yield Server(base, settings, key, session, redis_client, app)
    await runner.cleanup()


# -- SendGrid -------------------------------------------------------------------------------------


async def test_sendgrid_engagement_lands_in_the_ledger_and_optouts_suppress_at_once(server: Server) -> None:
    cid = "mail-1"
    server.sync.set(keys.manifest(cid), _manifest(cid, 200, channel="email").encode())
    accepted = [Accepted(f"{cid}.0.{i}", "email", f"user{i}@Example.COM") for i in range(200)]
    emitter = EngagementEmitter(
        server.session,
        EngagementRates(p_open=0.4, p_machine_open=0.3, p_click=0.2, p_optout=0.1),
        seed=7,
        sendgrid_url=f"{server.base}/callbacks/sendgrid",
        sendgrid_key=server.key,
    )
    await emitter.emit(accepted[:100])
    await emitter.emit(accepted[100:])
    await emitter.emit(accepted[:50])  # the same recipients again: each event still counts once per message
    assert emitter.failures == []
    truth = emitter.counts()
    assert truth["open"] > 0 and truth["machine_open"] > 0 and truth["optout"] > 0
    counters = engagement_counters(server.sync, cid)
    assert {event: counters[event] for event in truth} == dict(truth)
    assert counters["reply"] == counters["bot_click"] == 0
    ledger = batch_events(server.sync, cid, 0)
    assert {f"{cid}.0.{i}": set(events) for i, events in ledger.items()} == {
        ref: events for ref, events in emitter.truth.items() if events
    }
    # machine opens never count as human ones: a machine-only message has no "open"
    machine_only = [r for r, e in emitter.truth.items() if e & {"open", "machine_open"} == {"machine_open"}]
    assert machine_only and all("open" not in ledger[int(r.rsplit(".", 1)[1])] for r in machine_only)
    # unsubscribes are on the email suppression list (domain normalized as the planner does)
    opted = {int(r.rsplit(".", 1)[1]) for r, e in emitter.truth.items() if "optout" in e}
    flags = server.suppression().contains_many("email", [f"user{i}@example.com" for i in range(200)])
    assert {i for i, flag in enumerate(flags) if flag} == opted


async def test_sendgrid_spamreport_suppresses_and_forgery_changes_nothing(server: Server) -> None:
    cid = "mail-2"
    server.sync.set(keys.manifest(cid), _manifest(cid, 2, channel="email").encode())
    from loadtest.mock_sendgrid import sign_sendgrid_events

    events = [
        {"event": "spamreport", "email": "angry@example.com", "ref": f"{cid}.0.0", "timestamp": 1},
        {"event": "group_unsubscribe", "email": "other@example.com", "ref": f"{cid}.0.1", "timestamp": 1},
    ]
    body = orjson.dumps(events)
    forged = orjson.dumps([{**events[0], "ref": f"{cid}.0.1"}])
    headers = sign_sendgrid_events(server.key, body)
    async with server.session.post(f"{server.base}/callbacks/sendgrid", data=forged, headers=headers) as r:
        assert r.status == 401
    assert engagement_counters(server.sync, cid)["spamreport"] == 0
    async with server.session.post(f"{server.base}/callbacks/sendgrid", data=body, headers=headers) as r:
        assert r.status == 204
    counters = engagement_counters(server.sync, cid)
    assert (counters["spamreport"], counters["optout"]) == (1, 1)
    assert server.suppression().contains_many("email", ["angry@example.com", "other@example.com"]) == [True, True]


# -- tracked links -------------------------------------------------------------------------------


def test_links_are_checked_at_plan_time_with_the_link_named() -> None:
    with pytest.raises(PlanError, match=r"body: .*\$link\(ftp://example.com/x\) is not a trackable link"):
        CampaignSpec(id="c", channel="sms", body="see $link(ftp://example.com/x)")
    with pytest.raises(PlanError, match="no closing"):
        CampaignSpec(id="c", channel="sms", body="see $link(https://example.com/x")
    spec = CampaignSpec(id="c", channel="sms", body="Hi $name: $link(https://example.com/a?b=1) $link(https://x.io)")
    assert spec.template_fields == ("name",)
    with pytest.raises(PlanError, match="DISPATCH_LINK_BASE_URL"):
        plan_links(spec.body, channel="sms", campaign_id="c", base_url=None)
    planned = plan_links(spec.body, channel="sms", campaign_id="c", base_url="https://t.example/")
    assert planned.links == ("https://example.com/a?b=1", "https://x.io")
    assert planned.body == spec.body
    assert len(planned.sized) == len(spec.body) - len("$link(https://example.com/a?b=1)$link(https://x.io)") + 2 * (
        tracked_length("https://t.example", "c")
    )
    email = plan_links(spec.body, channel="email", campaign_id="c", base_url=None)
    assert email.links == () and email.body == "Hi $name: https://example.com/a?b=1 https://x.io"


async def test_rendered_links_are_signed_sized_as_planned_and_redirect_once(server: Server) -> None:
    cid = "sms-links"
    body = "Hi $name, sale: $link(https://shop.example/sale?x=1) or $link(https://shop.example/b)"
    planned = plan_links(body, channel="sms", campaign_id=cid, base_url=server.base)
    server.sync.set(keys.manifest(cid), _manifest(cid, 3, body=planned.body, links=list(planned.links)).encode())
    manifest = Manifest.decode(server.sync.get(keys.manifest(cid)) or b"", campaign_id=cid)
    signer = LinkSigner.from_settings(server.settings)
    assert signer is not None
    sent: list[Message] = []

    async def capture(ctx: SendContext, items: list[Item], nxt: object) -> None:
        sent.extend(item.message for item in items if item.message is not None)

    channel = TwilioSms(
        server.session,
        TwilioConfig(base_url="http://127.0.0.1:9", account_sid=SID, auth_token=TOKEN, from_number="+15005550006"),
    )
    ctx = SendContext(campaign_id=cid, batch=0, channel=channel, manifest=manifest, template=string.Template(body))
    items = [Item(i, f"r{i}", f"+44740012340{i}", {"name": "Ann"}, 0) for i in range(3)]
    await build_chain([render_step, LinkStep(signer), capture])(ctx, items)
    assert len(sent) == 3 and all("$link" not in m.body for m in sent)
    sized = string.Template(planned.sized).safe_substitute(name="Ann")
    assert [len(m.body) for m in sent] == [len(sized)] * 3  # the planner sized the body that is sent
    assert channel.cost(sent[0]) == channel.cost(Message(ref="x", address="", body=sized, idempotency_key="k"))
    links = [m.body.split("sale: ")[1].split(" or ") for m in sent]
    assert all(url.startswith(f"{server.base}/r/") for pair in links for url in pair)
    assert "+44" not in links[0][0]

    async def get(url: str, ua: str | None = HUMAN_USER_AGENT, method: str = "GET") -> aiohttp.ClientResponse:
        headers = {"User-Agent": ua} if ua is not None else {}
        async with server.session.request(method, url, headers=headers, allow_redirects=False) as response:
            await response.read()
            return response

    first = await get(links[0][0])
    assert (first.status, first.headers["Location"]) == (302, "https://shop.example/sale?x=1")
    assert (await get(links[0][1])).headers["Location"] == "https://shop.example/b"
    assert (await get(links[0][0])).status == 302  # clicking again still redirects, counted once
    assert (await get(links[1][0], ua="facebookexternalhit/1.1 Facebot Twitterbot/1.0")).status == 302
    assert (await get(links[2][0], method="HEAD")).status == 302
    assert (await get(links[2][1], ua=None)).status == 302
    await server.clicks_written()
    counters = engagement_counters(server.sync, cid)
    assert (counters["click"], counters["bot_click"]) == (1, 2)
    assert set(batch_events(server.sync, cid, 0)) == {0, 1, 2}
    # a forged, truncated or foreign token is a bare 404
    token = links[0][0].rsplit("/", 1)[1]
    other = LinkSigner(b"another deployment's key", server.base).token(cid, 0, 1, 0)
    for bad in (token[:-2] + ("AA" if token[-2:] != "AA" else "BB"), token[:10], other, "!!!"):
        response = await get(f"{server.base}/r/{bad}")
        assert response.status == 404
    async with server.session.get(f"{server.base}/r/{other}") as response:
        assert await response.read() == b""
    await server.clicks_written()
    assert engagement_counters(server.sync, cid)["click"] == 1


def test_bot_detection() -> None:
    assert is_bot("HEAD", HUMAN_USER_AGENT)
    assert is_bot("GET", None) and is_bot("GET", "")
    for ua in ("Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", "WhatsApp/2.23.20.0", "curl/8.5.0"):
        assert is_bot("GET", ua), ua
    for ua in (
        HUMAN_USER_AGENT,
        "Mozilla/5.0 (Linux; Android 13; CUBOT X30) AppleWebKit/537.36 Chrome/120.0 Mobile Safari/537.36",
        "Mozilla/5.0 (iPhone) AppleWebKit/605.1.15 Mobile/15E148 MicroMessenger/8.0.47 NetType/WIFI",
    ):
        assert not is_bot("GET", ua), ua


# -- inbound replies ---------------------------------------------------------------------------


def test_optout_keywords() -> None:
    wide = "\uff34\uff24"  # full-width TD
    for body in ("STOP", " stop ", "Stop.", "UNSUBSCRIBE", "td", wide, "T", "退订", "退订。", "n", "R", "拒收"):
        assert is_optout(body), body
    for body in ("stop by the shop", "yes", "TD please call me", "不退订", ""):
        assert not is_optout(body), body


async def _twilio_inbound(server: Server, phone: str, body: str, sid: str, token: str = TOKEN) -> int:
    url = f"{server.base}/callbacks/twilio/inbound"
    params = {"From": phone, "To": "+15005550006", "Body": body, "MessageSid": sid}
    headers = {"X-Twilio-Signature": twilio_signature(url, params, token)}
    async with server.session.post(url, data=params, headers=headers) as response:
        if response.status == 200:
            assert response.content_type == "text/xml" and b"<Response>" in await response.read()
        return response.status


async def test_inbound_replies_opt_out_at_once_and_credit_the_last_message(
    server: Server, aredis_client: aredis.Redis
) -> None:
    cid = "sms-replies"
    server.sync.set(keys.manifest(cid), _manifest(cid, 10).encode())
    index = ReplyIndex(aredis_client, hasher=hasher_for(server.settings), ttl_s=3600)
    phones = [f"+4474009876{i:02d}" for i in range(4)]
    await index.note_sent([(phones[0], f"{cid}.0.0"), (phones[1], f"{cid}.0.1"), (phones[2], f"{cid}.0.2")])
    await index.note_sent([(phones[0], f"{cid}.0.5")])  # a later message to the same number wins
    assert all(p.encode() not in k for k in server.sync.keys("dispatch:reply:*") for p in phones)

    assert await _twilio_inbound(server, phones[0], "Stop", "SM1") == 200
    assert await _twilio_inbound(server, phones[1], "see you Friday", "SM2") == 200
    assert await _twilio_inbound(server, phones[3], "STOP", "SM3") == 200  # no message: still opted out
    assert await _twilio_inbound(server, phones[1], "see you Friday", "SM2") == 403  # a replay
    assert await _twilio_inbound(server, phones[2], "STOP", "SM4", token="wrong") == 401
    # Aliyun: a mainland number without its country code, authenticated by the URL's secret
    cn = "13800138000"
    await index.note_sent([("+86" + cn, f"{cid}.0.3")])
    replies = orjson.dumps(
        [
            {
                "phone_number": cn,
                "content": "TD",
                "send_time": "2026-12-03 10:00:00",
                "sign_name": "Shop",
                "dest_code": "1234",
                "sequence_id": 99,
            }
        ]
    )
    url = f"{server.base}/callbacks/aliyun/replies"
    async with server.session.post(url + "?token=wrong", data=replies) as response:
        assert response.status == 401
        assert ALIYUN not in await response.text()
    for _ in range(2):  # Aliyun's retry of a push already processed is acknowledged, and changes nothing
        async with server.session.post(f"{url}?{urlencode({'token': ALIYUN})}", data=replies) as response:
            assert (response.status, await response.json()) == (200, {"code": 0, "msg": "ok"})

    counters = engagement_counters(server.sync, cid)
    assert (counters["optout"], counters["reply"]) == (2, 1)
    events = batch_events(server.sync, cid, 0)
    assert set(events[5]) == {"optout"} and set(events[1]) == {"reply"} and set(events[3]) == {"optout"}
    assert 0 not in events and 2 not in events
    flags = server.suppression().contains_many("sms", [*phones, "+86" + cn])
    assert flags == [True, False, False, True, True]


async def test_mock_recipients_clicks_and_replies_match_the_ledger_exactly(
    server: Server, aredis_client: aredis.Redis
) -> None:
    cid = "sms-mock"
    n = 60
    planned = plan_links("Deal: $link(https://shop.example/d)", channel="sms", campaign_id=cid, base_url=server.base)
    server.sync.set(keys.manifest(cid), _manifest(cid, n, body=planned.body, links=list(planned.links)).encode())
    signer = LinkSigner.from_settings(server.settings)
    assert signer is not None
    index = ReplyIndex(aredis_client, hasher=hasher_for(server.settings), ttl_s=3600)
    phones = [f"+4474005550{i:02d}" for i in range(n)]
    await index.note_sent([(phone, f"{cid}.0.{i}") for i, phone in enumerate(phones)])
    accepted = [
        Accepted(f"{cid}.0.{i}", "sms", phone, f"Deal: {signer.url(cid, 0, i, 0)}") for i, phone in enumerate(phones)
    ]
    emitter = EngagementEmitter(
        server.session,
        EngagementRates(p_click=0.5, p_reply=0.3, p_optout=0.2),
        seed=11,
        twilio_inbound_url=f"{server.base}/callbacks/twilio/inbound",
        twilio_auth_token=TOKEN,
    )
    await emitter.emit(accepted)
    await server.clicks_written()
    assert emitter.failures == []
    counters = engagement_counters(server.sync, cid)
    truth = emitter.counts()
    assert truth["click"] and truth["reply"] and truth["optout"]
    assert {event: counters[event] for event in ("click", "reply", "optout")} == {
        event: truth[event] for event in ("click", "reply", "optout")
    }
    ledger = {f"{cid}.0.{i}": set(e) for i, e in batch_events(server.sync, cid, 0).items()}
    assert ledger == {ref: events for ref, events in emitter.truth.items() if events}


def test_the_planner_keeps_the_link_table_and_costs_the_rewritten_body(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    from dispatch.plan.planner import Planner

    base = "https://go.example.com"
    settings = load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_LINK_BASE_URL": base})
    rows = [{"id": str(i), "phone": f"+447400{i:06d}", "first_name": "Al"} for i in range(10)]
    # one segment with the link written out, two once it is tracked (a longer URL)
    text = (
        "Hi $first_name, our winter sale starts today with up to half off in every store and online. Do not miss it: "
    )
    spec = CampaignSpec(id="plan-links", channel="sms", body=text + "$link(https://shop.example/w)")
    planned = plan_links(spec.body, channel="sms", campaign_id=spec.id, base_url=base)
    sized = string.Template(planned.sized).safe_substitute(first_name="Al")
    assert len(text.replace("$first_name", "Al") + "https://shop.example/w") <= 160 < len(sized)
    report = Planner(redis_client, settings).plan(spec, rows)
    assert report.cost_units == 2 * 10  # two segments each: the tracked body, not the written one
    manifest = Manifest.decode(redis_client.get(keys.manifest(spec.id)) or b"", campaign_id=spec.id)
    assert manifest.links == ["https://shop.example/w"] and manifest.body == spec.body
    with pytest.raises(PlanError, match="DISPATCH_LINK_BASE_URL"):
        Planner(redis_client, load_settings({"DISPATCH_HOME": str(tmp_path)})).plan(
            CampaignSpec(id="plan-links-2", channel="sms", body="$link(https://shop.example/w)"), rows
        )


async def test_sent_through_the_send_chain_then_engaged_by_mock_recipients(
    server: Server, aredis_client: aredis.Redis
) -> None:
    """The real chain (render, links, send to the mock Twilio, reply index) then the mock's
    recipients: every click and reply lands on the message it answers, exactly as emitted."""
    from dispatch.send.engine import Engine, SendStep
    from dispatch.send.retry import RetryPolicy
    from dispatch.send.tracking import Tracker
    from loadtest.mock_core import MockConfig
    from loadtest.mock_engagement import AcceptedLog
    from loadtest.mock_provider import MockProvider

    cid, n = "sms-chain", 40
    body = "Hi $name: $link(https://shop.example/deal)"
    planned = plan_links(body, channel="sms", campaign_id=cid, base_url=server.base)
    rows = [[f"r{i}", f"+4474007770{i:02d}", {"name": f"N{i}"}] for i in range(n)]
    server.sync.set(keys.batch(cid, 0), orjson.dumps([0, rows]))
    server.sync.set(keys.manifest(cid), _manifest(cid, n, body=planned.body, links=list(planned.links)).encode())
    server.sync.hset(keys.control(cid), "state", "running")
    signer = LinkSigner.from_settings(server.settings)
    index = ReplyIndex(aredis_client, hasher=hasher_for(server.settings), ttl_s=3600)
    log = AcceptedLog()
    async with MockProvider(MockConfig(account_sid=SID, auth_token=TOKEN, seed=5)) as mock:
        mock.on_accept(log)
        channel = TwilioSms(
            server.session,
            TwilioConfig(
                base_url=mock.url,
                account_sid=SID,
                auth_token=TOKEN,
                from_number="+15005550006",
                status_callback_url=f"{server.base}/callbacks/twilio",
            ),
        )
        indexing = ReplyIndexStep(index)
        engine = Engine(
            client=aredis_client,
            tracker=Tracker(aredis_client, ttl_s=3600),
            channels={"sms": channel},
            steps=[render_step, LinkStep(signer), SendStep(RetryPolicy(max_attempts=3)), indexing],
            owner="test-worker",
            concurrency=8,
        )
        assert (await engine.send_batch(cid, 0)).requeue_after is None
        await indexing.flush()  # the index is written in groups
    accepted = log.take()
    assert len(accepted) == n and all(f"{server.base}/r/" in m.body and "$link" not in m.body for m in accepted)
    emitter = EngagementEmitter(
        server.session,
        EngagementRates(p_click=0.4, p_reply=0.25, p_optout=0.15),
        seed=3,
        twilio_inbound_url=f"{server.base}/callbacks/twilio/inbound",
        twilio_auth_token=TOKEN,
    )
    await emitter.emit(accepted)
    await server.clicks_written()
    assert emitter.failures == []
    ledger = {f"{cid}.0.{i}": set(e) for i, e in batch_events(server.sync, cid, 0).items()}
    assert ledger == {ref: events for ref, events in emitter.truth.items() if events}
    opted = [m.address for m in accepted if "optout" in emitter.truth[m.ref]]
    assert opted and all(server.suppression().contains_many("sms", opted))


async def test_a_burst_of_first_clicks_reads_the_link_table_once(server: Server) -> None:
    import asyncio

    cid = "sms-burst"
    server.sync.set(keys.manifest(cid), _manifest(cid, 100, links=["https://shop.example/b"]).encode())
    signer = LinkSigner.from_settings(server.settings)
    assert signer is not None

    def gets() -> int:
        stats = server.sync.info("commandstats")
        return int(stats.get("cmdstat_get", {}).get("calls", 0))

    before = gets()

    async def click(i: int) -> int:
        async with server.session.get(signer.url(cid, 0, i, 0), allow_redirects=False) as response:
            return response.status

    assert await asyncio.gather(*(click(i) for i in range(100))) == [302] * 100
    assert gets() - before == 1
    await server.clicks_written()
    assert engagement_counters(server.sync, cid)["bot_click"] == 100  # aiohttp's own User-Agent
