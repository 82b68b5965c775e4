"""The bounded-memory dedup: the spilled path gives exactly the answers of the in-memory one."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dispatch.plan.planner as planner_module
from dispatch.campaign import CampaignSpec
from dispatch.config import load_settings
from dispatch.plan.dedup import DEDUP_MEMORY_BYTES, PARTITIONS, Candidates, Dedup
from dispatch.plan.planner import Planner
from dispatch.plan.snapshot import iter_batches, verify_snapshot
from dispatch.rules.suppression import AddressHasher, SuppressionStore

_ids = itertools.count()

#: The suppression key of this test's stores (a deployment's come from ``hasher_for(settings)``).
TEST_HASHER = AddressHasher(key=b"test-suppression-key")


def _candidates(fps: list[int], first_row: int) -> Candidates:
    n = len(fps)
    rows = list(range(first_row, first_row + n))
    return Candidates(
        rows=rows,
        ids=[f"r{r}" for r in rows],
        encoded=[f'["r{r}","a"'.encode() for r in rows],
        hashes=b"".join(fp.to_bytes(8, "big") * 2 for fp in fps),
        fingerprints=fps,
        not_before=[0.0] * n,
        cost=[1] * n,
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(st.integers(0, 40), max_size=300),
    split=st.integers(0, 300),
    wide=st.booleans(),
)
def test_spilled_dedup_flags_first_occurrences_only(tmp_path: Path, values: list[int], split: int, wide: bool) -> None:
    """Whatever the spill point, each value's first row is new and every later one a duplicate."""
    rng = random.Random(len(values))
    # small values spread over every partition (the top bits choose one) or all in partition 0
    table = {v: (rng.getrandbits(64) if wide else v << 1) for v in set(values)}
    fps = [table[v] for v in values]
    dedup = Dedup(tmp_path, memory_bytes=0)
    try:
        head, tail = fps[:split], fps[split:]
        flags = {i: bool(f) for i, f in enumerate(dedup.add_all(head))}
        assert dedup.check_budget()  # any set is over a zero budget
        dedup.defer(_candidates(tail, len(head)), bytes(i % 3 for i in range(len(tail))))
        assert dedup.deferred == len(tail)
        partitions = 0
        for seen, blocks in dedup.partitions():
            partitions += 1
            for block, tags in blocks:
                assert list(block.rows) == sorted(block.rows)  # row order within a partition
                for row, new, fp, tag, rid in zip(
                    block.rows, seen.add_all(block.fingerprints), block.fingerprints, tags, block.ids, strict=True
                ):
                    assert (fp, tag, rid) == (fps[row], (row - len(head)) % 3, f"r{row}")
                    flags[row] = bool(new)
        assert partitions == PARTITIONS
    finally:
        dedup.close()
    assert sorted(flags) == list(range(len(fps)))
    first: dict[int, int] = {}
    for row, fp in enumerate(fps):
        first.setdefault(fp, row)
    assert flags == {row: first[fp] == row for row, fp in enumerate(fps)}
    assert not list(tmp_path.iterdir())  # the spill files are gone


PHONES = [f"+447400{i:06d}" for i in range(60)] + ["12345", ""]


def _plan(
    client: redis.Redis, tmp: Path, rows: list[dict[str, Any]], suppressed: set[str], *, memory: int | None
) -> tuple[Any, list[str], Counter[tuple[str, str, float]]]:
    store = SuppressionStore(client, hasher=TEST_HASHER, prefix=f"t:dsup:{next(_ids)}")
    store.add("sms", suppressed)
    home = tmp / f"h{next(_ids)}"
    planner = Planner(
        client,
        load_settings({"DISPATCH_HOME": str(home), "DISPATCH_BATCH_SIZE": "4"}),
        suppression=store,
        clock=lambda: 1_800_000_000.0,
        dedup_memory_bytes=DEDUP_MEMORY_BYTES if memory is None else memory,
    )
    cid = f"dedup-{next(_ids)}"
    report = planner.plan(CampaignSpec(id=cid, channel="sms", body="Hi $first_name"), rows)
    assert verify_snapshot(client, cid)
    accepted = Counter((r[0], r[1], b.not_before) for b in iter_batches(client, cid, report.batches) for r in b.rows)
    lines = Path(str(report.rejected_file)).read_text(encoding="utf-8").splitlines()
    assert not [p for p in home.rglob("*") if p.name.startswith(("plan-dedup-", "plan-spill-"))]
    return report, lines, accepted


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    picks=st.lists(st.sampled_from(PHONES), min_size=1, max_size=120),
    suppressed=st.sets(st.sampled_from(PHONES[:60]), max_size=6),
    chunk=st.integers(1, 30),
    distinct_ids=st.integers(1, 200),
)
def test_a_spilling_plan_equals_the_in_memory_plan(  # noqa: PLR0917 - hypothesis arguments
    redis_client: redis.Redis, tmp_path: Path, picks: list[str], suppressed: set[str], chunk: int, distinct_ids: int
) -> None:
    """Same counts, same rejected file line for line (row order), same accepted recipients, when
    the dedups (of addresses and of repeated ids) spill after the first chunk of ``chunk`` rows."""
    rows = [{"id": f"r{i % distinct_ids}", "phone": p, "first_name": "Ann"} for i, p in enumerate(picks)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(planner_module, "CHUNK_ROWS", chunk)
        kept, kept_lines, kept_rows = _plan(redis_client, tmp_path, rows, suppressed, memory=None)
        spilled, spilled_lines, spilled_rows = _plan(redis_client, tmp_path, rows, suppressed, memory=0)
    assert spilled.total == kept.total == len(rows)
    assert spilled.accepted == kept.accepted
    assert spilled.rejected == kept.rejected
    assert spilled.total == spilled.accepted + sum(spilled.rejected.values())
    assert spilled_lines == kept_lines
    assert spilled_rows == kept_rows
    # the first row of each id is kept; of those, the first occurrence of each valid,
    # unsuppressed number is the one accepted
    first: dict[str, str] = {}
    seen_ids: set[str] = set()
    for row in rows:
        if not row["phone"].startswith("+") or row["id"] in seen_ids:
            continue
        seen_ids.add(row["id"])
        first.setdefault(row["phone"], row["id"])
    expected = {(rid, phone) for phone, rid in first.items() if phone.startswith("+") and phone not in suppressed}
    assert {(rid, phone) for rid, phone, _ in spilled_rows} == expected
