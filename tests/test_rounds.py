"""Follow-up rounds: the where language, derived audiences, the funnel scheduler and the reports."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aredis
from test_api_support import api_settings, running_api

from dispatch.campaign import CampaignSpec, FollowUp
from dispatch.config import Settings, load_settings
from dispatch.engage.ledger import EngagementLedger
from dispatch.errors import ConfigError, PlanError
from dispatch.plan.planner import Planner
from dispatch.plan.snapshot import iter_batches, load_manifest
from dispatch.rounds.derive import EmptyRound, plan_round
from dispatch.rounds.funnel import load_funnel, register_funnel
from dispatch.rounds.report import parse_prices, render_funnel_png, report_csv, round_report
from dispatch.rounds.scheduler import RoundScheduler
from dispatch.rounds.where import PREDICATES, WhereError, parse_where
from dispatch.rules.suppression import SuppressionStore
from dispatch.send.control import CampaignControl
from dispatch.send.tracking import MessageRecord
from dispatch.store import keys
from monitoring.chart import PNG_SIGNATURE

# --- the where language ------------------------------------------------------------------------


def _mask(*names: str) -> int:
    return sum(PREDICATES[n] for n in names)


def test_where_precedence_not_binds_tightest_then_and_then_or() -> None:
    where = parse_where("opened and not clicked or replied")
    assert where(_mask("opened"))
    assert not where(_mask("opened", "clicked"))
    assert where(_mask("opened", "clicked", "replied"))
    grouped = parse_where("opened and not (clicked or replied)")
    assert not grouped(_mask("opened", "replied"))
    assert parse_where("not not sent")(_mask("sent"))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("opened and clikced", "unknown predicate 'clikced' at position 11"),
        ("opened and", "ends at position 10"),
        ("(opened or clicked", "expected ')'"),
        ("opened clicked", "unexpected 'clicked' at position 7"),
        ("opened & clicked", "unexpected character '&' at position 7"),
        ("and opened", "unexpected 'and' at position 0"),
        ("", "ends at position 0"),
    ],
)
def test_where_errors_name_the_token_and_its_position(text: str, needle: str) -> None:
    with pytest.raises(WhereError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        parse_where(text)


# --- a source campaign with a known outcome ------------------------------------------------------


def _settings(tmp_path: Path, **extra: str) -> Settings:
    return load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_BATCH_SIZE": "4", **extra})


def _phone(i: int) -> str:
    return f"+4474001{i:05d}"


def _plan_source(client: redis.Redis, settings: Settings, n: int, cid: str = "offer-1") -> None:
    spec = CampaignSpec(id=cid, channel="sms", body="Hi $first_name", quiet_hours=False)
    rows = [{"id": f"r{i}", "phone": _phone(i), "first_name": f"N{i}"} for i in range(n)]
    Planner(client, settings).plan(spec, rows)


def _refs(client: redis.Redis, cid: str) -> dict[str, str]:
    """recipient id -> message ref."""
    manifest = load_manifest(client, cid)
    return {
        row.recipient_id: f"{cid}.{batch.number}.{i}"
        for batch in iter_batches(client, cid, manifest.batches)
        for i, row in enumerate(batch.rows)
    }


def _set_state(client: redis.Redis, ref: str, state: str) -> None:
    cid, batch, index = ref.rsplit(".", 2)
    record = MessageRecord(state, 1, "w", "pid", "", 1.0)
    client.hset(keys.records(cid, int(batch)), index, record.encode())
    client.hincrby(keys.counters(cid), "sent", 1)
    if state != "sent":
        client.hincrby(keys.counters(cid), state, 1)


def _seed(client: redis.Redis, url: str, cid: str, truth: dict[str, set[str]]) -> None:
    """Record states and events: ``truth`` maps a state or a ledger event to recipient ids."""
    refs = _refs(client, cid)
    for rid, ref in refs.items():
        _set_state(client, ref, "delivered" if rid in truth["delivered"] else "sent")

    async def record() -> None:
        aclient = aredis.Redis.from_url(url)
        ledger = EngagementLedger(aclient, ttl_s=3600, clock=lambda: 1000.0)
        for event in ("open", "machine_open", "click", "optout"):
            for rid in sorted(truth.get(event, set())):
                await ledger.record(refs[rid], event, at=500.0)
        await aclient.aclose()

    asyncio.run(record())


def _snapshot_ids(client: redis.Redis, cid: str) -> set[str]:
    manifest = load_manifest(client, cid)
    return {row.recipient_id for b in iter_batches(client, cid, manifest.batches) for row in b.rows}


def test_derived_round_keeps_exactly_the_matching_recipients_minus_opt_outs_and_suppressed(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    _plan_source(redis_client, settings, 20)
    truth = {
        "delivered": {f"r{i}" for i in range(18)},
        "open": {"r1", "r2", "r3", "r4", "r5", "r19"},
        "machine_open": {"r6", "r7"},  # machine opens are not opens
        "click": {"r2", "r6"},
        "optout": {"r3"},
    }
    _seed(redis_client, redis_url, "offer-1", truth)
    SuppressionStore(redis_client, hasher=Planner.with_redis_checks(redis_client, settings)._hasher).add(
        "sms", [_phone(4)]
    )
    spec = CampaignSpec(id="offer-2", channel="sms", body="Hi $first_name, again", quiet_hours=False)
    follow = FollowUp.from_mapping({"from": "offer-1", "where": "opened and not clicked"})
    planner = Planner.with_redis_checks(redis_client, settings)
    report = plan_round(planner, redis_client, spec, follow, clock=lambda: 2000.0)
    # opened and not clicked: r1, r3, r4, r5, r19; r3 opted out; r4 suppressed
    assert _snapshot_ids(redis_client, "offer-2") == {"r1", "r5", "r19"}
    assert report.accepted == 3 and report.rejected == {"suppressed": 1}
    lineage = load_manifest(redis_client, "offer-2").lineage
    assert lineage is not None
    assert lineage["from"] == "offer-1" and lineage["where"] == "opened and not clicked"
    assert (lineage["scanned"], lineage["matched"], lineage["excluded_opted_out"]) == (20, 4, 1)
    assert lineage["derived_at"] == 2000.0
    # the template field came along from the source snapshot
    rows = [r for b in iter_batches(redis_client, "offer-2", 1) for r in b.rows]
    assert {r.attrs["first_name"] for r in rows if r.attrs} == {"N1", "N5", "N19"}
    # planned again: the frozen audience, not a new derivation
    again = plan_round(planner, redis_client, spec, follow, clock=lambda: 9000.0)
    assert again.existing and again.accepted == 3


def test_events_after_the_cutoff_are_not_seen(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _plan_source(redis_client, settings, 4)
    _seed(redis_client, redis_url, "offer-1", {"delivered": set(), "open": {"r0"}})
    spec = CampaignSpec(id="late", channel="sms", body="x", quiet_hours=False)
    follow = FollowUp.from_mapping({"from": "offer-1", "where": "opened"})
    with pytest.raises(EmptyRound, match="nobody"):
        plan_round(Planner(redis_client, settings), redis_client, spec, follow, clock=lambda: 100.0)  # open at 500


def test_cross_channel_round_reads_addresses_from_contacts(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    _plan_source(redis_client, settings, 6)
    _seed(redis_client, redis_url, "offer-1", {"delivered": set(), "open": {"r1", "r2"}})
    contacts = tmp_path / "contacts.csv"
    contacts.write_text(
        "id,email,timezone\n" + "".join(f"r{i},u{i}@example.com,Europe/London\n" for i in range(6) if i != 2)
    )
    spec = CampaignSpec(id="mail-2", channel="email", subject="s", body="b", quiet_hours=False)
    with pytest.raises(PlanError, match=r"give audience\.contacts"):
        plan_round(
            Planner(redis_client, settings),
            redis_client,
            spec,
            FollowUp.from_mapping({"from": "offer-1", "where": "not opened"}),
        )
    follow = FollowUp.from_mapping({"from": "offer-1", "where": "opened", "contacts": str(contacts)})
    report = plan_round(Planner(redis_client, settings), redis_client, spec, follow)
    assert report.accepted == 1 and _snapshot_ids(redis_client, "mail-2") == {"r1"}
    lineage = load_manifest(redis_client, "mail-2").lineage
    assert lineage is not None and lineage["missing_in_contacts"] == 1  # r2 is not in the file
    # a JSONL contacts file (no C-reader shortcut) is read row by row, with the same outcome
    jsonl = tmp_path / "contacts.jsonl"
    jsonl.write_text("".join(f'{{"id": "r{i}", "email": "u{i}@example.com"}}\n' for i in range(6) if i != 2))
    spec3 = CampaignSpec(id="mail-3", channel="email", subject="s", body="b", quiet_hours=False)
    follow3 = FollowUp.from_mapping({"from": "offer-1", "where": "opened", "contacts": str(jsonl)})
    assert plan_round(Planner(redis_client, settings), redis_client, spec3, follow3).accepted == 1
    assert _snapshot_ids(redis_client, "mail-3") == {"r1"}
    lineage3 = load_manifest(redis_client, "mail-3").lineage
    assert lineage3 is not None and lineage3["missing_in_contacts"] == 1 and lineage3["matched"] == 2


def test_a_round_cannot_derive_from_an_unknown_campaign(redis_client: redis.Redis, tmp_path: Path) -> None:
    spec = CampaignSpec(id="r2", channel="sms", body="x")
    follow = FollowUp.from_mapping({"from": "nope", "where": "opened"})
    with pytest.raises(PlanError, match="'nope', which is not a planned campaign"):
        plan_round(Planner(redis_client, _settings(tmp_path)), redis_client, spec, follow)
    with pytest.raises(PlanError, match=r"audience\.where: unknown predicate 'openned' at position 0"):
        FollowUp.from_mapping({"from": "x", "where": "openned"})


# --- the scheduler -------------------------------------------------------------------------------


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class _Killed(BaseException):
    """A scheduler dying mid-start (as from SIGKILL: nothing after it runs)."""


def _funnel(tmp_path: Path) -> dict[str, object]:
    audience = tmp_path / "a.csv"
    audience.write_text("id,phone,first_name\n" + "".join(f"r{i},{_phone(i)},N{i}\n" for i in range(8)))
    return {
        "id": "offer",
        "rounds": [
            {"id": "offer-1", "channel": "sms", "body": "Hi $first_name", "quiet_hours": False, "audience": "a.csv"},
            {
                "id": "offer-2",
                "channel": "sms",
                "body": "Again $first_name",
                "quiet_hours": False,
                "audience": {"from": "offer-1", "where": "opened and not clicked", "after": "72h"},
            },
        ],
    }


def _scheduler(
    client: redis.Redis,
    settings: Settings,
    clock: _Clock,
    enqueued: list[tuple[str, int]],
    *,
    owner: str,
    before_start: Callable[[str], None] | None = None,
) -> RoundScheduler:
    control = CampaignControl(client, lambda cid, n, d: enqueued.append((cid, n)), clock=clock)
    return RoundScheduler(
        client,
        control,
        lambda: Planner(client, settings, clock=clock),
        owner=owner,
        clock=clock,
        lease_s=60,
        before_start=before_start,
    )


def _complete(client: redis.Redis, cid: str, at: float) -> None:
    client.hset(keys.control(cid), mapping={"state": "completed", "completed_at": f"{at:.3f}"})


def test_funnel_file_errors_name_the_round(tmp_path: Path) -> None:
    data = _funnel(tmp_path)
    rounds = data["rounds"]
    assert isinstance(rounds, list)
    rounds[1]["audience"] = {"from": "offer-9", "where": "opened"}
    with pytest.raises(PlanError, match=r"round 2: audience\.from 'offer-9' is not a round declared before it"):
        load_funnel(data, base_dir=tmp_path)
    rounds[1]["audience"] = {"from": "offer-1", "where": "opened or"}
    with pytest.raises(PlanError, match=r"round 2: .*ends at position 9"):
        load_funnel(data, base_dir=tmp_path)


def test_a_round_id_belongs_to_one_funnel(redis_client: redis.Redis, tmp_path: Path) -> None:
    data = _funnel(tmp_path)
    assert register_funnel(redis_client, load_funnel(data, base_dir=tmp_path))
    assert not register_funnel(redis_client, load_funnel(data, base_dir=tmp_path))
    with pytest.raises(PlanError, match="already registered with other rounds"):
        register_funnel(redis_client, load_funnel({**data, "rounds": data["rounds"][:1]}, base_dir=tmp_path))  # type: ignore[index]
    with pytest.raises(PlanError, match="round id 'offer-1' belongs to funnel 'offer'"):
        register_funnel(redis_client, load_funnel({**data, "id": "thief"}, base_dir=tmp_path))


def test_rounds_start_once_when_due_even_when_a_scheduler_dies_mid_start(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    funnel = load_funnel(_funnel(tmp_path), base_dir=tmp_path)
    assert register_funnel(redis_client, funnel)
    clock = _Clock(1_000_000.0)
    enqueued: list[tuple[str, int]] = []

    def die(cid: str) -> None:
        raise _Killed(cid)

    doomed = _scheduler(redis_client, settings, clock, enqueued, owner="a", before_start=die)
    survivor = _scheduler(redis_client, settings, clock, enqueued, owner="b")
    with pytest.raises(_Killed):
        doomed.tick()  # round 1 claimed and planned by a, which dies before starting it
    assert [t.outcome for t in survivor.tick()] == ["busy", "waiting"]  # a's lease is live
    clock.now += 61
    assert [t.outcome for t in survivor.tick()] == ["started", "waiting"]
    assert {cid for cid, _ in enqueued} == {"offer-1"} and len(enqueued) == 2  # 8 rows, batches of 4

    _seed(redis_client, redis_url, "offer-1", {"delivered": set(), "open": {"r1", "r2"}, "click": {"r2"}})
    _complete(redis_client, "offer-1", clock.now)
    assert [t.outcome for t in survivor.tick()] == ["done", "waiting"]  # 72 h to go
    clock.now += 72 * 3600 + 1

    # two schedulers racing on the due round, the first killed after it started the campaign
    after_start: list[str] = []
    racer = _scheduler(redis_client, settings, clock, enqueued, owner="c", before_start=after_start.append)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def run(s: RoundScheduler) -> None:
        barrier.wait()
        outcomes.extend(t.outcome for t in s.tick() if t.campaign_id == "offer-2")

    threads = [threading.Thread(target=run, args=(s,)) for s in (racer, survivor)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) in (["busy", "started"], ["done", "started"])
    assert [cid for cid, _ in enqueued].count("offer-2") == 1  # one batch: r1 only
    assert _snapshot_ids(redis_client, "offer-2") == {"r1"}
    clock.now += 3600
    assert [t.outcome for t in racer.tick()] == ["done", "done"]
    assert [cid for cid, _ in enqueued].count("offer-2") == 1


def test_a_scheduler_killed_after_starting_leaves_the_round_started_once(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    register_funnel(redis_client, load_funnel(_funnel(tmp_path), base_dir=tmp_path))
    clock = _Clock(1_000_000.0)
    enqueued: list[tuple[str, int]] = []
    first = _scheduler(redis_client, settings, clock, enqueued, owner="a")
    real_settle = first._finish

    def die_before_settling(cid: str, state: str, detail: str) -> None:
        raise _Killed(cid)

    first._finish = die_before_settling  # type: ignore[method-assign]
    with pytest.raises(_Killed):
        first.tick()
    first._finish = real_settle  # type: ignore[method-assign]
    clock.now += 61
    other = _scheduler(redis_client, settings, clock, enqueued, owner="b")
    assert [t.outcome for t in other.tick()] == ["already_started", "waiting"]
    assert len(enqueued) == 2  # the campaign's two batches, once


# --- reports ---------------------------------------------------------------------------------------


def test_report_counts_and_rates_match_the_ground_truth(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    _plan_source(redis_client, settings, 10)
    truth = {
        "delivered": {f"r{i}" for i in range(8)},
        "open": {"r0", "r1", "r2", "r3"},
        "machine_open": {"r4"},
        "click": {"r0"},
        "optout": {"r9"},
    }
    _seed(redis_client, redis_url, "offer-1", truth)
    report = round_report(redis_client, "offer-1", parse_prices("twilio=0.01"))
    assert (report.audience, report.accepted, report.sent, report.delivered) == (10, 10, 10, 8)
    assert (report.human_opens, report.machine_opens, report.clicks, report.optouts) == (4, 1, 1, 1)
    assert report.delivery_rate == 0.8 and report.open_rate == 4 / 8 and report.click_rate == 1 / 8
    assert report.cost == pytest.approx(0.1)
    assert report.provider == "twilio" and report.channel == "sms"
    assert report_csv([report]).splitlines()[1].startswith("offer-1,sms,twilio,")
    assert render_funnel_png([report]).startswith(PNG_SIGNATURE)


def test_prices_setting_errors_name_the_entry() -> None:
    assert parse_prices("twilio=0.0079, sendgrid=0.0009") == {"twilio": 0.0079, "sendgrid": 0.0009}
    with pytest.raises(ConfigError, match=r"entry 2 \('sendgrid'\)"):
        parse_prices("twilio=1,sendgrid")


# --- the API -------------------------------------------------------------------------------------


async def test_api_report_of_a_campaign_and_its_rounds(
    redis_url: str, redis_client: redis.Redis, aredis_client: aredis.Redis, tmp_path: Path
) -> None:
    settings = api_settings(redis_url, tmp_path, DISPATCH_PRICES="twilio=0.5", DISPATCH_BATCH_SIZE="4")
    _plan_source(redis_client, settings, 6)
    truth = {"delivered": {"r0", "r1", "r2", "r3"}, "open": {"r0", "r1"}, "click": {"r0"}}
    await asyncio.to_thread(_seed, redis_client, redis_url, "offer-1", truth)
    register_funnel(redis_client, load_funnel(_funnel(tmp_path), base_dir=tmp_path))
    spec = CampaignSpec(id="offer-2", channel="sms", body="Again $first_name", quiet_hours=False)
    follow = FollowUp.from_mapping({"from": "offer-1", "where": "opened and not clicked"})
    await asyncio.to_thread(plan_round, Planner(redis_client, settings), redis_client, spec, follow)
    async with running_api(settings, aredis_client, redis_client) as api:
        reply = await api.call("GET", "/v1/campaigns/offer-1/report", token="read")
        body = reply.json
        assert [r["campaign_id"] for r in body["rounds"]] == ["offer-1", "offer-2"]
        first = body["rounds"][0]
        assert (first["sent"], first["delivered"], first["human_opens"], first["clicks"]) == (6, 4, 2, 1)
        assert first["open_rate"] == 0.5 and first["click_rate"] == 0.25 and first["cost"] == 3.0
        assert body["rounds"][1]["accepted"] == 1 and body["rounds"][1]["derived_from"] == "offer-1"
        assert body["channels"]["sms"]["accepted"] == 7 and body["providers"]["twilio"]["sent"] == 6
        csv_reply = await api.call("GET", "/v1/campaigns/offer-1/report?format=csv", token="read", check=False)
        assert csv_reply.status == 200 and csv_reply.body.decode().count("\n") == 3
        png = await api.call("GET", "/v1/campaigns/offer-1/report?format=png", token="read", check=False)
        assert png.body.startswith(PNG_SIGNATURE)
        assert (await api.call("GET", "/v1/campaigns/nope/report", token="read")).status == 404
        assert (await api.call("GET", "/v1/campaigns/offer-1/report?format=xml", token="read")).status == 422
        metrics = (await api.call("GET", "/metrics", token=None)).body.decode()
        assert 'dispatch_engagement_messages{campaign="offer-1",channel="sms",event="human_opens"} 2.0' in metrics


# --- the command line ----------------------------------------------------------------------------


def test_cli_funnel_submit_starts_round_one_and_report_prints_every_format(
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dispatch.cli import main as cli_main
    from dispatch.store.connect import with_db

    monkeypatch.setenv("DISPATCH_REDIS_URL", with_db(redis_url, 0))
    monkeypatch.setenv("DISPATCH_BROKER_DB", "1")
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path))
    monkeypatch.setenv("DISPATCH_PRICES", "twilio=0.25")
    data = _funnel(tmp_path)
    rounds = data["rounds"]
    assert isinstance(rounds, list)
    lines = ['id = "offer"']
    for r in rounds:
        lines.append("[[rounds]]")
        for key, value in r.items():
            if isinstance(value, dict):
                inner = ", ".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in value.items())
                lines.append(f"{key} = {{ {inner} }}")
            else:
                lines.append(f"{key} = {orjson.dumps(value).decode() if not isinstance(value, bool) else 'false'}")
    (tmp_path / "offer.toml").write_text("\n".join(lines) + "\n")
    broker_db = redis.Redis.from_url(with_db(redis_url, 1))
    try:
        assert cli_main(["funnel", "submit", str(tmp_path / "offer.toml")]) == 0
        out = capsys.readouterr().out
        assert "funnel offer: 2 rounds registered" in out and "offer-1: started" in out and "offer-2: waiting" in out
        assert cli_main(["funnel", "submit", str(tmp_path / "offer.toml")]) == 0
        assert "already registered" in capsys.readouterr().out
        assert cli_main(["funnel", "status", "offer"]) == 0
        states = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(s["round"], s["state"], s["due_at"], s["source_state"]) for s in states] == [
            ("offer-1", "started", 0.0, None),
            ("offer-2", "waiting", None, "running"),
        ]
        assert states[1]["where"] == "opened and not clicked" and states[1]["from"] == "offer-1"
        for ref in _refs(redis_client, "offer-1").values():
            _set_state(redis_client, ref, "sent")
        assert cli_main(["report", "offer"]) == 0
        body = orjson.loads(capsys.readouterr().out)
        assert [r["campaign_id"] for r in body["rounds"]] == ["offer-1"]  # round 2 is not planned yet
        assert body["rounds"][0]["sent"] == 8 and body["providers"]["twilio"]["cost"] == 2.0
        assert cli_main(["report", "offer-1", "--format", "csv"]) == 0
        assert capsys.readouterr().out.splitlines()[1].startswith("offer-1,sms,twilio,")
        assert cli_main(["report", "offer", "--format", "png", "--out", str(tmp_path / "f.png")]) == 0
        assert (tmp_path / "f.png").read_bytes().startswith(PNG_SIGNATURE)
        assert cli_main(["report", "nope"]) == 2
        assert "no campaign 'nope'" in capsys.readouterr().err
    finally:
        broker_db.flushdb()
        broker_db.close()


def test_masks_read_own_records_over_the_group_and_tell_undelivered_from_refused(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    from dispatch.rounds.derive import scan_masks
    from dispatch.send.tracking import GroupRecord

    settings = _settings(tmp_path, DISPATCH_BATCH_SIZE="6")
    _plan_source(redis_client, settings, 6)
    records = keys.records("offer-1", 0)
    redis_client.hset(records, "g", GroupRecord("sent", 1, "w", "", "", 1.0, 0, 5, 6).encode())
    redis_client.hset(records, "0", MessageRecord("delivered", 1, "", "p", "", 2.0).encode())
    redis_client.hset(records, "1", MessageRecord("failed", 1, "", "p", "30005", 2.0).encode())  # a receipt's
    redis_client.hset(records, "2", MessageRecord("failed", 3, "w", "", "21211", 2.0).encode())  # refused
    redis_client.hset(records, "3", MessageRecord("bounced", 1, "", "p", "", 2.0).encode())
    redis_client.hset(records, "4", MessageRecord("sending", 1, "w", "", "", 2.0).encode())
    asyncio.run(_record_events(redis_url, {"offer-1.0.5": ["open", "bot_click", "reply"]}))
    (batch,) = scan_masks(redis_client, "offer-1", 1)
    sent, delivered, bounced = PREDICATES["sent"], PREDICATES["delivered"], PREDICATES["bounced"]
    opened, replied = PREDICATES["opened"], PREDICATES["replied"]
    assert list(batch.masks) == [sent | delivered, sent, 0, sent | bounced, 0, sent | opened | replied]


async def _record_events(url: str, events: dict[str, list[str]]) -> None:
    client = aredis.Redis.from_url(url)
    ledger = EngagementLedger(client, ttl_s=3600)
    for ref, names in events.items():
        for name in names:
            await ledger.record(ref, name)
    await client.aclose()


def test_a_round_that_cannot_be_planned_is_settled_failed_and_shown(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    data = _funnel(tmp_path)
    rounds = data["rounds"]
    assert isinstance(rounds, list)
    rounds[1]["audience"] = {"from": "offer-1", "where": "opened", "contacts": "gone.csv"}
    rounds[1]["channel"], rounds[1]["subject"] = "email", "s"
    register_funnel(redis_client, load_funnel(data, base_dir=tmp_path))
    clock = _Clock(1_000_000.0)
    scheduler = _scheduler(redis_client, settings, clock, [], owner="a")
    assert [t.outcome for t in scheduler.tick()] == ["started", "waiting"]
    _seed(redis_client, redis_url, "offer-1", {"delivered": set(), "open": {"r1"}})
    _complete(redis_client, "offer-1", clock.now)
    ticks = scheduler.tick()
    assert ticks[1].outcome == "failed" and "gone.csv" in ticks[1].detail
    assert [t.outcome for t in scheduler.tick()] == ["done", "done"]
    funnel = load_funnel(data, base_dir=tmp_path)
    state = scheduler.states(funnel)[1]
    assert state["state"] == "failed" and "gone.csv" in str(state["detail"])
