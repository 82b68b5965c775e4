"""The ``dispatch`` command line, locally (Redis) and through the API (``--api``)."""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aredis
from test_api_support import api_settings, running_api

from dispatch.cli import main as cli_main
from loadtest.audience import generate_rows


def _audience(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "people.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "phone", "first_name"])
        writer.writeheader()
        writer.writerows(generate_rows(count, seed=4))
    return path


def test_plan_status_export_locally(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCH_REDIS_URL", redis_url)
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path))
    campaign = tmp_path / "c.json"
    campaign.write_bytes(orjson.dumps({"id": "cli-1", "channel": "sms", "body": "Hi $first_name"}))
    assert cli_main(["plan", str(campaign), "--audience", str(_audience(tmp_path, 200)), "--json"]) == 0
    plan = orjson.loads(capsys.readouterr().out)
    assert plan["total"] == 200 == plan["accepted"] + sum(plan["rejected"].values())
    assert cli_main(["status", "cli-1", "--json"]) == 0
    status = orjson.loads(capsys.readouterr().out)
    assert status["state"] == "planned" and status["accepted"] == plan["accepted"]
    assert cli_main(["export", "cli-1", "--format", "csv"]) == 0
    exported = capsys.readouterr().out.splitlines()
    assert exported[0] == "batch,index,recipient_id,state,attempts,provider,provider_id,code,ts"
    assert len(exported) == 1 + plan["accepted"]  # every accepted message, queued until claimed
    assert all(",queued," in line for line in exported[1:])
    assert all("+" not in line for line in exported)  # no addresses
    assert cli_main(["pause", "cli-1"]) == 2  # a planned campaign cannot be paused: clear error, exit 2
    assert "cannot make it paused" in capsys.readouterr().err
    assert cli_main(["status", "no-such-campaign"]) == 2


def test_invalid_setting_is_a_clear_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCH_BATCH_SIZE", "many")
    assert cli_main(["status", "x"]) == 2
    assert "DISPATCH_BATCH_SIZE" in capsys.readouterr().err


async def test_commands_go_through_the_api_with_api_and_token(
    redis_url: str,
    tmp_path: Path,
    aredis_client: aredis.Redis,
    redis_client: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = api_settings(redis_url, tmp_path)
    campaign = tmp_path / "c.toml"
    campaign.write_text('id = "cli-api"\nchannel = "sms"\nbody = "Hi $first_name"\n')
    audience = _audience(tmp_path, 100)
    async with running_api(settings, aredis_client, redis_client) as api:
        remote = ["--api", api.base, "--token", api.tokens["write"]]

        def run(*argv: str) -> int:
            return cli_main([*remote, *argv])

        assert await asyncio.to_thread(run, "plan", str(campaign), "--audience", str(audience), "--json") == 0
        plan = orjson.loads(capsys.readouterr().out)
        assert plan["campaign_id"] == "cli-api" and plan["total"] == 100
        assert await asyncio.to_thread(run, "start", "cli-api") == 0
        assert "running" in capsys.readouterr().out
        assert await asyncio.to_thread(run, "rate", "cli-api", "25") == 0
        assert await asyncio.to_thread(run, "status", "cli-api", "--json") == 0
        assert orjson.loads(capsys.readouterr().out.split("\n", 1)[1])["rate"] == 25.0
        assert await asyncio.to_thread(run, "export", "cli-api") == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == plan["accepted"]
        bad = await asyncio.to_thread(cli_main, ["--api", api.base, "--token", "dsp_wrong", "status", "cli-api"])
        assert bad == 2
        assert "401" in capsys.readouterr().err
