"""Channel limits are checked at plan time (issue 19): the registry declares them, the planner
refuses a campaign no recipient could be sent, and rejects a recipient whose personalized body is
over the limit, in the general and the fast CSV path alike."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import redis

from dispatch.campaign import CampaignSpec
from dispatch.config import Settings, load_settings
from dispatch.errors import PlanError
from dispatch.plan.planner import Planner, read_csv_rows
from dispatch.store import keys

_ids = itertools.count()


def _settings(home: Path) -> Settings:
    return load_settings({"DISPATCH_HOME": str(home), "DISPATCH_CPU_SPEED_PROBE": "0"})


def test_email_without_a_subject_is_refused_before_anything_is_written(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    cid = f"nosubject-{next(_ids)}"
    spec = CampaignSpec(id=cid, channel="email", body="Hello", quiet_hours=None)
    with pytest.raises(PlanError, match="needs a subject"):
        Planner(redis_client, _settings(tmp_path)).plan(spec, [{"id": "r1", "email": "a@example.com"}])
    assert not redis_client.exists(keys.manifest(cid))
    blank = CampaignSpec(id=cid, channel="email", body="Hello", subject="  ", quiet_hours=None)
    with pytest.raises(PlanError, match="needs a subject"):
        Planner(redis_client, _settings(tmp_path)).plan(blank, [{"id": "r1", "email": "a@example.com"}])
    ok = CampaignSpec(id=cid, channel="email", body="Hello", subject="News", quiet_hours=None)
    assert Planner(redis_client, _settings(tmp_path)).plan(ok, [{"id": "r1", "email": "a@example.com"}]).accepted == 1


def test_an_sms_body_over_1600_characters_is_refused(redis_client: redis.Redis, tmp_path: Path) -> None:
    cid = f"longsms-{next(_ids)}"
    spec = CampaignSpec(id=cid, channel="sms", body="x" * 1601, quiet_hours=None)
    with pytest.raises(PlanError, match=r"1,601 characters.*at most 1,600"):
        Planner(redis_client, _settings(tmp_path)).plan(spec, [{"id": "r1", "phone": "+447400000001"}])
    assert not redis_client.exists(keys.manifest(cid))
    # the fields do not count against the body: no field value could make it shorter
    spec = CampaignSpec(id=cid, channel="sms", body="x" * 1601 + "$name", quiet_hours=None)
    with pytest.raises(PlanError, match="without its fields"):
        Planner(redis_client, _settings(tmp_path)).plan(spec, [{"id": "r1", "phone": "+447400000001", "name": ""}])


@pytest.mark.parametrize("how", ["file", "rows"])
def test_a_personalized_body_over_the_limit_is_that_rows_rejection(
    redis_client: redis.Redis, tmp_path: Path, how: str
) -> None:
    path = tmp_path / "a.csv"
    long_name = "N" * 1600
    path.write_text(f"id,phone,name\nr1,+447400000001,Ann\nr2,+447400000002,{long_name}\nr3,+447400000003,Bo\n")
    spec = CampaignSpec(id=f"personal-{how}-{next(_ids)}", channel="sms", body="Hi $name", quiet_hours=None)
    planner = Planner(redis_client, _settings(tmp_path))
    report = planner.plan_file(spec, path) if how == "file" else planner.plan(spec, read_csv_rows(path))
    assert (report.total, report.accepted, report.rejected) == (3, 2, {"body_too_long": 1})
    lines = Path(str(report.rejected_file)).read_text(encoding="utf-8").splitlines()
    assert lines[1:] == ["2,r2,body,body_too_long"]
