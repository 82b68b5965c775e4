"""The fast CSV path (column indexes, byte ranges, worker processes) gives exactly the answers of the
general path (``read_audience`` -> ``Recipient`` -> checks), row for row."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch.campaign import CampaignSpec
from dispatch.config import load_settings
from dispatch.plan.audience import ColumnMap, ReadLimits, read_audience
from dispatch.plan.csv_scan import Chunk, RowScanner, ScanConfig, find_cuts, scan_csv_file
from dispatch.plan.planner import Planner, read_csv_rows
from dispatch.plan.snapshot import iter_batches, load_manifest
from dispatch.rules.checks import FreshnessPolicy, QuietHours
from dispatch.rules.frequency import FrequencyCap
from dispatch.rules.suppression import AddressHasher, SuppressionStore

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
HEADER = b"id,phone,timezone,consent_sms,consent_email,updated_at,first_name\n"
_ids = itertools.count()

#: The suppression key of this test's stores (a deployment's come from ``hasher_for(settings)``).
TEST_HASHER = AddressHasher(key=b"test-suppression-key")


def _config(limits: ReadLimits | None = None, **extra: Any) -> ScanConfig:
    values: dict[str, Any] = {
        "channel": "sms",
        "region": "US",
        "hash_key": b"k",
        "started": NOW,
        "as_of": NOW,
        "freshness": FreshnessPolicy(max_staleness=timedelta(days=30)),
        "quiet_hours": QuietHours(),
        "default_timezone": None,
        "require_timezone": False,
        "require_consent": False,
        "template_fields": ("first_name", "promo"),
        "body": "Hi $first_name $promo",
        "columns": ColumnMap(),
        "limits": limits or ReadLimits(),
    }
    values.update(extra)
    return ScanConfig(**values)


def _flat(chunks: list[tuple[int, Chunk]]) -> list[tuple[Any, ...]]:
    """Every row as ("r", row, id, field, reason) or ("c", row, id, encoded, hash, not_before, cost)."""
    out: list[tuple[Any, ...]] = []
    for base, c in chunks:
        out.extend(("r", base + r[0], *r[1:]) for r in c.rejects)
        for i in range(len(c.rows)):
            digest = c.hashes[16 * i : 16 * i + 16]
            assert c.fingerprints[i] == int.from_bytes(digest[:8], "little")
            out.append(("c", base + c.rows[i], c.ids[i], c.encoded[i], digest, c.not_before[i], c.cost[i]))
    return sorted(out, key=lambda t: t[1])


def _fast(config: ScanConfig, path: Path, **kwargs: Any) -> list[tuple[Any, ...]]:
    chunks, base = [], 0
    for chunk in scan_csv_file(config, path, **kwargs):
        chunks.append((base, chunk))
        base += chunk.total
    assert sum(c.total for _, c in chunks) == base
    return _flat(chunks)


def _general(config: ScanConfig, path: Path) -> list[tuple[Any, ...]]:
    items = list(read_audience(path, columns=config.columns, limits=config.limits))
    chunk = RowScanner(config).scan_items(items)
    assert chunk.total == len(items)
    return _flat([(0, chunk)])


_line = st.one_of(
    st.tuples(
        st.sampled_from(["r1", "", " ", "\t", "x y", "r,2", '"r3"']),
        st.sampled_from(["+447400000001", "+44 7400 000002", "(201) 555-0123", "011 49 15123456789", "12", "", " "]),
        st.sampled_from(["Europe/London", "Asia/Tokyo", "", "Not/AZone"]),
        st.sampled_from(["yes", "no", "", "Yes", " y", "maybe", "1"]),
        st.sampled_from(["", "no", "bogus"]),
        st.sampled_from(["2026-11-20T08:00:00Z", "2026-11-20T08:00:00", "", "2025-01-01", "2027-01-01", "nope"]),
        st.sampled_from(["Ann", "", "Zoë", '"An, n"', '"multi\nline"', "李" * 12]),
    ).map(lambda t: ",".join(t).encode()),
    st.sampled_from([b"", b"\r", b'"', b'r9,"+447400000003', b"r8,+447400000004\r", b"\xff\xfe,1", b"a,b", b"\x00"]),
    st.binary(max_size=30),
)
_eol = st.sampled_from([b"\n", b"\r\n"])


@settings(max_examples=120, deadline=None)
@given(
    lines=st.lists(st.tuples(_line, _eol), max_size=30),
    chunk=st.integers(1, 400),
    small=st.booleans(),
)
def test_fast_path_matches_the_general_path(
    tmp_path_factory: Any, lines: list[tuple[bytes, bytes]], chunk: int, small: bool
) -> None:
    path = tmp_path_factory.mktemp("csv") / "a.csv"
    path.write_bytes(HEADER + b"".join(line + eol for line, eol in lines))
    limits = ReadLimits(max_field_bytes=40, max_line_bytes=120, max_record_lines=3) if small else None
    config = _config(limits)
    assert _fast(config, path, processes=1, chunk_bytes=chunk) == _general(config, path)


def test_other_channels_policies_and_column_maps(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(
        b"who,mail,tz,ok,first_name\n"
        b"a,Ann@Example.COM,Europe/London,yes,Ann\n"
        b"b,not-an-email,Europe/London,yes,Bob\n"
        b"c,c@example.org,,,Cy\n"
        b"d,d@example.org,Mars/Base,no,Di\n"
    )
    columns = ColumnMap(id="who", email="mail", timezone="tz", consent={"email": "ok"}, phone=None)
    for extra in (
        {"require_consent": True, "require_timezone": True},
        {"default_timezone": "Asia/Tokyo", "freshness": None, "quiet_hours": None},
        {"template_fields": (), "body": "Hello"},
    ):
        config = _config(channel="email", columns=columns, **extra)
        fast = _fast(config, path, processes=1, chunk_bytes=20)
        assert fast == _general(config, path)
        assert len(fast) == 4


def test_cuts_only_where_no_record_can_be_open(tmp_path: Path) -> None:
    limits = ReadLimits(max_record_lines=4)
    path = tmp_path / "a.csv"
    body = [b"r%d,+447400%06d,Europe/London,yes,,,Ann\n" % (i, i) for i in range(40)]
    body[10] = b'r10,+447400000010,Europe/London,yes,,,"two\n'  # a quoted newline
    body[11] = b'lines"\n'
    body[25] = b'r25,"never closed,Europe/London,yes,,,Ann\n'  # rejected, next lines read again
    path.write_bytes(HEADER + b"".join(body))
    start = len(HEADER)
    cuts = list(find_cuts(path, start, limits, '"', chunk=60))
    data = path.read_bytes()
    assert cuts[-1] == len(data) and cuts == sorted(cuts)
    assert len(cuts) > 3  # the quoted record and the stray quote do not stop the cutting
    for cut in cuts[:-1]:
        assert data[cut - 1 : cut] == b"\n"
        # a reader of the whole file is between records there: the pieces read alone give its records
    pieces = [data[a:b] for a, b in zip([start, *cuts[:-1]], cuts, strict=True)]
    assert b"".join(pieces) == data[start:]
    config = _config(limits)
    assert _fast(config, path, processes=1, chunk_bytes=60) == _general(config, path)


def test_quotes_on_every_line_fall_back_to_one_piece(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(
        HEADER + b"".join(b'"r%d","+447400%06d","Europe/London","yes","","","Ann"\n' % (i, i) for i in range(300))
    )
    assert list(find_cuts(path, len(HEADER), ReadLimits(), '"', chunk=100)) == [-1]
    config = _config()
    fast = _fast(config, path, processes=1, chunk_bytes=100)
    assert fast == _general(config, path) and len(fast) == 300


def test_worker_processes_give_the_same_rows(tmp_path: Path) -> None:
    lines = []
    for i in range(3_000):
        phone = [f"+4474{i:08d}", f"(201) 555-{i % 10_000:04d}", "12", ""][i % 4]
        first = '"Ann, the\nsecond"' if i % 997 == 0 else "Ann"
        lines.append(f"r{i},{phone},Europe/London,{['yes', 'no', ''][i % 3]},,2026-11-20T08:00:00Z,{first}\n")
    path = tmp_path / "a.csv"
    path.write_bytes(HEADER + "".join(lines).encode())
    config = _config()
    fast = _fast(config, path, processes=2, chunk_bytes=8_000, parallel_min_bytes=0)
    assert fast == _general(config, path) and len(fast) == 3_000


def test_plan_file_equals_planning_the_parsed_rows(redis_client: redis.Redis, tmp_path: Path) -> None:
    lines = [
        b"r%d,+447400%06d,Europe/London,yes,,2026-11-20T08:00:00Z,A%d\n" % (i, i % 700, i % 3) for i in range(1_000)
    ]
    lines[5] = b"r5,+1 201 555 0123,America/New_York,yes,,2026-11-20T08:00:00Z,\n"
    lines[6] = b'r6,"+44 7400 000001",Asia/Tokyo,,,2026-11-20T08:00:00Z,"B, c"\n'
    lines[7] = b"r7,+447400999999,Europe/London,maybe,,2026-11-20T08:00:00Z,A\n"
    path = tmp_path / "a.csv"
    path.write_bytes(HEADER + b"".join(lines))
    settings_ = load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_BATCH_SIZE": "7"})
    store = SuppressionStore(redis_client, hasher=TEST_HASHER, prefix=f"t:sup:{next(_ids)}")
    store.add("sms", ["+447400000003", "+447400000010"])
    planner = Planner(
        redis_client,
        settings_,
        suppression=store,
        frequency_cap=FrequencyCap(limit=1, window=timedelta(hours=1)),
        clock=NOW.timestamp,
    )
    reports = []
    for how in ("file", "rows"):
        cid = f"csv-{how}-{next(_ids)}"
        spec = CampaignSpec(id=cid, channel="sms", body="Hi $first_name", max_staleness=timedelta(days=30))
        report = planner.plan_file(spec, path) if how == "file" else planner.plan(spec, read_csv_rows(path))
        batches = [(b.not_before, b.rows) for b in iter_batches(redis_client, cid, report.batches)]
        rejected = Path(str(report.rejected_file)).read_text(encoding="utf-8")
        reports.append((report.total, report.accepted, report.rejected, report.cost_units, batches, rejected))
        assert load_manifest(redis_client, cid).checksum
    assert reports[0] == reports[1]
    total, accepted, rejected, _, batches, _ = reports[0]
    assert total == 1_000 and total == accepted + sum(rejected.values())
    # rows 700-999 repeat 0-299, except 705-707 (rows 5-7 changed); row 6 repeats row 1 in another format
    assert rejected == {"duplicate": 298, "suppressed": 2, "malformed_row": 1} and accepted == 699
    assert sum(len(rows) for _, rows in batches) == 699
    assert rejected["malformed_row"] == 1  # "maybe" is not a consent value


@pytest.mark.parametrize("gz", [False, True])
def test_gzip_and_plain_files_plan_the_same(redis_client: redis.Redis, tmp_path: Path, gz: bool) -> None:
    import gzip

    data = HEADER + b"".join(
        b"r%d,+447400%06d,Europe/London,yes,,2026-11-20T08:00:00Z,Ann\n" % (i, i % 50) for i in range(200)
    )
    path = tmp_path / ("a.csv.gz" if gz else "a.csv")
    path.write_bytes(gzip.compress(data) if gz else data)
    settings_ = load_settings({"DISPATCH_HOME": str(tmp_path)})
    spec = CampaignSpec(id=f"gz-{gz}-{next(_ids)}", channel="sms", body="Hi", max_staleness=timedelta(days=30))
    report = Planner(redis_client, settings_, clock=NOW.timestamp).plan_file(spec, path)
    assert (report.total, report.accepted, report.rejected) == (200, 50, {"duplicate": 150})
