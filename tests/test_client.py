"""dispatch.api.client against a live API (real Redis, recorded enqueues) and the apikey commands."""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aredis
from test_api_support import api_settings, running_api

from dispatch.api.auth import ApiKeyStore
from dispatch.api.client import ApiError, DispatchClient
from dispatch.cli import main as cli_main
from loadtest.audience import generate_rows


async def test_client_drives_a_campaign_and_raises_problems(
    redis_url: str, tmp_path: Path, aredis_client: aredis.Redis, redis_client: redis.Redis
) -> None:
    settings = api_settings(redis_url, tmp_path)
    audience = tmp_path / "people.csv"
    rows = list(generate_rows(300, seed=2))
    with audience.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "phone", "first_name"])
        writer.writeheader()
        writer.writerows(rows)
    async with running_api(settings, aredis_client, redis_client) as api:
        client = DispatchClient(api.base, api.tokens["write"])
        spec = {"id": "c1", "channel": "sms", "body": "Hi $first_name"}
        plan = await asyncio.to_thread(client.create_campaign, spec, audience=audience)
        assert plan["total"] == 300 and plan["existing"] is False
        again = await asyncio.to_thread(client.create_campaign, spec, audience=audience)
        assert again == {**plan, "existing": True}
        small = await asyncio.to_thread(client.create_campaign, {**spec, "id": "c2"}, recipients=rows[:10])
        assert small["total"] == 10
        assert (await asyncio.to_thread(client.start, "c1"))["state"] == "running"
        assert len(api.enqueued) == plan["batches"]
        assert (await asyncio.to_thread(client.set_rate, "c1", 10.0))["rate"] == 10.0
        records = await asyncio.to_thread(lambda: list(client.messages("c1", page_size=40)))
        assert len(records) == plan["accepted"] and len({r["message_id"] for r in records}) == plan["accepted"]
        assert (await asyncio.to_thread(client.suppress, "sms", ["+447400123456"]))["added"] == 1
        sent = await asyncio.to_thread(
            lambda: client.send_message(channel="sms", to="+447400123457", body="hi", idempotency_key="k")
        )
        assert sent["state"] == "queued"
        assert (await asyncio.to_thread(client.message, sent["message_id"]))["state"] == "pending"

        with pytest.raises(ApiError) as conflict:
            await asyncio.to_thread(client.create_campaign, {**spec, "body": "other"}, audience=audience)
        assert conflict.value.status == 409
        with pytest.raises(ApiError) as invalid:
            await asyncio.to_thread(client.create_campaign, {**spec, "id": "c3", "rate": -2}, recipients=rows[:2])
        assert invalid.value.status == 422 and invalid.value.errors == [
            {"field": "spec.rate", "reason": "must be greater than 0"}
        ]
        with pytest.raises(ApiError) as scope:
            await asyncio.to_thread(client.unsuppress, "sms", "+447400123456")
        assert scope.value.status == 403
        admin = DispatchClient(api.base, api.tokens["admin"])
        assert (await asyncio.to_thread(admin.unsuppress, "sms", "+447400123456"))["removed"] == 1
        with pytest.raises(ApiError) as unauthorized:
            await asyncio.to_thread(DispatchClient(api.base, "dsp_nope").campaign, "c1")
        assert unauthorized.value.status == 401 and "not valid" in str(unauthorized.value)


async def test_client_creates_from_a_source_configured_on_the_server(
    redis_url: str, tmp_path: Path, aredis_client: aredis.Redis, redis_client: redis.Redis
) -> None:
    audience = tmp_path / "server" / "people.jsonl"
    audience.parent.mkdir()
    audience.write_bytes(b"\n".join(orjson.dumps(row) for row in generate_rows(40, seed=3)))
    sources = orjson.dumps({"people": {"kind": "file", "path": str(audience)}}).decode()
    settings = api_settings(redis_url, tmp_path, DISPATCH_SOURCES=sources)
    async with running_api(settings, aredis_client, redis_client) as api:
        client = DispatchClient(api.base, api.tokens["write"])
        spec = {"id": "from-source", "channel": "sms", "body": "Hi $first_name"}
        plan = await asyncio.to_thread(client.create_campaign, spec, source="people")
        assert plan["total"] == 40 and plan["existing"] is False
        assert await asyncio.to_thread(client.create_campaign, spec, source="people") == {**plan, "existing": True}
        with pytest.raises(ApiError) as unknown:
            await asyncio.to_thread(client.create_campaign, {**spec, "id": "other"}, source="nobody")
        assert unknown.value.status == 422 and unknown.value.errors[0]["field"] == "audience.source"
        with pytest.raises(ValueError, match="exactly one"):
            client.create_campaign(spec, source="people", audience=audience)


def test_apikey_commands_create_list_revoke(
    redis_url: str,
    tmp_path: Path,
    redis_client: redis.Redis,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DISPATCH_REDIS_URL", redis_url)
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path))
    assert cli_main(["apikey", "create", "--scope", "write", "--name", "crm"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("dsp_") and len(token) == 47
    (key,) = ApiKeyStore(redis_client).list()
    assert key.scope == "write" and key.name == "crm"
    assert cli_main(["apikey", "list"]) == 0
    listed = capsys.readouterr().out
    assert key.id in listed and token not in listed
    assert cli_main(["apikey", "revoke", key.id]) == 0
    assert ApiKeyStore(redis_client).list() == []
    assert cli_main(["apikey", "revoke", key.id]) == 1
