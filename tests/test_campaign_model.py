"""One model of a campaign: every field the campaign file takes, the API takes (issue 16, issue 19).

The campaign file, the API's create bodies and the published OpenAPI component are all
``CampaignSpec``; these tests round-trip every field both ways and through a real API create.
"""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aredis
from pydantic import ValidationError
from test_api_support import Api, api_settings, running_api

from dispatch.api.openapi import openapi_document
from dispatch.api.schemas import SCHEMAS
from dispatch.campaign import CampaignSpec, load_campaign_file
from dispatch.errors import PlanError
from dispatch.plan.snapshot import load_manifest
from dispatch.rules.checks import QuietHours
from loadtest.audience import generate_rows

#: A campaign file that sets every field to something other than its default (README "Planning").
EVERY_FIELD_TEMPLATE = """\
id = "every-field"
channel = "sms"
body = "Hi $first_name, 20% off today"
subject = "Offer"
deadline = "{deadline}"
rate = 150
batch_size = 40
max_staleness = "30d"
as_of = "{as_of}"
require_consent = true
quiet_hours = {{ start = "09:30", end = "20:00" }}
default_timezone = "America/New_York"
region = "GB"
require_timezone = true
"""
#: The file, with the deadline and the watermark taken from the clock (a watermark in the future is refused).
EVERY_FIELD = EVERY_FIELD_TEMPLATE.format(
    deadline=(datetime.now(UTC) + timedelta(days=30)).isoformat(timespec="seconds"),
    as_of=(datetime.now(UTC) - timedelta(hours=1)).isoformat(timespec="seconds"),
)


def _every_field(tmp_path: Path) -> tuple[Path, CampaignSpec]:
    path = tmp_path / "c.toml"
    path.write_text(EVERY_FIELD)
    return path, load_campaign_file(path)


def test_the_campaign_file_sets_every_field_and_the_api_json_reads_back_equal(tmp_path: Path) -> None:
    _, spec = _every_field(tmp_path)
    inputs = set(CampaignSpec.model_fields) - {"deadline_in_s"}
    assert set(tomllib.loads(EVERY_FIELD)) == inputs  # the file above really sets every field
    default = CampaignSpec(id="d", channel="email", body="x")
    assert all(getattr(spec, name) != getattr(default, name) for name in inputs)
    assert spec.max_staleness == timedelta(days=30) and spec.quiet_hours == QuietHours(time(9, 30), time(20))
    wire = orjson.loads(orjson.dumps(spec.as_json()))  # what a client sends
    assert set(wire) == inputs
    again = CampaignSpec.from_mapping(wire)
    assert again == spec and again.fingerprint() == spec.fingerprint()
    # the other way: the API's JSON form of a spec, written as a campaign file, is the same spec
    assert CampaignSpec.from_mapping(tomllib.loads(_toml(wire))) == spec
    off = CampaignSpec.from_mapping({**wire, "quiet_hours": False, "max_staleness": None})
    assert CampaignSpec.from_mapping(off.as_json()) == off and off.quiet_hours is None


def _toml(data: dict[str, object]) -> str:
    def value(v: object) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return orjson.dumps(v).decode() if not isinstance(v, bool) else str(v).lower()

    return "".join(f"{k} = {value(v)}\n" for k, v in data.items() if v is not None)


def test_deadline_in_s_is_a_field_of_the_model_too() -> None:
    before = datetime.now(UTC)
    spec = CampaignSpec.from_mapping({"id": "rel", "channel": "sms", "body": "x", "deadline_in_s": 3600})
    assert spec.deadline is not None and before + timedelta(seconds=3590) <= spec.deadline
    assert "deadline_in_s" not in spec.as_json() and CampaignSpec.from_mapping(spec.as_json()) == spec
    assert "deadline_in_s" in SCHEMAS["CampaignSpec"]["properties"]


def test_the_published_component_lists_exactly_the_models_fields() -> None:
    component = openapi_document()["components"]["schemas"]["CampaignSpec"]
    assert set(component["properties"]) == set(CampaignSpec.model_fields)
    assert component["additionalProperties"] is False and component["required"] == ["id", "channel", "body"]


def test_fingerprints_of_stored_plans_are_unchanged() -> None:
    """Values computed with the dataclass spec: a re-create of an existing campaign must match."""
    full = {
        **{"id": "fp", "channel": "sms", "body": "Hi $first_name", "subject": "S"},
        **{"deadline": "2026-11-27T20:00:00Z", "rate": 200, "batch_size": 500, "max_staleness": "30d"},
        **{"as_of": "2026-11-26T06:00:00Z", "require_consent": True},
        **{"quiet_hours": {"start": "09:00", "end": "20:30"}, "default_timezone": "America/New_York"},
        "require_timezone": True,
    }
    assert CampaignSpec.from_mapping(full).fingerprint() == "d4831ceae7cb3c48"
    assert CampaignSpec.from_mapping({"id": "fp", "channel": "sms", "body": "Hi"}).fingerprint() == "462a26834f584ae8"
    assert CampaignSpec(id="fp", channel="sms", body="Hi", quiet_hours=None).fingerprint() == "93ec4f06d2ad25ec"


def test_a_spec_built_in_code_is_checked_like_the_file() -> None:
    with pytest.raises(PlanError, match=r"campaign c: max_staleness: duration 'soon'"):
        CampaignSpec(id="c", channel="sms", body="x", max_staleness="soon")
    with pytest.raises(PlanError, match="deadline: needs a timezone"):
        CampaignSpec.from_mapping({"id": "c", "channel": "sms", "body": "x", "deadline": "2026-11-27T20:00:00"})
    with pytest.raises(PlanError, match="reserved for triggered messages"):
        CampaignSpec(id="triggered-sms-1", channel="sms", body="x")
    with pytest.raises(ValidationError, match="frozen"):
        CampaignSpec(id="c", channel="sms", body="x").__setattr__("rate", 5.0)


@pytest.fixture
async def api(
    redis_url: str, tmp_path: Path, aredis_client: aredis.Redis, redis_client: redis.Redis
) -> AsyncIterator[Api]:
    async with running_api(api_settings(redis_url, tmp_path), aredis_client, redis_client) as running:
        yield running


async def test_the_api_plans_every_campaign_file_field(api: Api, redis_client: redis.Redis, tmp_path: Path) -> None:
    """What ``dispatch --api URL plan c.toml`` sends (the file's mapping) is planned with every field."""
    _, spec = _every_field(tmp_path)
    rows = list(generate_rows(30, seed=9))
    created = await api.call("POST", "/v1/campaigns", json={"spec": tomllib.loads(EVERY_FIELD), "recipients": rows})
    assert created.status == 201, created.body
    manifest = load_manifest(redis_client, spec.id)
    assert manifest.fingerprint == spec.fingerprint()
    policy = spec.policy()
    assert {k: (manifest.policy or {})[k] for k in policy} == policy
    assert policy["require_consent"] is True and policy["quiet_hours"] == ["09:30", "20:00"]
    # the API's JSON form of the same spec is the same campaign: answered with the stored plan
    again = await api.call("POST", "/v1/campaigns", json={"spec": spec.as_json(), "recipients": rows})
    assert again.status == 200 and again.json["existing"] is True
    bad = await api.call(
        "POST",
        "/v1/campaigns",
        json={"spec": {**spec.as_json(), "id": "b", "max_staleness": "soon", "quiet_hours": 3}, "recipients": rows},
    )
    assert bad.status == 422
    assert {e["field"] for e in bad.json["errors"]} == {"spec.max_staleness", "spec.quiet_hours"}
