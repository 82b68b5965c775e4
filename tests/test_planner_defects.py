"""Planner defects of issue 15: repeated ids, over-long quoted fields, interrupted plans, empty or
different audiences on re-plan, unbounded inputs, spreadsheet formulas in written CSV."""

from __future__ import annotations

import csv
import gzip
import io
import signal
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatch.campaign import CampaignSpec
from dispatch.cli import main as cli_main
from dispatch.config import Settings, load_settings
from dispatch.csvsafe import safe_cell
from dispatch.errors import AudienceError, PlanError
from dispatch.plan import planner as planner_module
from dispatch.plan.audience import ColumnMap, ReadLimits, read_audience
from dispatch.plan.csv_scan import RowScanner, ScanConfig, find_cuts, scan_csv_file
from dispatch.plan.planner import REJECT_CELL_CHARS, Planner, read_csv_rows
from dispatch.plan.snapshot import STAGING_TTL_S, iter_batches, verify_snapshot
from dispatch.store import keys

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def _cid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _settings(home: Path, **extra: str) -> Settings:
    return load_settings({"DISPATCH_HOME": str(home), "DISPATCH_CPU_SPEED_PROBE": "0", **extra})


def _spec(cid: str, body: str = "Hi") -> CampaignSpec:
    return CampaignSpec(id=cid, channel="sms", body=body, quiet_hours=None)


def _campaign_keys(client: redis.Redis, cid: str) -> list[bytes]:
    return list(client.scan_iter(match=f"{keys.PREFIX}:{{{cid}}}:*", count=1000))


# --- 1. repeated recipient ids ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["file", "rows"])
def test_a_repeated_id_with_another_phone_is_rejected(redis_client: redis.Redis, tmp_path: Path, how: str) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(b"id,phone\nr1,+447400000001\nr1,+447400000002\n")
    cid = _cid("dupid")
    planner = Planner(redis_client, _settings(tmp_path))
    report = planner.plan_file(_spec(cid), path) if how == "file" else planner.plan(_spec(cid), read_csv_rows(path))
    assert (report.total, report.accepted, report.rejected) == (2, 1, {"duplicate_id": 1})
    rows = [row for batch in iter_batches(redis_client, cid, report.batches) for row in batch.rows]
    assert [(r[0], r[1]) for r in rows] == [("r1", "+447400000001")]  # the first row wins
    lines = Path(str(report.rejected_file)).read_text(encoding="utf-8").splitlines()
    assert lines[1:] == ["2,r1,id,duplicate_id"]


def test_repeated_ids_are_found_after_the_dedup_spills(
    redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many distinct ids and phones, then every id again with new phones: only the first rows
    stay, in memory and with both dedups spilled to disk (row for row the same answers)."""
    rows = [{"id": f"r{i}", "phone": f"+4474{i:08d}"} for i in range(3_000)]
    rows += [{"id": f"r{i}", "phone": f"+4475{i:08d}"} for i in range(3_000)]
    monkeypatch.setattr(planner_module, "CHUNK_ROWS", 500)  # the spill comes after the first 500 rows
    results = []
    for memory in (64 * 2**20, 0):
        cid = _cid("dupid-spill")
        planner = Planner(redis_client, _settings(tmp_path / str(memory)), dedup_memory_bytes=memory)
        report = planner.plan(_spec(cid), rows)
        assert report.extra["dedup"]["spilled"] is (memory == 0)
        accepted = sorted((r[0], r[1]) for b in iter_batches(redis_client, cid, report.batches) for r in b.rows)
        lines = Path(str(report.rejected_file)).read_text(encoding="utf-8").splitlines()
        results.append((report.accepted, report.rejected, accepted, lines))
    assert results[0] == results[1]
    assert results[0][:2] == (3_000, {"duplicate_id": 3_000})
    assert {rid for rid, _ in results[0][2]} == {f"r{i}" for i in range(3_000)}


def test_a_repeated_id_is_sent_once_end_to_end(cluster_settings: Settings) -> None:
    """Through real workers and the mock provider: the provider accepts one message per
    accepted recipient and nothing is recorded sent beyond what it accepted."""
    from loadtest.cluster import LocalCluster
    from loadtest.demo import run_campaign

    rows = [
        {"id": "r1", "phone": "+447400000001", "first_name": "A"},
        {"id": "r1", "phone": "+447400000002", "first_name": "B"},
        {"id": "r2", "phone": "+447400000003", "first_name": "C"},
    ]
    with LocalCluster(cluster_settings, workers=1) as cluster:
        plan, status, _ = run_campaign(
            cluster, CampaignSpec(id=_cid("dupid-e2e"), channel="sms", body="Hi"), rows, progress=False, timeout_s=120
        )
        stats = cluster.mock_stats()
    assert plan["accepted"] == 2 and plan["rejected"] == {"duplicate_id": 1}
    assert status.complete
    assert status.counters["sent"] == stats["accepted"] == 2


# --- 2. quoted fields over the size limits ----------------------------------------------------


def _long_field_file(path: Path, inner_lines: int) -> None:
    inner = "".join(f"r{900 + i},+4474000{i:05d},note\n" for i in range(inner_lines))
    path.write_text(f'id,phone,note\nr1,+447400000001,"{inner}"\nr2,+447400000002,short\n', encoding="utf-8")


def _scan_config(limits: ReadLimits | None = None) -> ScanConfig:
    return ScanConfig(
        channel="sms",
        region=None,
        hash_key=b"k",
        started=NOW,
        as_of=NOW,
        freshness=None,
        quiet_hours=None,
        default_timezone=None,
        require_timezone=False,
        require_consent=False,
        template_fields=(),
        body="Hi",
        columns=ColumnMap(),
        limits=limits or ReadLimits(),
    )


def _outcomes(chunks: list[Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    base = 0
    for c in chunks:
        out.extend(("r", base + r[0], r[3]) for r in c.rejects)
        out.extend(("c", base + row, rid) for row, rid in zip(c.rows, c.ids, strict=True))
        base += c.total
    return sorted(out, key=lambda t: t[1])


def test_a_quoted_field_over_64_lines_is_one_rejected_row(redis_client: redis.Redis, tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    _long_field_file(path, 70)
    with path.open(newline="", encoding="utf-8") as handle:
        assert len(list(csv.reader(handle))) == 3  # a header and 2 records
    expected = [("r", 1, "field_too_large"), ("c", 2, "r2")]
    config = _scan_config()
    general = RowScanner(config).scan_items(list(read_audience(path)))
    assert _outcomes([general]) == expected
    for chunk_bytes in (40, 200, 10_000):
        assert _outcomes(list(scan_csv_file(config, path, processes=1, chunk_bytes=chunk_bytes))) == expected
    parallel = scan_csv_file(config, path, processes=2, chunk_bytes=64, parallel_min_bytes=0)
    assert _outcomes(list(parallel)) == expected
    report = Planner(redis_client, _settings(tmp_path)).plan_file(_spec(_cid("longfield")), path)
    assert (report.total, report.accepted, report.rejected) == (2, 1, {"field_too_large": 1})


def test_cuts_never_fall_inside_a_long_quoted_field(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    lines = [f"r{i},+4474{i:08d},plain\n" for i in range(200)]
    lines[50] = 'r50,+447400000050,"' + "".join(f"x{j},+4475{j:08d},inside\n" for j in range(100)) + '"\n'
    path.write_text("id,phone,note\n" + "".join(lines), encoding="utf-8")
    data = path.read_bytes()
    field_start, field_end = data.index(b'"'), data.rindex(b'"')
    cuts = list(find_cuts(path, data.index(b"\n") + 1, ReadLimits(), '"', chunk=1_000))
    assert cuts[-1] == len(data)
    assert not [c for c in cuts if field_start < c <= field_end]
    config = _scan_config()
    outcomes = _outcomes(list(scan_csv_file(config, path, processes=1, chunk_bytes=1_000)))
    assert outcomes == _outcomes([RowScanner(config).scan_items(list(read_audience(path)))])
    assert len(outcomes) == 200 and ("r", 51, "field_too_large") in outcomes
    assert not [o for o in outcomes if str(o[2]).startswith("x")]


_text = st.lists(st.sampled_from([*'ab ,"\n\r', "r7,+447400000007"]), max_size=20).map("".join)
_note = st.one_of(_text, st.builds(lambda n, t: t * n, st.integers(1, 12), _text))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    notes=st.lists(_note, min_size=1, max_size=12),
    quote_all=st.booleans(),
    crlf=st.booleans(),
    chunk=st.integers(16, 300),
)
def test_rows_are_the_records_of_the_csv_module(
    tmp_path_factory: Any, notes: list[str], quote_all: bool, crlf: bool, chunk: int
) -> None:
    """Generated RFC 4180 files (quoted fields with newlines, quotes, commas, long fields): the
    planner counts the records Python's csv module reads, row for row; a record over the
    limits is one ``field_too_large`` reject, never rows of its own."""
    limits = ReadLimits(max_field_bytes=10_000, max_line_bytes=120, max_record_lines=3)
    eol = "\r\n" if crlf else "\n"

    def cell(value: str) -> str:
        if quote_all or any(c in value for c in ',"\r\n'):
            return '"' + value.replace('"', '""') + '"'
        return value

    records = [cell(f"r{i}") + "," + cell(f"+4474000{i:05d}") + "," + cell(note) + eol for i, note in enumerate(notes)]
    out = io.StringIO()
    out.write(",".join(map(cell, ["id", "phone", "note"])) + eol + "".join(records))
    data = out.getvalue().encode()
    path = tmp_path_factory.mktemp("rfc") / "a.csv"
    path.write_bytes(data)
    with path.open(newline="", encoding="utf-8") as handle:
        parsed = list(csv.reader(handle))
    assert len(parsed) == 1 + len(notes)

    def over(raw: bytes) -> bool:
        lines = [line + b"\n" for line in raw.split(b"\n")[:-1]]  # physical lines, as the reader splits
        opened = sum(map(len, lines[:-1]))
        return len(lines) > limits.max_record_lines or opened > limits.max_line_bytes or max(map(len, lines)) > 120

    expected = [
        ("r", n, "field_too_large") if over(raw.encode()) else ("c", n, f"r{n - 1}")
        for n, raw in enumerate(records, start=1)
    ]
    config = _scan_config(limits)
    general = RowScanner(config).scan_items(list(read_audience(path, limits=limits)))
    assert _outcomes([general]) == expected
    assert _outcomes(list(scan_csv_file(config, path, processes=1, chunk_bytes=chunk))) == expected


# --- 3. a planner stopped mid-plan ------------------------------------------------------------

_KILLED_PLANNER = textwrap.dedent(
    """
    import os, signal, sys
    import redis
    from dispatch.campaign import CampaignSpec
    from dispatch.config import load_settings
    from dispatch.plan.planner import Planner

    url, home, cid = sys.argv[1:4]
    def rows():
        for i in range(60_000):
            if i == 55_000:  # the first chunk (50,000 rows) is staged in 500 batches: die, no clean-up
                print("dying", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            yield {"id": f"r{i}", "phone": f"+4474{i:08d}"}
    settings = load_settings({"DISPATCH_HOME": home, "DISPATCH_BATCH_SIZE": "100", "DISPATCH_CPU_SPEED_PROBE": "0"})
    Planner(redis.Redis.from_url(url), settings).plan(CampaignSpec(id=cid, channel="sms", body="Hi"), rows())
    """
)


def test_a_killed_planner_leaves_the_id_free(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    cid = _cid("killed")
    script = tmp_path / "plan_then_die.py"  # a file, not -c: the command line stays short
    script.write_text(_KILLED_PLANNER, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script), redis_url, str(tmp_path), cid], capture_output=True, timeout=120, check=False
    )
    assert done.returncode == -signal.SIGKILL and done.stderr == b"dying\n", done.stderr.decode()
    left = _campaign_keys(redis_client, cid)
    assert left and redis_client.get(keys.manifest(cid)) is None  # it died mid-plan
    assert all(b":stage:" in key for key in left)  # nothing under a reader's key names
    assert all(0 < redis_client.ttl(key) <= STAGING_TTL_S for key in left[:50])  # they go on their own
    settings_ = _settings(tmp_path, DISPATCH_BATCH_SIZE="1")
    rows = [{"id": f"r{i}", "phone": f"+4474{i:08d}"} for i in range(1_500)]
    report = Planner(redis_client, settings_).plan(_spec(cid), rows)
    assert not report.existing and report.accepted == 1_500
    assert verify_snapshot(redis_client, cid)


def test_a_plan_that_fails_after_staging_writes_nothing(redis_client: redis.Redis, tmp_path: Path) -> None:
    cid = _cid("midway")
    rows = [{"id": f"r{i}", "phone": f"+4474{i:08d}"} for i in range(300)]  # no first_name anywhere
    planner = Planner(redis_client, _settings(tmp_path, DISPATCH_BATCH_SIZE="1"))
    with pytest.raises(PlanError, match="first_name"):
        planner.plan(_spec(cid, "Hi $first_name"), rows)
    assert _campaign_keys(redis_client, cid) == []
    assert planner.plan(_spec(cid, "Hi $first_name"), [{**rows[0], "first_name": "A"}]).accepted == 1


def test_a_rate_too_small_is_refused_before_anything_is_written(redis_client: redis.Redis) -> None:
    cid = _cid("rate")
    for rate in (1e-300, float("nan"), float("inf")):
        with pytest.raises(PlanError, match="rate"):
            CampaignSpec(id=cid, channel="sms", body="Hi", rate=rate)
    with pytest.raises(PlanError, match="rate"):
        CampaignSpec.from_mapping({"id": cid, "channel": "sms", "body": "Hi", "rate": 1e-300})
    assert CampaignSpec(id=cid, channel="sms", body="Hi", rate=1 / 86400).rate == 1 / 86400
    assert _campaign_keys(redis_client, cid) == []


# --- 4. empty audiences and different re-plans --------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no rows"),
        (b"id,phone\n", "no rows"),
        (b"id,email\nr1,a@example.com\n", "no sms address column"),
    ],
)
def test_an_empty_or_addressless_audience_fails_and_freezes_nothing(
    redis_client: redis.Redis, tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(content)
    cid = _cid("empty")
    planner = Planner(redis_client, _settings(tmp_path))
    with pytest.raises(PlanError, match=message):
        planner.plan_file(_spec(cid), path)
    assert _campaign_keys(redis_client, cid) == []
    path.write_bytes(b"id,phone\nr1,+447400000001\n")  # the corrected audience plans
    report = planner.plan_file(_spec(cid), path)
    assert not report.existing and report.accepted == 1


def test_an_empty_iterable_fails(redis_client: redis.Redis, tmp_path: Path) -> None:
    cid = _cid("empty-rows")
    with pytest.raises(PlanError, match="no rows"):
        Planner(redis_client, _settings(tmp_path)).plan(_spec(cid), [])
    assert _campaign_keys(redis_client, cid) == []


def test_a_replan_with_another_audience_is_refused(redis_client: redis.Redis, tmp_path: Path) -> None:
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_bytes(b"id,phone\nr1,+447400000001\n")
    second.write_bytes(b"id,phone\nr1,+447400000001\nr2,+447400000002\n")
    cid = _cid("replan")
    planner = Planner(redis_client, _settings(tmp_path))
    report = planner.plan_file(_spec(cid), first)
    again = planner.plan(_spec(cid), read_csv_rows(first))  # the same audience, another path through
    assert again.existing and again.as_dict() == {**report.as_dict(), "existing": True}
    with pytest.raises(PlanError, match="different audience"):
        planner.plan_file(_spec(cid), second)
    with pytest.raises(PlanError, match="different audience"):
        planner.plan(_spec(cid), [])
    assert planner.stored_plan(_spec(cid)) == again


def test_cli_plan_refuses_another_audience_with_a_nonzero_exit(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCH_REDIS_URL", redis_url)
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path))
    monkeypatch.setenv("DISPATCH_CPU_SPEED_PROBE", "0")
    cid = _cid("cli-replan")
    campaign = tmp_path / "c.json"
    campaign.write_bytes(orjson.dumps({"id": cid, "channel": "sms", "body": "Hi"}))
    empty, first, second = tmp_path / "e.csv", tmp_path / "a.csv", tmp_path / "b.csv"
    empty.write_bytes(b"id,phone\n")
    first.write_bytes(b"id,phone\nr1,+447400000001\n")
    second.write_bytes(b"id,phone\nr2,+447400000002\n")
    assert cli_main(["plan", str(campaign), "--audience", str(empty)]) != 0
    assert "no rows" in capsys.readouterr().err
    assert cli_main(["plan", str(campaign), "--audience", str(first), "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["accepted"] == 1
    assert cli_main(["plan", str(campaign), "--audience", str(first), "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["existing"] is True
    assert cli_main(["plan", str(campaign), "--audience", str(second), "--json"]) != 0
    captured = capsys.readouterr()
    assert "different audience" in captured.err and captured.out == ""


# --- 10b. unbounded inputs ----------------------------------------------------------------------


def test_a_gzip_bomb_fails_the_plan(redis_client: redis.Redis, tmp_path: Path) -> None:
    path = tmp_path / "bomb.csv.gz"
    path.write_bytes(gzip.compress(b"id,phone\n" + b"\n" * 20_000_000, compresslevel=9))
    assert path.stat().st_size < 200_000
    cid = _cid("bomb")
    with pytest.raises(AudienceError, match="plan_max_gzip_ratio"):
        Planner(redis_client, _settings(tmp_path)).plan_file(_spec(cid), path)
    assert _campaign_keys(redis_client, cid) == []
    small = _settings(tmp_path, DISPATCH_PLAN_MAX_DECOMPRESSED_BYTES="4096", DISPATCH_PLAN_MAX_GZIP_RATIO="1000000")
    rows = b"id,phone\n" + b"".join(b"r%d,+4474%08d\n" % (i, i) for i in range(1_000))
    path.write_bytes(gzip.compress(rows))
    with pytest.raises(AudienceError, match="4,096 bytes"):
        Planner(redis_client, small).plan_file(_spec(cid), path)


def test_more_rows_than_the_setting_fail_the_plan(redis_client: redis.Redis, tmp_path: Path) -> None:
    cid = _cid("maxrows")
    rows = [{"id": f"r{i}", "phone": f"+4474{i:08d}"} for i in range(101)]
    planner = Planner(redis_client, _settings(tmp_path, DISPATCH_PLAN_MAX_ROWS="100"))
    with pytest.raises(PlanError, match="more than 100 rows"):
        planner.plan(_spec(cid), rows)
    assert _campaign_keys(redis_client, cid) == []
    assert planner.plan(_spec(cid), rows[:100]).accepted == 100


def test_the_rejected_file_is_bounded_and_every_reject_counted(redis_client: redis.Redis, tmp_path: Path) -> None:
    long_id = "x" * 20_000
    rows = [{"id": f"{long_id}{i}", "phone": "12"} for i in range(2_000)] + [{"id": "ok", "phone": "+447400000001"}]
    settings_ = _settings(tmp_path, DISPATCH_PLAN_MAX_REJECTED_FILE_BYTES="65536")
    report = Planner(redis_client, settings_).plan(_spec(_cid("rejfile")), rows)
    assert report.total == 2_001 == report.accepted + sum(report.rejected.values())
    assert report.rejected == {"invalid_phone": 2_000}
    path = Path(str(report.rejected_file))
    listed = path.read_text(encoding="utf-8").splitlines()[1:]
    assert path.stat().st_size < 65_536 + 600 * 512
    assert all(len(line) < REJECT_CELL_CHARS + 40 for line in listed)
    assert 0 < len(listed) < 2_000 and report.extra["rejected_unlisted"] == 2_000 - len(listed)


# --- 11. formulas in CSV cells ------------------------------------------------------------------


def test_formula_cells_are_escaped(redis_client: redis.Redis, tmp_path: Path) -> None:
    assert [safe_cell(v) for v in ("=1+1", "+447400000001", "-2", "@x", "\tx", "\rx", "a=b", 5, -5)] == [
        "'=1+1",
        "'+447400000001",
        "'-2",
        "'@x",
        "'\tx",
        "'\rx",
        "a=b",
        5,
        -5,
    ]
    rows = [{"id": '=HYPERLINK("http://evil")', "phone": "12"}, {"id": "@SUM(A1)", "phone": "+447400000001"}]
    report = Planner(redis_client, _settings(tmp_path)).plan(_spec(_cid("formula")), rows)
    with Path(str(report.rejected_file)).open(newline="", encoding="utf-8") as handle:
        listed = list(csv.reader(handle))
    assert listed[1][1] == '\'=HYPERLINK("http://evil")'


def test_export_csv_escapes_formula_cells(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCH_REDIS_URL", redis_url)
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path))
    monkeypatch.setenv("DISPATCH_CPU_SPEED_PROBE", "0")
    cid = _cid("export-formula")
    campaign = tmp_path / "c.json"
    campaign.write_bytes(orjson.dumps({"id": cid, "channel": "sms", "body": "Hi"}))
    audience = tmp_path / "a.csv"
    audience.write_bytes(b"id,phone\n\"=cmd|' /C calc'!A0\",+447400000001\n-1,+447400000002\n")
    assert cli_main(["plan", str(campaign), "--audience", str(audience)]) == 0
    capsys.readouterr()
    assert cli_main(["export", cid, "--format", "csv"]) == 0
    exported = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert sorted(row[2] for row in exported[1:]) == ["'-1", "'=cmd|' /C calc'!A0"]
