"""Configured audience sources: ``dispatch plan --audience source:NAME`` locally (file and
PostgreSQL sources, real Redis and, when one answers, a real PostgreSQL) and through the API."""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aredis
from test_api_support import PG_PASSWORD, api_settings, postgres_table, running_api

from dispatch.cli import main as cli_main
from dispatch.plan.sources import _scrub, parse_reference
from dispatch.store import keys
from loadtest.audience import generate_rows

ROWS = list(generate_rows(150, seed=9))


def _write_csv(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "phone", "first_name"])
        writer.writeheader()
        writer.writerows(ROWS)
    return path


@pytest.fixture
def local(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A campaign file; the CLI talks to the test Redis with ``tmp_path`` as its home."""
    monkeypatch.setenv("DISPATCH_REDIS_URL", redis_url)
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path))
    campaign = tmp_path / "c.toml"
    campaign.write_text('id = "src-1"\nchannel = "sms"\nbody = "Hi $first_name"\n')
    return campaign


def _plan(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert cli_main(list(argv)) == 0, capsys.readouterr().err
    plan: dict[str, object] = orjson.loads(capsys.readouterr().out)
    return plan


def test_plan_from_a_configured_file_source_matches_the_file(
    local: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_client: redis.Redis
) -> None:
    audience = _write_csv(tmp_path / "exports" / "nightly.csv")
    config = tmp_path / "dispatch.toml"
    config.write_text(f'[sources.nightly]\nkind = "file"\npath = "{audience}"\n')
    by_name = _plan(capsys, "--config", str(config), "plan", str(local), "--audience", "source:nightly", "--json")
    assert by_name["total"] == 150 and by_name["existing"] is False
    redis_client.flushdb()
    by_path = _plan(capsys, "plan", str(local), "--audience", str(audience), "--json")
    for field in ("total", "accepted", "rejected", "batches"):
        assert by_name[field] == by_path[field], field
    # unknown names and a --query beside a source are clear errors (exit 2), naming no DSN
    assert cli_main(["--config", str(config), "plan", str(local), "--audience", "source:crm"]) == 2
    err = capsys.readouterr().err
    assert "no audience source named 'crm' (configured: nightly)" in err
    assert cli_main(["--config", str(config), "plan", str(local), "--audience", "source:nightly", "--query", "x"]) == 2
    assert "--query is only for a postgresql://" in capsys.readouterr().err


def test_plan_from_a_configured_postgres_source(
    local: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_client: redis.Redis
) -> None:
    with postgres_table(ROWS) as (dsn, table):
        config = tmp_path / "dispatch.toml"
        config.write_text(
            f'[sources.crm]\nkind = "postgres"\ndsn = "{dsn}"\nquery = "SELECT * FROM {table} ORDER BY id"\n\n'
            f'[sources.down]\nkind = "postgres"\ndsn = "postgresql://u:{PG_PASSWORD}@127.0.0.1:1/x"\nquery = "x"\n'
        )
        from_pg = _plan(capsys, "--config", str(config), "plan", str(local), "--audience", "source:crm", "--json")
        assert cli_main(["--config", str(config), "plan", str(local), "--audience", "source:down"]) == 2
        err = capsys.readouterr().err
    assert "source 'down': cannot connect to the audience database" in err and PG_PASSWORD not in err
    redis_client.flushdb()
    from_file = _plan(capsys, "plan", str(local), "--audience", str(_write_csv(tmp_path / "same.csv")), "--json")
    for field in ("total", "accepted", "rejected", "batches"):
        assert from_pg[field] == from_file[field], field


async def test_plan_through_the_api_names_the_servers_source(
    redis_url: str,
    tmp_path: Path,
    aredis_client: aredis.Redis,
    redis_client: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    audience = _write_csv(tmp_path / "server" / "nightly.csv")
    server = api_settings(
        redis_url,
        tmp_path,
        DISPATCH_SOURCES=orjson.dumps({"nightly": {"kind": "file", "path": str(audience)}}).decode(),
    )
    campaign = tmp_path / "c.json"
    campaign.write_bytes(orjson.dumps({"id": "remote-src", "channel": "sms", "body": "Hi $first_name"}))
    async with running_api(server, aredis_client, redis_client) as api:
        remote = ["--api", api.base, "--token", api.tokens["write"], "plan", str(campaign)]

        def run(*argv: str) -> int:
            return cli_main([*remote, *argv])

        assert await asyncio.to_thread(run, "--audience", "source:nightly", "--json") == 0
        plan = orjson.loads(capsys.readouterr().out)
        assert plan["campaign_id"] == "remote-src" and plan["total"] == 150 and plan["existing"] is False
        assert await asyncio.to_thread(run, "--audience", "source:nightly", "--json") == 0
        assert orjson.loads(capsys.readouterr().out) == {**plan, "existing": True}
        assert await asyncio.to_thread(run, "--audience", "source:weekly") == 2
        assert "audience.source: no configured source named 'weekly'" in capsys.readouterr().err
    assert orjson.loads(redis_client.get(keys.manifest("remote-src")))["audience_source"] == "nightly"


def test_references_and_scrubbing() -> None:
    assert parse_reference("source:crm") == "crm"
    assert parse_reference("/data/source:crm.csv") is None
    assert parse_reference("postgresql://h/d") is None
    url = f"postgresql://u:{PG_PASSWORD}@h/d"
    assert PG_PASSWORD not in _scrub(f"failed for {url} ({PG_PASSWORD})", url)
    conninfo = f"host=h dbname=d password={PG_PASSWORD}"
    assert _scrub(f"bad password {PG_PASSWORD}", conninfo) == "bad password ***"
