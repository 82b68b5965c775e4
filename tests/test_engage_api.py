"""App-reported push opens through the API, and the send-chain steps of engagement: links
rewritten before the rate limit, accepted SMS indexed for replies."""

from __future__ import annotations

import logging
import string
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis
import redis.asyncio as aredis
from test_api_support import Api, api_settings, running_api

from channels.base import Message
from channels.sms import TwilioConfig, TwilioSms
from dispatch.engage.ledger import batch_events, engagement_counters
from dispatch.engage.links import CLICKS, LinkSigner, LinkStep
from dispatch.engage.replies import ReplyIndex, ReplyIndexStep
from dispatch.plan.manifest import Manifest
from dispatch.rules.suppression import AddressHasher
from dispatch.send.engine import Item, Next, SendContext, build_chain, render_step
from dispatch.send.tracking import Outcome
from dispatch.store import keys


def _manifest(cid: str, channel: str, *, body: str = "hi", links: list[str] | None = None) -> Manifest:
    return Manifest(
        campaign_id=cid,
        fingerprint="test",
        channel=channel,
        body=body,
        total=4,
        accepted=4,
        rejected={},
        batches=1,
        batch_size=4,
        cost_units=4,
        checksum="",
        snapshot_bytes=0,
        created_at=0.0,
        prediction={"duration_s": 0.0, "verdict": "no_deadline"},
        links=links,
    )


@pytest.fixture
async def api(
    redis_url: str, tmp_path: Path, aredis_client: aredis.Redis, redis_client: redis.Redis
) -> AsyncIterator[Api]:
    async with running_api(api_settings(redis_url, tmp_path), aredis_client, redis_client) as running:
        yield running


async def test_push_open_is_recorded_once_and_only_for_push_messages(api: Api, redis_client: redis.Redis) -> None:
    redis_client.set(keys.manifest("app-push"), _manifest("app-push", "push").encode())
    redis_client.set(keys.manifest("app-sms"), _manifest("app-sms", "sms").encode())
    first = await api.call("POST", "/v1/events/push-open", json={"ref": "app-push.0.2"})
    assert (first.status, first.json) == (200, {"ref": "app-push.0.2", "event": "open", "recorded": True})
    again = await api.call("POST", "/v1/events/push-open", json={"ref": "app-push.0.2"})
    assert again.json["recorded"] is False
    assert engagement_counters(redis_client, "app-push")["open"] == 1
    assert set(batch_events(redis_client, "app-push", 0)) == {2}
    assert (await api.call("POST", "/v1/events/push-open", json={"ref": "app-sms.0.1"})).status == 422
    for ref in ("nope.0.1", "app-push.7.1", "not a ref"):
        assert (await api.call("POST", "/v1/events/push-open", json={"ref": ref})).status == 404
    denied = await api.call("POST", "/v1/events/push-open", token="read", json={"ref": "app-push.0.3"})
    anonymous = await api.call("POST", "/v1/events/push-open", token=None, json={"ref": "app-push.0.3"})
    assert (denied.status, anonymous.status) == (403, 401)
    assert engagement_counters(redis_client, "app-push")["open"] == 1


async def test_links_without_a_signer_go_out_untracked_and_sent_sms_are_indexed(aredis_client: aredis.Redis) -> None:
    body = "Go $link(https://shop.example/x) now"
    manifest = _manifest("steps", "sms", body=body, links=["https://shop.example/x"])
    index = ReplyIndex(aredis_client, hasher=AddressHasher(key=b"k" * 32), ttl_s=60)
    seen: list[Message] = []

    async def provider(ctx: SendContext, items: list[Item], nxt: Next) -> None:  # accepts all but the last
        for item in items:
            assert item.message is not None
            seen.append(item.message)
            item.outcome = Outcome(item.index, "sent" if item.index < 3 else "failed", 1)
        await nxt(ctx, items)

    async with aiohttp.ClientSession() as session:
        channel = TwilioSms(
            session,
            TwilioConfig(base_url="http://127.0.0.1:9", account_sid="AC" + "1" * 32, auth_token="t", from_number="+1"),
        )
        ctx = SendContext(
            campaign_id="steps", batch=0, channel=channel, manifest=manifest, template=string.Template(body)
        )
        items = [Item(i, f"r{i}", f"+4474001111{i:02d}", None, 0) for i in range(4)]
        indexing = ReplyIndexStep(index)
        await build_chain([render_step, LinkStep(None), provider, indexing])(ctx, items)
        await indexing.flush()  # the index is written in groups
    assert [m.body for m in seen] == ["Go https://shop.example/x now"] * 4
    assert [await index.last_ref(f"+4474001111{i:02d}") for i in range(4)] == [
        "steps.0.0",
        "steps.0.1",
        "steps.0.2",
        None,
    ]


async def test_dispatch_serve_redirects_tracked_links_without_an_api_key(
    redis_url: str,
    tmp_path: Path,
    aredis_client: aredis.Redis,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    settings = api_settings(redis_url, tmp_path, DISPATCH_LINK_BASE_URL="https://go.example")
    redis_client.set(keys.manifest("served"), _manifest("served", "sms", links=["https://shop.example/a"]).encode())
    signer = LinkSigner.from_settings(settings)  # the same $DISPATCH_HOME/link.key as the API's
    assert signer is not None
    token = signer.token("served", 0, 1, 0)
    async with running_api(settings, aredis_client, redis_client) as api:
        async with api.session.get(f"{api.base}/r/{token}", allow_redirects=False) as response:
            assert (response.status, response.headers["Location"]) == (302, "https://shop.example/a")
        async with api.session.get(f"{api.base}/r/{token[:-1]}", allow_redirects=False) as response:
            assert response.status == 404
        assert api.app is not None
        await api.app[CLICKS].flush()
    assert (tmp_path / "link.key").stat().st_mode & 0o077 == 0
    logged = [r.getMessage() for r in caplog.records if "/r/" in r.getMessage()]
    assert logged and all(token not in line and token[:-1] not in line for line in logged)
    assert engagement_counters(redis_client, "served")["bot_click"] == 1  # aiohttp's User-Agent: a script
