"""``dispatch suppress ...`` and the planning command through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import redis

from dispatch.cli import main
from dispatch.config import load_settings
from dispatch.rules.suppression import SuppressionStore, hasher_for


@pytest.fixture
def env(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DISPATCH_REDIS_URL", redis_url)
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path))
    monkeypatch.delenv("DISPATCH_CONFIG", raising=False)
    return tmp_path


def _deployment_store(client: redis.Redis) -> SuppressionStore:
    """The store as the CLI sees it: the deployment's key (DISPATCH_HOME is the test's)."""
    return SuppressionStore(client, hasher=hasher_for(load_settings()))


def test_add_remove_count_normalize(env: Path, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["suppress", "add", "sms", "+44 7400 123456", "+4915123456789"]) == 0
    assert main(["suppress", "add", "sms", "+447400123456"]) == 0  # same number, other spelling
    assert "sms: 0 added" in capsys.readouterr().out
    assert _deployment_store(redis_client).contains_many("sms", ["+447400123456", "+4915123456789"]) == [True, True]
    assert main(["suppress", "add", "sms", "not-a-number"]) == 2
    assert "not valid sms addresses" in capsys.readouterr().err
    assert main(["suppress", "add", "global", "Ann@Example.COM"]) == 0
    assert _deployment_store(redis_client).contains_many("email", ["Ann@example.com"]) == [True]
    assert main(["suppress", "remove", "sms", "+49 151 23456789"]) == 0
    capsys.readouterr()
    assert main(["suppress", "count", "sms"]) == 0
    assert capsys.readouterr().out.strip() == "1"


def test_import_export_round_trip(env: Path, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    source = env / "optouts.txt"
    source.write_text("# opt-outs\n+447400000001\n\n+44 7400 000002\ngarbage\n")
    assert main(["suppress", "import", "sms", str(source)]) == 0
    assert "2 added, 1 invalid" in capsys.readouterr().out
    exported = env / "hashes.txt"
    assert main(["suppress", "export", "sms", "--output", str(exported)]) == 0
    hashes = exported.read_text().split()
    assert len(hashes) == 2 and all(len(h) == 32 for h in hashes)
    assert "7400" not in exported.read_text()  # hashes, never addresses
    assert main(["suppress", "import", "email", str(exported), "--hashes"]) == 0
    assert _deployment_store(redis_client).count("email") == 2


def test_plan_command_reports_reasons_schedule_and_verdict(
    env: Path, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    _deployment_store(redis_client).add("sms", ["+447400000002"])
    campaign = env / "c.toml"
    campaign.write_text('id = "cli-plan"\nchannel = "sms"\nbody = "Hi $first_name"\nquiet_hours = false\n')
    audience = env / "a.csv"
    audience.write_text(
        "id,phone,first_name\nr1,+447400000001,Ann\nr2,+447400000002,Bob\nr3,+447400000001,Cy\nr4,x,Di\n"
    )
    assert main(["plan", str(campaign), "--audience", str(audience),
                 "--json"]) == 0  # fmt: skip
    report = orjson.loads(capsys.readouterr().out)
    assert report["total"] == 4 and report["accepted"] == 1
    assert report["rejected"] == {"suppressed": 1, "duplicate": 1, "invalid_phone": 1}
    assert report["schedule"][0]["recipients"] == 1 and report["prediction"]["verdict"] == "no_deadline"
    bad = env / "bad.toml"
    bad.write_text('id = "cli-bad"\nchannel = "sms"\nbody = "Hi $nickname"\n')
    assert main(["plan", str(bad), "--audience", str(audience)]) == 2
    assert "$nickname but the audience has no such column" in capsys.readouterr().err
