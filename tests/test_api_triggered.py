"""Triggered micro-batches against a real Redis: one-script acceptance, sealing (inline at the size
threshold and by the sealer), concurrent sealers, the sweep after a crash between seal and
enqueue, idempotent replay, suppression with the configured hash key, held messages, and real
workers delivering micro-batched messages exactly once to the mock provider."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson
import pytest
import redis
import redis.asyncio as aredis
from aiohttp import web
from test_api_support import api_settings, running_api

from dispatch.api.problems import ApiProblem
from dispatch.campaign import CampaignSpec
from dispatch.config import Settings
from dispatch.errors import PlanError
from dispatch.plan.snapshot import load_manifest
from dispatch.rules.frequency import AsyncFrequencyStore, FrequencyCap, frequency_key
from dispatch.rules.suppression import AddressHasher, SuppressionStore, hasher_for
from dispatch.send.broker import build_broker, enqueue_batch
from dispatch.send.tracking import iter_records, parse_ref
from dispatch.store import keys
from dispatch.store.connect import with_db
from dispatch.triggered.accept import (
    REGISTRY,
    TO_ENQUEUE,
    TRIGGERED_PREFIX,
    TriggeredSender,
    closes_at,
    open_key,
    state_key,
)
from dispatch.triggered.sealer import TriggeredSealer
from loadtest.cluster import LocalCluster
from loadtest.mock_recorder import Recorded, RecordingServer


class Clock:
    def __init__(self) -> None:
        # 20 minutes into the current hour: a test's steps never cross into the next campaign
        self.now = time.time() // 3600 * 3600 + 1200.0

    def __call__(self) -> float:
        return self.now


class Parts:
    def __init__(self, settings: Settings, client: aredis.Redis, *, seal_size: int = 100) -> None:
        self.enqueued: list[tuple[str, int, int]] = []
        self.clock = Clock()
        self.sealer = self.new_sealer(client, settings)
        self.sender = TriggeredSender(settings, client, self.sealer, seal_size=seal_size, clock=self.clock)

    def new_sealer(self, client: aredis.Redis, settings: Settings) -> TriggeredSealer:
        async def enqueue(cid: str, n: int, delay_ms: int) -> None:
            self.enqueued.append((cid, n, delay_ms))

        return TriggeredSealer(client, enqueue, ttl_s=settings.retention_s + 3600, clock=self.clock)


def _message(i: int, **extra: Any) -> dict[str, Any]:
    return {"channel": "sms", "to": f"+4474001{i:05d}", "body": "Code $code", "attributes": {"code": str(i)}, **extra}


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return api_settings(redis_url, tmp_path)


@pytest.fixture
def parts(settings: Settings, aredis_client: aredis.Redis) -> Parts:
    return Parts(settings, aredis_client)


def _batch(client: redis.Redis, cid: str, n: int) -> list[Any]:
    raw = client.get(keys.batch(cid, n))
    assert raw is not None, n
    batch: list[Any] = orjson.loads(raw)
    return batch


async def test_accept_appends_to_the_open_batch_and_seals_at_the_size_threshold(
    parts: Parts, redis_client: redis.Redis
) -> None:
    ids = []
    for i in range(250):
        status, body = await parts.sender.submit("k1", f"key-{i}", _message(i, recipient_id=f"user-{i}"))
        assert status == 202 and body["state"] == "queued"
        ids.append(body["message_id"])
    cid = parse_ref(ids[0])[0]
    assert [parse_ref(m)[1:] for m in ids] == [(i // 100, i % 100) for i in range(250)]
    # two batches sealed inline by the accept script, the third still open (a list of rows)
    assert redis_client.llen(open_key(cid, 2)) == 50
    assert redis_client.exists(keys.batch(cid, 2)) == 0
    assert parts.sealer._sealed == [f"{cid}|0|0", f"{cid}|1|0"]
    await parts.sealer.flush()
    assert parts.enqueued == [(cid, 0, 0), (cid, 1, 0), (cid, 2, 0)]
    assert redis_client.zcard(TO_ENQUEUE) == 0 and redis_client.exists(open_key(cid, 2)) == 0
    for n, size in enumerate([100, 100, 50]):
        not_before, rows = _batch(redis_client, cid, n)
        assert not_before == 0 and len(rows) == size
        for index, row in enumerate(rows):
            i = n * 100 + index
            assert row == [f"user-{i}#{n}.{index}", f"+4474001{i:05d}", {"body": f"Code {i}"}]
    manifest = load_manifest(redis_client, cid)
    # "accepted" stays one above the real count while the campaign is open: workers never finalize it
    assert (manifest.batches, manifest.accepted, manifest.total) == (3, 251, 250)
    assert list(iter_records(redis_client, cid, manifest.batches)) == []  # nothing claimed yet
    await parts.sealer.flush()  # nothing open: nothing sealed, nothing enqueued again
    assert len(parts.enqueued) == 3


async def test_replay_conflict_and_scope_of_the_idempotency_key(parts: Parts, redis_client: redis.Redis) -> None:
    status, first = await parts.sender.submit("k1", "order-7", _message(7))
    assert status == 202
    parts.clock.now += 30
    status, again = await parts.sender.submit("k1", "order-7", _message(7))
    assert status == 200 and again == {**first, "replayed": True}
    with pytest.raises(ApiProblem) as conflict:
        await parts.sender.submit("k1", "order-7", _message(8))
    assert conflict.value.status == 409
    with pytest.raises(ApiProblem) as invalid:
        await parts.sender.submit("k1", "order-7", _message(7, to="not a phone"))
    assert invalid.value.status == 409  # the key is taken: its rule wins over the new body's faults
    status, other_owner = await parts.sender.submit("k2", "order-7", _message(7))
    assert status == 202 and other_owner["message_id"] != first["message_id"]
    await parts.sealer.flush()
    cid = first["campaign_id"]
    assert len(_batch(redis_client, cid, 0)[1]) == 2  # the replay and the conflicts added no row
    assert redis_client.hget(state_key(cid), "accepted") == b"2"


async def test_suppression_uses_the_configured_hash_key(
    redis_url: str, tmp_path: Path, aredis_client: aredis.Redis, redis_client: redis.Redis
) -> None:
    settings = api_settings(redis_url, tmp_path, DISPATCH_SUPPRESSION_KEY="s3cret")
    parts = Parts(settings, aredis_client)
    SuppressionStore(redis_client, hasher=AddressHasher(key=b"s3cret")).add("sms", ["+447400100001"])
    SuppressionStore(redis_client, hasher=AddressHasher(key=b"other")).add("global", ["+447400100002"])  # another key
    _, blocked = await parts.sender.submit("k", "a", _message(1))
    _, passed = await parts.sender.submit("k", "b", _message(2))
    assert blocked["state"] == "suppressed" and passed["state"] == "queued"
    status, replay = await parts.sender.submit("k", "a", _message(1))
    assert status == 200 and replay == {**blocked, "replayed": True}
    await parts.sealer.flush()
    assert [row[1] for row in _batch(redis_client, passed["campaign_id"], 0)[1]] == ["+447400100002"]
    assert len(parts.enqueued) == 1


def _commands(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name: int(value["calls"]) for name, value in stats.items()}


async def test_the_frequency_cap_is_checked_at_accept_in_the_same_round_trip(
    redis_url: str, tmp_path: Path, aredis_client: aredis.Redis, redis_client: redis.Redis
) -> None:
    settings = api_settings(
        redis_url,
        tmp_path,
        DISPATCH_FREQUENCY_LIMIT="2",
        DISPATCH_FREQUENCY_WINDOW_S="3600",
        DISPATCH_SUPPRESSION_KEY="k",
    )
    parts = Parts(settings, aredis_client)
    now = parts.clock.now
    # sends recorded the way the workers record them (the deployment's keyed hash)
    sends = AsyncFrequencyStore(
        aredis_client, FrequencyCap(limit=2, window=timedelta(hours=1)), hasher=hasher_for(settings)
    )
    at_cap, under_cap, expired = "+447400100001", "+447400100002", "+447400100003"
    assert await sends.reserve("sms", at_cap, "earlier-1", now=now - 600)
    assert await sends.reserve("sms", at_cap, "earlier-2", now=now - 60)
    assert await sends.reserve("sms", under_cap, "earlier-3", now=now - 60)
    # two sends that have left the window (recorded an hour and more ago)
    key = frequency_key("sms", hasher_for(settings)(expired))
    redis_client.zadd(key, {b"old-1": (now - 3600) * 1000, b"old-2": (now - 7200) * 1000})
    freq_before = {k: redis_client.zrange(k, 0, -1) for k in redis_client.keys("dispatch:freq:*")}

    await parts.sender.submit("k", "warm-up", _message(9))  # the campaign's manifest, once per hour
    before = _commands(redis_client)
    status, capped = await parts.sender.submit("k", "a", _message(1))
    after = _commands(redis_client)
    changed = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    # one round trip (plus our INFO); the rest ran inside the script, which read the cap's set
    # (ZCOUNT) and recorded no send (no ZADD)
    assert changed.pop("cmdstat_evalsha") == 1 and changed.pop("cmdstat_info") == 1
    assert changed == {
        "cmdstat_get": 1, "cmdstat_sismember": 2, "cmdstat_zcount": 1, "cmdstat_hincrby": 1, "cmdstat_set": 1
    }  # fmt: skip
    cid = capped["campaign_id"]
    assert status == 202 and capped == {
        "message_id": f"{cid}.f.1", "campaign_id": cid, "state": "frequency_capped", "not_before": now,
        "replayed": False,
    }  # fmt: skip
    _, passed = await parts.sender.submit("k", "b", _message(2))
    _, old_sends = await parts.sender.submit("k", "c", _message(3))
    assert passed["state"] == "queued" and old_sends["state"] == "queued"
    # idempotent: the same key and body answer the same refusal, another body is a conflict
    status, replay = await parts.sender.submit("k", "a", _message(1))
    assert status == 200 and replay == {**capped, "replayed": True}
    with pytest.raises(ApiProblem) as conflict:
        await parts.sender.submit("k", "a", _message(2))
    assert conflict.value.status == 409
    # counted like suppressed messages; no row, and nothing recorded in the cap's sets at accept
    assert redis_client.hget(state_key(cid), "frequency_capped") == b"1"
    assert redis_client.hget(state_key(cid), "accepted") == b"3"
    await parts.sealer.flush()
    assert [row[1] for row in _batch(redis_client, cid, 0)[1]] == ["+447400100009", under_cap, expired]
    assert {k: redis_client.zrange(k, 0, -1) for k in redis_client.keys("dispatch:freq:*")} == freq_before
    # another channel's sends do not count
    assert (await parts.sender.submit("k", "d", _message(1, channel="sms", to="+447400100004")))[1]["state"] == "queued"


async def test_without_a_frequency_limit_accept_ignores_recorded_sends(
    parts: Parts, aredis_client: aredis.Redis, settings: Settings
) -> None:
    assert settings.frequency_limit == 0
    sends = AsyncFrequencyStore(
        aredis_client, FrequencyCap(limit=1, window=timedelta(hours=1)), hasher=hasher_for(settings)
    )
    for i in range(3):
        await sends.reserve("sms", "+447400100001", f"t{i}", now=parts.clock.now - i)
    for i in range(3):
        status, body = await parts.sender.submit("k", f"m{i}", _message(1))
        assert status == 202 and body["state"] == "queued"


async def test_a_held_message_gets_a_batch_of_its_own_with_its_not_before(
    parts: Parts, redis_client: redis.Redis
) -> None:
    # 03:00 in Tokyo: held until 08:00 local, five hours later
    parts.clock.now = 1_764_093_600.0  # 2025-11-25T18:00:00Z
    _, now_msg = await parts.sender.submit("k", "a", _message(1))
    status, held = await parts.sender.submit("k", "b", _message(2, timezone="Asia/Tokyo"))
    assert status == 202 and held["not_before"] == parts.clock.now + 5 * 3600
    _, after = await parts.sender.submit("k", "c", _message(3))
    cid = held["campaign_id"]
    assert parse_ref(now_msg["message_id"])[1:] == (0, 0) and parse_ref(held["message_id"])[1:] == (1, 0)
    assert parse_ref(after["message_id"])[1:] == (0, 1)  # the open batch is not delayed by it
    assert _batch(redis_client, cid, 1) == [held["not_before"], [["#1.0", "+447400100002", {"body": "Code 2"}]]]
    await parts.sealer.flush()
    assert sorted(parts.enqueued) == [(cid, 0, 0), (cid, 1, 5 * 3600 * 1000)]


async def test_concurrent_sealers_seal_every_row_exactly_once(
    settings: Settings, redis_url: str, parts: Parts, redis_client: redis.Redis
) -> None:
    clients = [aredis.Redis.from_url(settings.redis_url or redis_url) for _ in range(4)]
    sealers = [parts.new_sealer(c, settings) for c in clients]
    accepted: list[str] = []
    done = asyncio.Event()

    async def producer(p: int) -> None:
        for i in range(150):
            _, body = await parts.sender.submit("k", f"{p}-{i}", _message(p * 1000 + i))
            accepted.append(body["message_id"])
            if i % 7 == 0:
                await asyncio.sleep(0)

    async def sealing(sealer: TriggeredSealer, sweep: bool) -> None:
        while not done.is_set():
            if sweep:
                await sealer.sweep()
            else:
                if accepted:
                    sealer.note_open(parse_ref(accepted[0])[0])
                await sealer.flush()
            await asyncio.sleep(0.001)

    try:
        tasks = [asyncio.create_task(sealing(s, sweep=i % 2 == 0)) for i, s in enumerate(sealers)]
        await asyncio.gather(*(producer(p) for p in range(4)))
        done.set()
        await asyncio.gather(*tasks)
        for sealer in sealers:
            await sealer.sweep()
        await parts.sealer.flush()
    finally:
        for c in clients:
            await c.aclose()
    cid = parse_ref(accepted[0])[0]
    batches = int(redis_client.hget(state_key(cid), "next") or 0)
    seen: list[str] = []
    for n in range(batches):
        for index, row in enumerate(_batch(redis_client, cid, n)[1]):
            assert row[0] == f"#{n}.{index}"
            seen.append(f"{cid}.{n}.{index}")
    assert sorted(seen) == sorted(accepted) and len(accepted) == 600
    assert {n for _, n, _ in parts.enqueued} == set(range(batches))  # each at least once
    assert redis_client.zcard(TO_ENQUEUE) == 0
    assert not redis_client.keys(open_key(cid, 0)[:-1] + "*")


async def test_the_sweep_recovers_a_crash_between_seal_and_enqueue_and_orphaned_open_batches(
    settings: Settings, parts: Parts, aredis_client: aredis.Redis, redis_client: redis.Redis
) -> None:
    _, one = await parts.sender.submit("k", "a", _message(1))
    cid = one["campaign_id"]
    assert await parts.sealer.seal(cid) == f"{cid}|0|0"  # ... and the process dies before enqueueing
    _, two = await parts.sender.submit("k", "b", _message(2))  # appended, never sealed by its process
    assert redis_client.zrange(REGISTRY, 0, -1) == [cid.encode()]
    survivor = parts.new_sealer(aredis_client, settings)
    assert await survivor.sweep() == 1  # the orphaned open batch; batch 0 is not stale yet
    assert parts.enqueued == [(cid, 1, 0)]
    parts.clock.now += 6
    assert await survivor.sweep() == 1
    assert parts.enqueued == [(cid, 1, 0), (cid, 0, 0)]
    assert redis_client.zcard(TO_ENQUEUE) == 0
    assert [r[0] for r in _batch(redis_client, cid, 1)[1]] == ["#1.0"] and two["message_id"] == f"{cid}.1.0"
    assert load_manifest(redis_client, cid).accepted == 3
    # its hour is over (and the grace for clock skew): closed, with exact counts, and forgotten
    parts.clock.now = closes_at(cid) + 299
    assert await survivor.sweep() == 0 and redis_client.zcard(REGISTRY) == 1
    parts.clock.now = closes_at(cid) + 301
    assert await survivor.sweep() == 0 and redis_client.zcard(REGISTRY) == 0
    manifest = load_manifest(redis_client, cid)
    assert (manifest.accepted, manifest.total, manifest.batches) == (2, 2, 2)


# --- real workers ------------------------------------------------------------------------------


async def test_workers_deliver_micro_batched_messages_exactly_once(
    e2e_settings: Settings, clients: tuple[aredis.Redis, redis.Redis]
) -> None:
    assert e2e_settings.redis_url is not None
    app_client, sync_client = clients
    broker = build_broker(e2e_settings, with_db(e2e_settings.redis_url, e2e_settings.broker_db))
    enqueues: list[tuple[str, int]] = []

    def enqueue(cid: str, n: int, delay: int) -> None:
        enqueues.append((cid, n))
        enqueue_batch(broker, cid, n, delay)

    try:
        now = time.time()  # one triggered campaign: its hour cannot roll over mid-test
        async with running_api(e2e_settings, app_client, sync_client, enqueue=enqueue, clock=lambda: now) as api:
            with LocalCluster(e2e_settings, workers=1) as cluster:
                gate = asyncio.Semaphore(16)

                async def send(i: int) -> str:
                    async with gate:
                        reply = await api.call(
                            "POST", "/v1/messages", json=_message(i), headers={"Idempotency-Key": str(i)}
                        )
                    assert reply.status == 202, reply.body
                    return str(reply.json["message_id"])

                async def sent(count: int) -> dict[str, Any]:
                    deadline = time.monotonic() + 45
                    while True:
                        status: dict[str, Any] = (await api.call("GET", f"/v1/campaigns/{cid}", token="read")).json
                        if status["counters"]["sent"] >= count or time.monotonic() > deadline:
                            return status
                        await asyncio.sleep(0.2)

                ids = await asyncio.gather(*(send(i) for i in range(300)))
                await api.flush()
                cid = parse_ref(ids[0])[0]
                # a crash-recovery sweep (or a second API process) enqueueing every batch again
                for n in sorted({n for _, n in enqueues}):
                    enqueue_batch(broker, cid, n, 0)
                await sent(300)
                # everything accepted so far is sent: the workers must not finalize the campaign
                # (wait until they have worked through every batch message, duplicates included)
                await asyncio.to_thread(cluster.wait_drained)
                ids += await asyncio.gather(*(send(i) for i in range(300, 320)))
                status = await sent(320)
                await asyncio.to_thread(cluster.wait_drained)  # any duplicate would have been sent by then
                stats = cluster.mock_stats()
                record = (await api.call("GET", f"/v1/messages/{ids[123]}", token="read")).json
    finally:
        broker.close()
    assert status["counters"]["sent"] == 320 and status["accepted"] == 320 and status["not_sent"] == 0
    assert status["state"] == "running"
    assert stats["accepted"] == 320 and stats["duplicates"] == 0
    batches = len(set(enqueues))
    assert batches == status["batches"] and batches <= 100  # micro-batches, not one per message
    assert record["state"] == "sent" and record["provider_id"]


async def test_a_send_by_the_workers_caps_the_next_triggered_message_at_accept(
    redis_url: str, tmp_path: Path, clients: tuple[aredis.Redis, redis.Redis]
) -> None:
    settings = api_settings(
        redis_url,
        tmp_path,
        DISPATCH_HEARTBEAT_TIMEOUT_MS="3000",
        DISPATCH_FREQUENCY_LIMIT="1",
        DISPATCH_SUPPRESSION_KEY="keyed",
    )
    assert settings.redis_url is not None
    app_client, sync_client = clients
    broker = build_broker(settings, with_db(settings.redis_url, settings.broker_db))
    try:
        now = time.time()  # one triggered campaign: its hour cannot roll over mid-test
        async with running_api(
            settings,
            app_client,
            sync_client,
            enqueue=lambda cid, n, delay: enqueue_batch(broker, cid, n, delay),
            clock=lambda: now,
        ) as api:
            with LocalCluster(settings, workers=1):
                first = await api.call("POST", "/v1/messages", json=_message(1), headers={"Idempotency-Key": "1"})
                assert first.status == 202 and first.json["state"] == "queued"
                await api.flush()
                deadline = time.monotonic() + 45
                while time.monotonic() < deadline:
                    record = (await api.call("GET", f"/v1/messages/{first.json['message_id']}", token="read")).json
                    if record["state"] == "sent":
                        break
                    await asyncio.sleep(0.2)
                assert record["state"] == "sent"
                again = await api.call("POST", "/v1/messages", json=_message(1), headers={"Idempotency-Key": "2"})
                other = await api.call("POST", "/v1/messages", json=_message(2), headers={"Idempotency-Key": "3"})
                replay = await api.call("POST", "/v1/messages", json=_message(1), headers={"Idempotency-Key": "2"})
                missing = await api.call("GET", f"/v1/messages/{again.json['message_id']}", token="read")
    finally:
        broker.close()
    assert again.status == 202 and again.json["state"] == "frequency_capped"
    assert again.json["message_id"].startswith(f"{first.json['campaign_id']}.f.")
    assert other.status == 202 and other.json["state"] == "queued"
    assert replay.status == 200 and replay.json == {**again.json, "replayed": True}
    assert missing.status == 404  # like a suppressed message: no record


async def test_a_client_campaign_cannot_take_over_the_triggered_campaign(
    e2e_settings: Settings, clients: tuple[aredis.Redis, redis.Redis]
) -> None:
    """The attack: a write key creates ``triggered-sms-<this hour>`` (the triggered campaigns' former
    id) with its own body template, so other keys' triggered messages would go out under its
    manifest (its text in front) and into its batches and records. The create is refused, and even
    a campaign left at that id from before (copied here from a real plan) shares no key with the
    triggered campaign: the message goes out once, with its own body, and records its own sid."""
    assert e2e_settings.redis_url is not None
    app_client, sync_client = clients
    now = time.time()  # the API's clock for this test: the hour cannot roll over mid-test
    hour = f"{datetime.fromtimestamp(now, UTC):%Y%m%d%H}"
    with pytest.raises(PlanError, match="reserved"):
        CampaignSpec(id=f"triggered-sms-{hour}", channel="sms", body="x")
    for channel in ("sms", "email", "push", "webhook"):  # today's triggered ids: outside the client alphabet
        with pytest.raises(PlanError):
            CampaignSpec(id=f"{TRIGGERED_PREFIX}{channel}-{hour}", channel="sms", body="x")
    sids: list[str] = []

    async def twilio(recorded: Recorded) -> web.StreamResponse:
        sids.append(f"SM{secrets.token_hex(16)}")
        return web.json_response({"sid": sids[-1], "status": "queued"}, status=201)

    broker = build_broker(e2e_settings, with_db(e2e_settings.redis_url, e2e_settings.broker_db))
    attack = {"id": f"triggered-sms-{hour}", "channel": "sms", "body": "Call +1 900 555 0100 now! $body"}
    recipients = [{"id": "a1", "phone": "+447400100001", "body": "x"}, {"id": "a2", "phone": "+447400100002"}]
    try:
        async with (
            RecordingServer(twilio) as provider,
            running_api(
                e2e_settings,
                app_client,
                sync_client,
                enqueue=lambda c, n, d: enqueue_batch(broker, c, n, d),
                clock=lambda: now,
            ) as api,
        ):
            refused = await api.call("POST", "/v1/campaigns", token="write", json={"spec": attack, "recipients": []})
            # a campaign planned at the former id before this fix: a real plan's keys, renamed
            legacy = await api.call(
                "POST",
                "/v1/campaigns",
                token="write",
                json={"spec": {**attack, "id": "legacy-attack"}, "recipients": recipients},
            )
            assert legacy.status == 201, legacy.body
            for key in sync_client.scan_iter(match="dp:{legacy-attack}:*"):
                sync_client.copy(key, key.replace(b"{legacy-attack}", f"{{triggered-sms-{hour}}}".encode()))
            with LocalCluster(e2e_settings, workers=1, worker_env={"DISPATCH_SMS_BASE_URL": provider.url}) as cluster:
                login = {"channel": "sms", "to": "+447400123456", "body": "Your login code is $code"}
                sent = await api.call(
                    "POST",
                    "/v1/messages",
                    token="admin",
                    json={**login, "attributes": {"code": "493817"}},
                    headers={"Idempotency-Key": "login-1"},
                )
                assert sent.status == 202, sent.body
                await api.flush()
                deadline = time.monotonic() + 60  # until the send is confirmed (queued/sending are on the way)
                while time.monotonic() < deadline:
                    record = (await api.call("GET", f"/v1/messages/{sent.json['message_id']}", token="read")).json
                    if record["state"] not in {"pending", "queued", "sending"}:
                        break
                    await asyncio.sleep(0.2)
                await asyncio.to_thread(cluster.wait_drained)  # anything else would have been sent by then
    finally:
        broker.close()
    assert refused.status == 422, refused.body
    assert sync_client.exists(keys.manifest(f"triggered-sms-{hour}")) == 1  # only the copied one
    assert sent.json["campaign_id"] == f"{TRIGGERED_PREFIX}sms-{hour}"
    messages = [r for r in provider.requests if r.path.endswith("/Messages.json")]
    forms = [parse_qs(r.body.decode()) for r in messages]
    assert [(form["To"], form["Body"]) for form in forms] == [(["+447400123456"], ["Your login code is 493817"])]
    assert record["state"] == "sent" and record["provider_id"] == sids[0], record
