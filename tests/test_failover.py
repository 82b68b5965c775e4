"""Several providers per channel (issue 18 point 3): the Aliyun SMS adapter against its twin,
routing by destination prefix, failover on an open breaker or a reroutable refusal, and no
failover for a message in doubt. Two mock providers over sockets, real Redis, the real engine."""

from __future__ import annotations

import asyncio
import heapq
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest
import redis
import redis.asyncio as aredis

from channels.aliyun_sms import AliyunConfig, AliyunSms, aliyun_number, percent_encode, rpc_signature
from channels.base import Channel, Message, Permanent, Retryable, Sent
from channels.errors import ProviderAccountError
from channels.sms import TwilioConfig, TwilioSms
from dispatch.campaign import CampaignSpec
from dispatch.config import load_settings
from dispatch.errors import ConfigError
from dispatch.plan.planner import Planner
from dispatch.send.control import CampaignControl
from dispatch.send.engine import Engine, SendStep, render_step
from dispatch.send.health import BreakerPolicy, ProviderHealth
from dispatch.send.reconcile import Reconciler
from dispatch.send.resilience import Resilience
from dispatch.send.retry import RetryPolicy
from dispatch.send.routing import Route, Router, parse_routes
from dispatch.send.runtime import build_routers
from dispatch.send.tracking import Tracker, campaign_counters, iter_records
from loadtest.mock_core import FaultMix, MockConfig
from loadtest.mock_provider import MockProvider

SID, TOKEN = "AC" + "4" * 32, "failover-token"
KEY_ID, SECRET = "LTAI-test-key", "test-secret"
POLICY = BreakerPolicy(min_failures=4, open_s=0.2, max_open_s=0.5)


def aliyun(session: aiohttp.ClientSession, mock: MockProvider, secret: str = SECRET) -> AliyunSms:
    config = AliyunConfig(
        base_url=f"{mock.url}/aliyun",
        access_key_id=KEY_ID,
        access_key_secret=secret,
        sign_name="dispatch",
        template_code="SMS_123",
        timeout_s=1.0,
    )
    return AliyunSms(session, config)


def twilio(session: aiohttp.ClientSession, mock: MockProvider) -> TwilioSms:
    config = TwilioConfig(
        base_url=mock.url,
        account_sid=SID,
        auth_token=TOKEN,
        from_number="+15005550006",
        timeout_s=0.5,
        honours_idempotency=False,  # as real Twilio: in-doubt messages are looked up
    )
    return TwilioSms(session, config)


def message(to: str, ref: str = "c:0:1") -> Message:
    return Message(ref=ref, address=to, body="Hello Ada", idempotency_key=f"k-{to}")


@dataclass
class Pair:
    first: MockProvider  # Twilio's
    second: MockProvider  # Aliyun's
    session: aiohttp.ClientSession


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    common = {"aliyun_access_key_id": KEY_ID, "aliyun_access_key_secret": SECRET, "seed": 9}
    async with (
        MockProvider(MockConfig(account_sid=SID, auth_token=TOKEN, **common)) as first,  # type: ignore[arg-type]
        MockProvider(MockConfig(**common)) as second,  # type: ignore[arg-type]
        aiohttp.ClientSession() as session,
    ):
        yield Pair(first, second, session)


# --- the Aliyun adapter against its twin -------------------------------------------------------


def test_rpc_signature_encodes_rfc3986_is_order_free_and_keyed() -> None:
    assert percent_encode("a b*~/:") == "a%20b%2A~%2F%3A"
    params = {"Action": "SendSms", "AccessKeyId": "id", "Timestamp": "2026-12-03T20:00:00Z"}
    signature = rpc_signature("POST", params, "secret")
    assert signature == rpc_signature("POST", dict(reversed(params.items())), "secret")  # order-free
    assert signature != rpc_signature("POST", params, "other")
    assert aliyun_number("+8613800138000") == "13800138000" and aliyun_number("+85291234567") == "85291234567"


async def test_aliyun_sends_and_maps_every_answer(pair: Pair) -> None:
    adapter = aliyun(pair.session, pair.second)
    (sent,) = await adapter.send([message("+8613800138000")])
    assert isinstance(sent, Sent) and sent.provider_id.endswith("^0")
    assert pair.second.ledger.accepted == 1
    (bad,) = await adapter.send([message("+1")])
    assert isinstance(bad, Permanent) and bad.code == "isv.MOBILE_NUMBER_ILLEGAL" and bad.suppress
    pair.second.set_faults(FaultMix(refuse_prefixes=("+86",)))
    (capped,) = await adapter.send([message("+8613800138001")])
    assert isinstance(capped, Permanent) and capped.code == "isv.BUSINESS_LIMIT_CONTROL" and capped.reroutable
    pair.second.set_faults(FaultMix(outage_s=30))
    (down,) = await adapter.send([message("+8613800138002")])
    assert isinstance(down, Retryable) and down.status == 503
    pair.second.set_faults(FaultMix(p_429=1.0))
    (throttled,) = await adapter.send([message("+8613800138002")])
    assert isinstance(throttled, Retryable) and throttled.status == 429
    pair.second.set_faults(FaultMix(balance_exhausted=True))
    with pytest.raises(ProviderAccountError, match=r"isv\.AMOUNT_NOT_ENOUGH"):
        await adapter.send([message("+8613800138003")])
    pair.second.set_faults(FaultMix())
    with pytest.raises(ProviderAccountError, match="SignatureDoesNotMatch") as caught:
        await aliyun(pair.session, pair.second, secret="wrong").send([message("+8613800138004")])
    assert "138" not in str(caught.value)  # never the number


# --- routing and failover through the engine ----------------------------------------------------


@dataclass
class Rig:
    sync: redis.Redis
    pair: Pair
    engine: Engine
    control: CampaignControl
    home: Path

    def plan(self, cid: str, phones: list[str]) -> tuple[int, int]:
        rows = [{"id": f"{cid}-{i}", "phone": p, "first_name": "Ada"} for i, p in enumerate(phones)]
        settings = load_settings({"DISPATCH_HOME": str(self.home), "DISPATCH_BATCH_SIZE": "40"})
        report = Planner(self.sync, settings).plan(CampaignSpec(id=cid, channel="sms", body="Hi $first_name"), rows)
        self.control.start(cid)
        return report.accepted, report.batches

    async def drive(self, cid: str, batches: int, within_s: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + within_s
        due = [(loop.time(), n) for n in range(batches)]
        while due:
            at, number = heapq.heappop(due)
            assert at < give_up, f"{cid} still had batches after {within_s} s"
            await asyncio.sleep(max(0.0, at - loop.time()))
            outcome = await self.engine.send_batch(cid, number)
            if outcome.requeue_after is not None:
                heapq.heappush(due, (loop.time() + outcome.requeue_after, number))

    @property
    def accepted_by_both(self) -> int:
        return self.pair.first.ledger.accepted + self.pair.second.ledger.accepted


def rig_for(name: str, routes: tuple[Route, ...] = ()) -> object:
    @pytest.fixture(name=name)
    async def fixture(
        pair: Pair, redis_client: redis.Redis, aredis_client: aredis.Redis, tmp_path: Path
    ) -> AsyncIterator[Rig]:
        adapters = {"twilio": twilio(pair.session, pair.first), "aliyun": aliyun(pair.session, pair.second)}
        router = Router("sms", adapters, routes)
        health = ProviderHealth(aredis_client, POLICY)
        retry = RetryPolicy(max_attempts=3, backoff_max_s=0.05, retry_horizon_s=120.0)
        engine = Engine(
            client=aredis_client,
            tracker=Tracker(aredis_client, ttl_s=3600),
            channels={"sms": router.primary},
            steps=[render_step, SendStep(retry, health=health, routers={"sms": router})],
            owner="failover-test",
            concurrency=16,
            resilience=Resilience(aredis_client, horizon_s=retry.retry_horizon_s),
            # lookups fail while Twilio is down: messages in doubt wait for it, as in production
            reconciler=Reconciler(policies={"*": "hold"}, wait_s=60.0),
            adapters={adapter.provider: adapter for adapter in router.adapters},
        )
        control = CampaignControl(redis_client, lambda cid, n, delay: None)
        yield Rig(redis_client, pair, engine, control, tmp_path)

    return fixture


rig_fixture = rig_for("rig")
routed_fixture = rig_for("routed", (Route("+86", ("aliyun", "twilio")),))


def phones(n: int, prefix: str = "+4474", start: int = 0) -> list[str]:
    return [f"{prefix}{i:08d}" for i in range(start, start + n)]


async def test_the_second_provider_takes_over_while_the_first_is_down(rig: Rig) -> None:
    accepted, batches = rig.plan("fo-outage", phones(160))
    rig.pair.first.set_faults(FaultMix(outage_s=3600, outage_mode="503"))  # Twilio down for the test
    await rig.drive("fo-outage", batches)
    counters = campaign_counters(rig.sync, "fo-outage")
    assert counters["sent"] == accepted and counters["failed"] == counters["dead_letters"] == 0
    assert rig.pair.first.ledger.accepted == 0 and rig.pair.second.ledger.accepted == accepted
    assert rig.pair.second.ledger.duplicates == 0


async def test_failover_mid_campaign_sends_every_message_by_exactly_one_provider(rig: Rig) -> None:
    accepted, batches = rig.plan("fo-mid", phones(200, start=1000))
    assert (await rig.engine.send_batch("fo-mid", 0)).state == "done"
    rig.pair.first.set_faults(FaultMix(outage_s=1.0, outage_mode="503"))
    await rig.drive("fo-mid", batches)
    counters = campaign_counters(rig.sync, "fo-mid")
    assert counters["sent"] == accepted and counters["failed"] == 0
    assert rig.pair.second.ledger.accepted > 0  # some went to the second while the first was down
    # every message was accepted at least once (sent); the two ledgers together hold no more:
    # nobody was accepted by both providers
    assert rig.accepted_by_both == accepted
    assert rig.pair.first.ledger.duplicates == rig.pair.second.ledger.duplicates == 0


async def test_destinations_go_to_the_provider_their_prefix_names(routed: Rig) -> None:
    numbers = phones(30, "+86138") + phones(30, "+4474")
    accepted, batches = routed.plan("fo-routes", numbers)
    await routed.drive("fo-routes", batches)
    assert campaign_counters(routed.sync, "fo-routes")["sent"] == accepted == 60
    assert routed.pair.second.ledger.accepted == 30 and routed.pair.first.ledger.accepted == 30


async def test_a_destination_one_provider_cannot_reach_goes_to_the_next(rig: Rig) -> None:
    accepted, batches = rig.plan("fo-reroute", phones(20, "+4474") + phones(20, "+336"))
    assert accepted == 40
    rig.pair.first.set_faults(FaultMix(refuse_prefixes=("+33",)))  # Twilio 21408: region not enabled
    await rig.drive("fo-reroute", batches)
    counters = campaign_counters(rig.sync, "fo-reroute")
    assert counters["sent"] == accepted and counters["failed"] == 0
    assert rig.pair.second.ledger.accepted == 20 and rig.pair.first.ledger.accepted == 20


async def test_a_refusal_every_provider_makes_fails_the_message_with_the_last_code(rig: Rig) -> None:
    accepted, batches = rig.plan("fo-nobody", phones(5, "+336"))
    assert accepted == 5
    rig.pair.first.set_faults(FaultMix(refuse_prefixes=("+33",)))
    rig.pair.second.set_faults(FaultMix(refuse_prefixes=("+33",)))
    await rig.drive("fo-nobody", batches)
    records = list(iter_records(rig.sync, "fo-nobody", batches))
    assert {(r.state, r.code) for r in records} == {("failed", "isv.BUSINESS_LIMIT_CONTROL")}
    assert rig.accepted_by_both == 0


async def test_a_message_in_doubt_is_never_sent_to_the_other_provider(rig: Rig) -> None:
    accepted, batches = rig.plan("fo-doubt", phones(30, start=5000))
    # Twilio accepts, then never answers: each of those messages is in doubt at Twilio
    rig.pair.first.set_faults(FaultMix(p_timeout_after_accept=0.5, hang_s=2.0))
    await rig.drive("fo-doubt", batches)
    counters = campaign_counters(rig.sync, "fo-doubt")
    assert rig.pair.first.ledger.faults["timeout_after_accept"] > 0, "nothing was in doubt: the test proves less"
    assert counters["sent"] == accepted
    # the timeouts opened Twilio's breaker, so messages not yet tried went to Aliyun; those in
    # doubt at Twilio did not: nobody was accepted by both
    assert rig.accepted_by_both == accepted
    assert rig.pair.first.ledger.duplicates == rig.pair.second.ledger.duplicates == 0


async def test_dropped_connections_stay_with_their_provider_and_nothing_is_accepted_twice(rig: Rig) -> None:
    accepted, batches = rig.plan("fo-dropped", phones(120, start=7000))
    assert (await rig.engine.send_batch("fo-dropped", 0)).state == "done"
    # connections dropped after the request went out: those messages are in doubt at Twilio
    rig.pair.first.set_faults(FaultMix(outage_s=1.0, outage_mode="reset"))
    await rig.drive("fo-dropped", batches)
    counters = campaign_counters(rig.sync, "fo-dropped")
    assert counters["sent"] == accepted and counters["failed"] == 0
    assert rig.pair.first.ledger.faults["outage"] > 0
    assert rig.accepted_by_both == accepted
    assert rig.pair.first.ledger.duplicates == rig.pair.second.ledger.duplicates == 0


async def test_a_connection_that_cannot_be_made_is_not_in_doubt() -> None:
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with aiohttp.ClientSession() as session:
        config = TwilioConfig(
            base_url=f"http://127.0.0.1:{port}", account_sid=SID, auth_token=TOKEN, from_number="+15005550006"
        )
        (result,) = await TwilioSms(session, config).send([message("+447400000001")])
    assert isinstance(result, Retryable) and result.status is None and not result.ambiguous


def test_routes_and_providers_come_from_settings(tmp_path: Path) -> None:
    assert parse_routes("+86=aliyun,twilio; +852=aliyun", "S") == (
        Route("+86", ("aliyun", "twilio")),
        Route("+852", ("aliyun",)),
    )
    for bad in ("+86", "+86=", "=aliyun", "+86=a;+86=b", "+86=a,a"):
        with pytest.raises(ConfigError, match="S: "):
            parse_routes(bad, "S")
    base = load_settings({"DISPATCH_HOME": str(tmp_path)})

    async def build(**changes: str) -> tuple[dict[str, object], dict[str, object]]:
        async with aiohttp.ClientSession() as session:  # building adapters sends nothing
            config = TwilioConfig(base_url="http://127.0.0.1:9", account_sid=SID, auth_token=TOKEN, from_number="+1555")
            channels: dict[str, Channel] = {"sms": TwilioSms(session, config)}
            routers = build_routers(replace(base, **changes), session, channels)  # type: ignore[arg-type]
            return dict(routers), dict(channels)

    routers, channels = asyncio.run(build())
    assert routers == {} and channels["sms"].provider == "twilio"
    routers, channels = asyncio.run(build(sms_providers="aliyun,twilio"))
    assert channels["sms"].provider == "aliyun"  # the first provider is the primary
    with pytest.raises(ConfigError, match="DISPATCH_SMS_PROVIDERS: no provider named 'nexmo'"):
        asyncio.run(build(sms_providers="twilio,nexmo"))
    with pytest.raises(ConfigError, match="DISPATCH_SMS_ROUTES: route \\+86 names aliyun"):
        asyncio.run(build(sms_providers="twilio", sms_routes="+86=aliyun"))
