"""Benchmark: deriving a follow-up round's audience, against plain snapshot iteration in the same run.

    .venv/bin/python -m loadtest.bench_derive --rows 1000000 [--batch-size 1000] [--plan]

Writes a synthetic sent campaign straight into an embedded Valkey (a snapshot of ``--rows``
recipients in batches of ``--batch-size``; per batch a group record ``sent`` with 60% of the
messages ``delivered`` on records of their own, as receipts leave them; an engagement hash with
~25% human opens, ~10% machine opens, ~3% clicks, ~0.5% opt-outs), then measures, each in a fresh
process (so peak RSS is each one's own):

(a) baseline: ``dispatch.plan.snapshot.iter_batches`` over the whole snapshot (one MGET per
    chunk of batches, every row decoded): what any reader of a snapshot pays;
(b) derive: ``dispatch.rounds.derive.Deriver.qualifying`` for ``opened and not clicked`` (per
    chunk one pipelined round trip for the batches, their records and engagement hashes, a
    predicate mask per message, the opted-out left out): rows scanned per second;
(c) with ``--plan``: the whole round, ``plan_round`` (derive + every planner check + the new
    snapshot), rows scanned per second;
(d) with ``--contacts``: a cross-channel derivation (an email round from the SMS campaign):
    the qualifying ids collected, then a contacts CSV of every recipient (id, email, phone,
    timezone) filtered to their rows (``Deriver.filter_contacts``, which the planner's CSV path
    then plans): source rows per second.

The target is (b) >= 200,000 rows/s in bounded memory (peak RSS independent of ``--rows``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

__all__ = ["main", "write_campaign"]

CID = "bench-source"
WHERE = "opened and not clicked"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_campaign(redis_url: str, home: str, rows: int, batch_size: int, seed: int = 5) -> dict[str, int]:
    """The synthetic sent campaign (see the module docstring); returns its ground truth."""
    import redis

    from dispatch.plan.manifest import Manifest
    from dispatch.send.tracking import GroupRecord, MessageRecord
    from dispatch.store import keys

    rng = random.Random(seed)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    batches = (rows + batch_size - 1) // batch_size
    truth = {"opened_not_clicked": 0, "opted_out_among_them": 0}
    pipe = client.pipeline(transaction=False)
    for b in range(batches):
        first = b * batch_size
        n = min(batch_size, rows - first)
        batch = [[f"c{first + i}", f"+447400{(first + i) % 1_000_000:06d}", {"first_name": "Ann"}] for i in range(n)]
        pipe.set(keys.batch(CID, b), orjson.dumps([0.0, batch]))
        group = GroupRecord("sent", 1, "w", "sg:", "", 1.0, 0, n - 1, n)
        records: dict[str, bytes] = {"g": group.encode()}
        events: dict[str, int] = {}
        for i in range(n):
            if rng.random() < 0.6:
                records[str(i)] = MessageRecord("delivered", 1, "w", f"sg:{i}", "", 2.0).encode()
            opened, clicked, out = rng.random() < 0.25, rng.random() < 0.03, rng.random() < 0.005
            if opened:
                events[f"{i}.open"] = 1000
            if rng.random() < 0.1:
                events[f"{i}.machine_open"] = 1000
            if clicked:
                events[f"{i}.click"] = 1000
            if out:
                events[f"{i}.optout"] = 1000
            if opened and not clicked:
                truth["opened_not_clicked"] += 1
                truth["opted_out_among_them"] += out
        pipe.hset(keys.records(CID, b), mapping=records)  # type: ignore[arg-type]
        if events:
            pipe.hset(keys.engagement(CID, b), mapping=events)  # type: ignore[arg-type]
        if len(pipe) >= 300:
            pipe.execute()
    pipe.execute()
    manifest = Manifest(
        campaign_id=CID,
        fingerprint="bench",
        channel="sms",
        body="Hi $first_name",
        total=rows,
        accepted=rows,
        rejected={},
        batches=batches,
        batch_size=batch_size,
        cost_units=rows,
        checksum="",
        snapshot_bytes=0,
        created_at=0.0,
        prediction={"verdict": "no_deadline", "duration_s": 0.0},
    )
    client.set(keys.manifest(CID), manifest.encode())
    client.close()
    return truth


def _baseline(redis_url: str) -> dict[str, Any]:
    import redis

    from dispatch.plan.snapshot import iter_batches, load_manifest

    client = redis.Redis.from_url(redis_url)
    manifest = load_manifest(client, CID)
    started = time.perf_counter()
    rows = sum(len(batch.rows) for batch in iter_batches(client, CID, manifest.batches))
    elapsed = time.perf_counter() - started
    client.close()
    return {"rows": rows, "seconds": elapsed, "peak_rss_mib": _peak_rss_mib()}


def _derive(redis_url: str) -> dict[str, Any]:
    import redis

    from dispatch.plan.snapshot import load_manifest
    from dispatch.rounds.derive import Deriver
    from dispatch.rounds.where import parse_where

    client = redis.Redis.from_url(redis_url)
    deriver = Deriver(client, load_manifest(client, CID), parse_where(WHERE), channel="sms", cutoff=time.time())
    started = time.perf_counter()
    kept = sum(1 for _ in deriver.qualifying())
    elapsed = time.perf_counter() - started
    client.close()
    return {
        "rows": deriver.scanned,
        "seconds": elapsed,
        "kept": kept,
        "excluded": deriver.excluded_opted_out,
        "peak_rss_mib": _peak_rss_mib(),
    }


def _plan(redis_url: str, home: str, rows: int) -> dict[str, Any]:
    import redis

    from dispatch.campaign import CampaignSpec, FollowUp
    from dispatch.config import load_settings
    from dispatch.plan.planner import Planner
    from dispatch.rounds.derive import plan_round

    client = redis.Redis.from_url(redis_url)
    # no machine-speed probe: it waits for a quiet machine, which is not what (c) measures
    settings = load_settings(
        {"DISPATCH_HOME": home, "DISPATCH_REDIS_URL": redis_url, "DISPATCH_CPU_SPEED_PROBE": "false"}
    )
    spec = CampaignSpec(id="bench-round", channel="sms", body="Again $first_name", quiet_hours=False)
    follow = FollowUp.from_mapping({"from": CID, "where": WHERE})
    started = time.perf_counter()
    report = plan_round(Planner.with_redis_checks(client, settings), client, spec, follow)
    elapsed = time.perf_counter() - started
    client.delete(*client.keys("dp:{bench-round}:*"))
    client.close()
    return {
        "rows": rows,
        "seconds": elapsed,
        "accepted": report.accepted,
        "peak_rss_mib": _peak_rss_mib(),
    }


def write_contacts(path: Path, rows: int) -> None:
    """Every recipient of the synthetic campaign with an email, a phone and a timezone."""
    with path.open("w", encoding="utf-8") as handle:
        handle.write("id,email,phone,timezone\n")
        for start in range(0, rows, 10_000):
            handle.write(
                "".join(
                    f"c{i},u{i}@example.com,+447400{i % 1_000_000:06d},Europe/London\n"
                    for i in range(start, min(rows, start + 10_000))
                )
            )


def _contacts(redis_url: str, path: str) -> dict[str, Any]:
    import redis

    from dispatch.plan.snapshot import load_manifest
    from dispatch.rounds.derive import Deriver
    from dispatch.rounds.where import parse_where

    client = redis.Redis.from_url(redis_url)
    manifest = load_manifest(client, CID)
    deriver = Deriver(client, manifest, parse_where(WHERE), channel="email", cutoff=time.time(), contacts=path)
    out = Path(path).with_name("filtered.csv")
    started = time.perf_counter()
    assert deriver.filter_contacts(Path(path), out)
    elapsed = time.perf_counter() - started
    kept = deriver.yielded
    client.close()
    return {"rows": manifest.accepted, "seconds": elapsed, "kept": kept, "peak_rss_mib": _peak_rss_mib()}


def _child_main(fn: Any, args: tuple[Any, ...], conn: Any) -> None:
    conn.send(fn(*args))
    conn.close()


def _in_child(fn: Any, *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(fn, args, sender))
    child.start()
    sender.close()
    try:
        result: dict[str, Any] = receiver.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"benchmark child failed (exit code {child.exitcode})") from None
    child.join()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="recipients of the source campaign")
    parser.add_argument("--batch-size", type=int, default=1000, help="recipients per snapshot batch")
    parser.add_argument("--plan", action="store_true", help="also plan the whole round (c)")
    parser.add_argument("--contacts", action="store_true", help="also derive across channels from a contacts CSV (d)")
    args = parser.parse_args(argv)
    from dispatch.store.embedded import ensure_embedded, stop_embedded

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        server, _ = ensure_embedded(home)
        try:
            started = time.perf_counter()
            truth = write_campaign(server.url, str(home), args.rows, args.batch_size)
            print(f"wrote a sent campaign of {args.rows:,} recipients in {time.perf_counter() - started:.1f} s")
            base = _in_child(_baseline, server.url)
            derived = _in_child(_derive, server.url)
            planned = _in_child(_plan, server.url, str(home), args.rows) if args.plan else None
            crossed = None
            if args.contacts:
                write_contacts(home / "contacts.csv", args.rows)
                crossed = _in_child(_contacts, server.url, str(home / "contacts.csv"))
        finally:
            stop_embedded(home)
    load_after = os.getloadavg()
    expected = truth["opened_not_clicked"] - truth["opted_out_among_them"]
    assert derived["kept"] == expected, (derived["kept"], expected)
    assert derived["excluded"] == truth["opted_out_among_them"]

    def line(name: str, r: dict[str, Any]) -> float:
        rate = float(r["rows"] / r["seconds"])
        print(f"{name:<36} {r['rows']:>10,} rows {r['seconds']:8.2f} s {rate:>11,.0f} rows/s  "
              f"peak RSS {r['peak_rss_mib']:6.1f} MiB")  # fmt: skip
        return rate

    print(f"load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load_before)}, after "
          f"{'/'.join(f'{x:.1f}' for x in load_after)} on {os.cpu_count()} CPUs: the machine is shared")  # fmt: skip
    base_rate = line("(a) snapshot iteration (baseline)", base)
    rate = line(f"(b) derive '{WHERE}'", derived)
    verdict = "met" if rate >= 200_000 else "NOT met"
    print(f"    kept {derived['kept']:,} (= the ground truth), {derived['excluded']:,} opted out left out; "
          f"(b)/(a) {rate / base_rate:.2f}x; target 200,000 rows/s: {verdict}")  # fmt: skip
    if planned is not None:
        line("(c) plan the round (every check)", planned)
        print(f"    accepted {planned['accepted']:,}")
    if crossed is not None:
        assert crossed["kept"] == expected, (crossed["kept"], expected)
        line("(d) derive across channels (contacts)", crossed)


if __name__ == "__main__":
    main()
