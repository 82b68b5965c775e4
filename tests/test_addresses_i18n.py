"""Issue 19: national phone numbers and the region that reads them (campaign field, audience
column, ``--region``), internationalized email addresses (RFC 6531/6532) normalized one way for
dedup and suppression everywhere, and time zones that are given but unknown."""

from __future__ import annotations

import itertools
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio as aredis
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from test_api_support import Api, api_settings, running_api
from test_planner_csv import _config, _fast, _general

from channels.base import Message, Sent
from channels.email import SendGridConfig, SendGridEmail
from dispatch.campaign import CampaignSpec
from dispatch.cli import main
from dispatch.config import Settings, load_settings
from dispatch.errors import PlanError
from dispatch.plan.planner import Planner
from dispatch.plan.snapshot import iter_batches, load_manifest
from dispatch.rules.checks import QuietHours, Reason
from dispatch.rules.suppression import AddressHasher, SuppressionStore, hasher_for
from dispatch.rules.validation import AddressValidator, check_email
from loadtest.mock_recorder import Recorded, RecordingServer

#: The suppression key of this test's stores.
TEST_HASHER = AddressHasher(key=b"test-suppression-key")
_ids = itertools.count()

#: libphonenumber's example mobile numbers, written as their own country writes them.
GB_NATIONAL = "07400 123456"  # +447400123456
GB_IDD = "0044 7400 123457"  # +447400123457 through the 00 international prefix
DE_NATIONAL = "01512 3456789"  # +4915123456789
US_NATIONAL = "(201) 555-0123"  # +12015550123


def _settings(tmp_path: Path) -> Settings:
    return load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_BATCH_SIZE": "50"})


def _planner(client: redis.Redis, tmp_path: Path) -> Planner:
    return Planner(client, _settings(tmp_path), suppression=SuppressionStore(client, hasher=TEST_HASHER))


def _spec(**extra: Any) -> CampaignSpec:
    values: dict[str, Any] = {"id": f"i18n-{next(_ids)}", "channel": "sms", "body": "Hi", "quiet_hours": None}
    return CampaignSpec(**{**values, **extra})


def _addresses(client: redis.Redis, campaign_id: str) -> list[str]:
    count = load_manifest(client, campaign_id).batches
    return [row.address for batch in iter_batches(client, campaign_id, count) for row in batch.rows]


# --- the region: campaign field ------------------------------------------------------------------


def test_the_campaign_region_is_an_iso_code_and_part_of_the_fingerprint() -> None:
    assert _spec(region="gb").region == "GB"
    assert _spec(region=" UK ").region == "GB"  # ISO 3166 reserves UK for GB
    assert _spec(region=None).region is None and _spec(region="").region is None
    for bad in ("XX", "Britain", "G", 44):
        with pytest.raises(PlanError, match=r"region: .*(ISO 3166|expected string)"):
            _spec(region=bad)
    plain = CampaignSpec(id="fp", channel="sms", body="Hi")
    assert plain.fingerprint() == "462a26834f584ae8"  # unchanged: stored plans keep matching
    assert CampaignSpec(id="fp", channel="sms", body="Hi", region="GB").fingerprint() != plain.fingerprint()
    assert CampaignSpec.from_mapping(_spec(region="DE").as_json()).region == "DE"


def test_national_numbers_are_read_in_the_campaign_region(redis_client: redis.Redis, tmp_path: Path) -> None:
    rows = [
        {"id": "a", "phone": GB_NATIONAL},
        {"id": "b", "phone": GB_IDD},
        {"id": "c", "phone": "+44 7400 123458"},
        {"id": "d", "phone": "not a number"},
    ]
    without = _planner(redis_client, tmp_path).plan(_spec(), rows)
    assert without.accepted == 1 and without.rejected == {"invalid_phone": 3}
    (hint,) = without.extra["hints"]
    assert hint.startswith("3 numbers were not in international format; set region = ")
    assert "--region" in hint
    spec = _spec(region="GB")
    report = _planner(redis_client, tmp_path).plan(spec, rows)
    assert report.accepted == 3 and report.rejected == {"invalid_phone": 1}
    assert report.extra["hints"] == []  # the one left is garbage, not a national number
    assert sorted(_addresses(redis_client, spec.id)) == ["+447400123456", "+447400123457", "+447400123458"]


def test_the_recipients_own_region_wins(redis_client: redis.Redis, tmp_path: Path) -> None:
    rows = [
        {"id": "a", "phone": GB_NATIONAL, "region": "GB"},
        {"id": "b", "phone": DE_NATIONAL, "country": "de"},
        {"id": "c", "phone": US_NATIONAL},  # the campaign's
        {"id": "d", "phone": US_NATIONAL, "region": "Narnia"},  # an unreadable region is not the campaign's
        {"id": "e", "phone": "+447400123459", "country": "Narnia"},  # international: no region needed
    ]
    spec = _spec(region="US", body="Hi from $country")
    report = _planner(redis_client, tmp_path).plan(spec, rows)
    assert report.accepted == 4 and report.rejected == {"invalid_phone": 1}
    assert report.extra["hints"] == [
        "1 number was not in international format and had a region/country value that is not an ISO 3166 "
        "alpha-2 code (e.g. GB)"
    ]
    assert sorted(_addresses(redis_client, spec.id)) == [
        "+12015550123",
        "+447400123456",
        "+447400123459",
        "+4915123456789",
    ]


def test_csv_fast_path_reads_the_region_columns_like_the_general_path(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "a.csv"
    path.write_text(
        "id,phone,region,country,first_name\n"
        f"a,{GB_NATIONAL},GB,,Ann\n"
        f"b,{DE_NATIONAL},,DE,Bo\n"
        f"c,{DE_NATIONAL},GB,DE,Cy\n"  # region wins over country: not a valid GB number
        f"d,{US_NATIONAL},,,Di\n"
        f"e,{GB_IDD}, ,,Ed\n"
    )
    spec = _spec(body="Hi $first_name")
    report = _planner(redis_client, tmp_path).plan_file(spec, path, processes=1)
    assert report.accepted == 2 and report.rejected == {"invalid_phone": 3}
    assert report.extra["hints"][0].startswith("2 numbers were not in international format; set region")
    assert sorted(_addresses(redis_client, spec.id)) == ["+447400123456", "+4915123456789"]


_region_line = st.tuples(
    st.sampled_from(["r1", "r2", "r3", "", " "]),
    st.sampled_from([GB_NATIONAL, GB_IDD, DE_NATIONAL, US_NATIONAL, "+447400000001", "011 49 15123456789", "12", ""]),
    st.sampled_from(["", "GB", "gb", "DE", "US", "Narnia", " ", "UK"]),
    st.sampled_from(["", "DE", "us", "XX"]),
    st.sampled_from(["Europe/London", "", "Mars/Olympus", " Asia/Tokyo "]),
).map(lambda t: ",".join(t).encode())


@settings(max_examples=80, deadline=None)
@given(
    lines=st.lists(_region_line, max_size=25),
    region=st.sampled_from([None, "GB", "US"]),
    zone=st.sampled_from([None, "America/New_York"]),
    chunk=st.integers(1, 300),
)
def test_fast_path_matches_the_general_path_with_regions_and_zones(
    tmp_path_factory: Any, lines: list[bytes], region: str | None, zone: str | None, chunk: int
) -> None:
    path = tmp_path_factory.mktemp("csv") / "a.csv"
    path.write_bytes(b"id,phone,region,country,timezone\n" + b"".join(line + b"\n" for line in lines))
    config = _config(region=region, default_timezone=zone, freshness=None, template_fields=(), body="Hi")
    assert _fast(config, path, processes=1, chunk_bytes=chunk) == _general(config, path)


# --- the region: the command line ----------------------------------------------------------------


@pytest.fixture
def env(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DISPATCH_REDIS_URL", redis_url)
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path))
    monkeypatch.delenv("DISPATCH_CONFIG", raising=False)
    monkeypatch.delenv("DISPATCH_API_URL", raising=False)
    return tmp_path


def test_plan_command_hints_at_the_region_and_region_sets_it(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audience = env / "a.csv"
    audience.write_text(f"id,phone\nr1,{GB_NATIONAL}\nr2,{GB_IDD}\nr3,+447400000001\n")
    campaign = env / "c.toml"
    campaign.write_text('id = "cli-region-1"\nchannel = "sms"\nbody = "Hi"\nquiet_hours = false\n')
    assert main(["plan", str(campaign), "--audience", str(audience)]) == 0
    out = capsys.readouterr().out
    assert "invalid_phone" in out
    assert "hint: 2 numbers were not in international format; set region = " in out
    # --region sets the campaign's region
    campaign.write_text('id = "cli-region-2"\nchannel = "sms"\nbody = "Hi"\nquiet_hours = false\n')
    assert main(["plan", str(campaign), "--audience", str(audience), "--region", "gb", "--json"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["accepted"] == 3 and report["rejected"] == {} and report["hints"] == []
    assert report["policy"]["region"] == "GB"
    # the same in the file
    campaign.write_text('id = "cli-region-3"\nchannel = "sms"\nbody = "Hi"\nquiet_hours = false\nregion = "GB"\n')
    assert main(["plan", str(campaign), "--audience", str(audience), "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["accepted"] == 3
    # two different regions: refused, not guessed
    campaign.write_text('id = "cli-region-4"\nchannel = "sms"\nbody = "Hi"\nregion = "GB"\n')
    assert main(["plan", str(campaign), "--audience", str(audience), "--region", "US"]) == 2
    assert "--region says 'US'" in capsys.readouterr().err
    assert main(["plan", str(campaign), "--audience", str(audience), "--region", "Narnia"]) == 2
    campaign.write_text('id = "cli-region-5"\nchannel = "sms"\nbody = "Hi"\n')
    assert main(["plan", str(campaign), "--audience", str(audience), "--region", "Narnia"]) == 2
    assert "region: 'Narnia' is not an ISO 3166" in capsys.readouterr().err


# --- internationalized email addresses ---------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("jörg@bücher.de", "jörg@xn--bcher-kva.de"),
        ("jo\u0308rg@bücher.de", "jörg@xn--bcher-kva.de"),  # decomposed: NFC
        ("jörg@BÜCHER.de", "jörg@xn--bcher-kva.de"),
        ("jörg@xn--bcher-kva.de", "jörg@xn--bcher-kva.de"),
        ("info@bücher.de", "info@xn--bcher-kva.de"),
        (" Ärger@Example.COM ", "Ärger@example.com"),  # the local part keeps its case, as for ASCII
        ("用户@例子.广告", "用户@xn--fsqu00a.xn--4rr70v"),
        ("θσερ@εχαμπλε.ψομ", "θσερ@xn--mxahbxey0c.xn--xxaf0a"),
    ],
)
def test_internationalized_email_is_valid_and_normalized_one_way(raw: str, want: str) -> None:
    assert check_email(raw) == (None, want)
    assert unicodedata.is_normalized("NFC", want)
    assert check_email(want) == (None, want)  # normalizing twice changes nothing


@pytest.mark.parametrize(
    "raw",
    ["jörg@bücher", "jö rg@bücher.de", "jörg@@bücher.de", "jörg@-bücher.de", "jörg.@bücher.de", "jörg@bücher..de",
     '"jörg"@bücher.de', "jörg@[1.2.3.4]", "ö" * 33 + "@bücher.de", "Jörg <jörg@bücher.de>", "jörg@bücher.123",
     "a@b@bücher.de", "x" * 65 + "@bücher.de", "jörg@", "@bücher.de", "jörg@bücher.de."],
)  # fmt: skip
def test_internationalized_email_invalid(raw: str) -> None:
    assert check_email(raw) == (Reason.INVALID_EMAIL, "")


def test_ascii_idn_domain_and_unicode_domain_are_one_address() -> None:
    validator = AddressValidator(None)
    assert validator.check("email", "info@bücher.de") == validator.check("email", "info@xn--bcher-kva.de")
    assert validator.check_any("jörg@bücher.de") == (None, "jörg@xn--bcher-kva.de")


def test_email_suppressed_through_the_cli_is_rejected_at_plan_time(
    env: Path, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["suppress", "add", "email", "jörg@bücher.de"]) == 0
    assert "email: 1 added" in capsys.readouterr().out
    store = SuppressionStore(redis_client, hasher=hasher_for(load_settings()))
    assert store.contains_many("email", ["jörg@xn--bcher-kva.de"]) == [True]
    campaign = env / "c.toml"
    campaign.write_text('id = "idn-1"\nchannel = "email"\nbody = "Hallo"\nsubject = "News"\nquiet_hours = false\n')
    audience = env / "a.csv"
    audience.write_text(
        "id,email\nr1,jörg@bücher.de\nr2,ann@example.com\nr3,jo\u0308rg@xn--bcher-kva.de\nr4,zoë@bücher.de\n",
        encoding="utf-8",
    )
    assert main(["plan", str(campaign), "--audience", str(audience), "--json"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["accepted"] == 2
    assert report["rejected"] == {"suppressed": 1, "duplicate": 1}  # r3 is r1 spelt otherwise
    assert sorted(_addresses(redis_client, "idn-1")) == ["ann@example.com", "zoë@xn--bcher-kva.de"]


@pytest.fixture
async def api(
    redis_url: str, tmp_path: Path, aredis_client: aredis.Redis, redis_client: redis.Redis
) -> AsyncIterator[Api]:
    async with running_api(api_settings(redis_url, tmp_path), aredis_client, redis_client) as running:
        yield running


async def test_email_suppressed_through_the_api_is_rejected_at_plan_time(
    api: Api, redis_client: redis.Redis, tmp_path: Path
) -> None:
    added = await api.call("POST", "/v1/suppressions", json={"channel": "email", "addresses": ["jörg@BÜCHER.de"]})
    assert added.status == 200 and added.json == {"channel": "email", "added": 1}
    spec = {"id": "idn-api", "channel": "email", "body": "Hallo", "subject": "News", "quiet_hours": False}
    recipients = [{"id": "r1", "email": "jörg@xn--bcher-kva.de"}, {"id": "r2", "email": "ann@example.com"}]
    created = await api.call("POST", "/v1/campaigns", json={"spec": spec, "recipients": recipients})
    assert created.status == 201, created.body
    assert created.json["accepted"] == 1 and created.json["rejected"] == {"suppressed": 1}
    lifted = await api.call("DELETE", "/v1/suppressions/email/j%C3%B6rg%40b%C3%BCcher.de", token="admin")
    assert lifted.status == 200 and lifted.json == {"channel": "email", "removed": 1}


async def test_sendgrid_sends_an_internationalized_address_as_utf8_json() -> None:
    async def accepted(recorded: Recorded) -> web.StreamResponse:
        return web.Response(status=202, headers={"X-Message-Id": "m1"})

    async with RecordingServer(accepted) as server, aiohttp.ClientSession() as session:
        config = SendGridConfig(
            base_url=server.url,
            api_key="SG.k",
            from_email="news@example.test",
            default_subject="News",
            unsubscribe_url="https://example.test/u?ref={ref}",
        )
        address = "jörg@xn--bcher-kva.de"  # as the planner normalizes jörg@bücher.de
        message = Message(ref="c:b:0", address=address, body="Hallo", idempotency_key="c:b:0")
        results = await SendGridEmail(session, config).send([message])
        (request,) = server.requests
    assert results == [Sent("c:b:0", "m1:c:b:0")]
    assert request.headers["Content-Type"] == "application/json"  # JSON is UTF-8 (RFC 8259)
    assert address.encode("utf-8") in request.body  # raw UTF-8, not mangled or re-encoded
    assert orjson.loads(request.body)["personalizations"][0]["to"] == [{"email": address}]


# --- time zones that are given but unknown -----------------------------------------------------


def test_an_unknown_zone_is_rejected_even_with_a_default(redis_client: redis.Redis, tmp_path: Path) -> None:
    rows = [
        {"id": "a", "phone": "+447400000001", "timezone": "Mars/Olympus"},
        {"id": "b", "phone": "+447400000002", "timezone": "America/New_Yrok"},
        {"id": "c", "phone": "+447400000003", "timezone": ""},  # none given: the default
        {"id": "d", "phone": "+447400000004", "timezone": " Europe/London "},
    ]
    spec = _spec(quiet_hours=QuietHours(), default_timezone="America/New_York")
    report = _planner(redis_client, tmp_path).plan(spec, rows)
    assert report.accepted == 2 and report.rejected == {"unknown_timezone": 2}
    path = tmp_path / "a.csv"
    path.write_text("id,phone,timezone\n" + "".join(f"{r['id']},{r['phone']},{r['timezone']}\n" for r in rows))
    spec = _spec(quiet_hours=QuietHours(), default_timezone="America/New_York")
    again = _planner(redis_client, tmp_path).plan_file(spec, path, processes=1)
    assert again.accepted == 2 and again.rejected == {"unknown_timezone": 2}


def test_quiet_hours_planner_uses_the_default_only_for_a_missing_zone() -> None:
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    from dispatch.rules.checks import QuietHoursPlanner

    start = datetime(2026, 1, 15, 12, tzinfo=UTC)
    fallback = QuietHoursPlanner(start, default_timezone=ZoneInfo("Europe/Berlin"))
    assert fallback.not_before(None) == start and fallback.not_before("") == start and fallback.not_before(" ") == start
    assert fallback.not_before("Mars/Olympus") == Reason.UNKNOWN_TIMEZONE
    assert fallback.not_before(" America/New_York ") == datetime(2026, 1, 15, 13, tzinfo=UTC)
