"""Benchmark: the planner, against the naive per-row baseline measured in the same run.

    .venv/bin/python -m loadtest.bench_planner --rows 1000000 [--naive-rows 200000] [--profile]

Generates a CSV audience (several countries; E.164, spaced international, ``00`` IDD and US
national formats; ~4% invalid, ~3% landlines, ~5% duplicates in another format), then measures
in separate processes (so peak RSS is each one's own):

(a) naive: ``csv.DictReader`` + ``phonenumbers.parse`` + ``is_valid_number`` + ``number_type``
    per row (on ``--naive-rows`` rows, it is slow);
(b) fast: ``dispatch.plan.audience.read_audience`` + ``dispatch.rules.validation.AddressValidator`` (the
    fast, same-answer phone path) + dedup of the normalized number (a set of 8-byte hashes).

(c) the full :class:`dispatch.plan.planner.Planner` on the same file with every check on
    (validation, consent, freshness with ``max_staleness``, quiet hours, dedup, suppression of
    1% of the numbers, frequency cap with 1% of the numbers already messaged), writing the
    snapshot to an embedded Valkey: rows/s, peak RSS of the planning process, and Redis memory
    (``INFO memory`` used_memory after minus before) per million accepted recipients.

It also checks that (a) and (b) give the same counts by reason on the rows both saw.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import hashlib
import io
import multiprocessing as mp
import os
import pstats
import random
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["generate", "main"]

#: (calling code, national stems that libphonenumber's metadata calls mobile, fixed-line stems)
_PLANS: tuple[tuple[str, list[str], list[str]], ...] = (
    ("1", ["201555", "415555", "646555", "312555"], []),  # US: fixed-line-or-mobile
    ("49", ["15123", "17612", "16012"], ["3012", "8912"]),
    ("44", ["7400", "7911"], ["2079", "1614"]),
    ("33", ["612", "650"], ["144", "491"]),
    ("91", ["8123", "9876"], []),
    ("55", ["11961", "21987"], []),
    ("52", ["5512", "3312"], []),
)
_LENGTH = {"1": 10, "49": 11, "44": 10, "33": 9, "91": 10, "55": 11, "52": 10}
_DE_FIXED_LEN = 10


def _number(rng: random.Random) -> tuple[str, str]:
    cc, mobiles, fixed = rng.choice(_PLANS)
    stems = fixed if fixed and rng.random() < 0.03 else mobiles
    stem = rng.choice(stems)
    length = _DE_FIXED_LEN if cc == "49" and stems is fixed else _LENGTH[cc]
    tail = length - len(stem)
    national = stem + f"{rng.randrange(10**tail):0{tail}d}"
    if rng.random() < 0.04:  # invalid: too short / wrong digits
        national = national[: rng.randint(3, length - 2)] if rng.random() < 0.5 else "0" + national[1:]
    return cc, national


def _format(rng: random.Random, cc: str, national: str) -> str:
    shape = rng.random()
    if cc == "1" and shape < 0.5:  # national format for the default region
        return f"({national[:3]}) {national[3:6]}-{national[6:]}"
    if shape < 0.55:
        return f"+{cc}{national}"
    if shape < 0.8:
        return f"+{cc} {national[:3]} {national[3:6]} {national[6:]}"
    return f"011 {cc} {national}"  # the US international (IDD) prefix


def generate(path: Path, rows: int, seed: int = 42) -> None:
    """Write a realistic CSV audience of ``rows`` rows."""
    rng = random.Random(seed)
    recent: list[tuple[str, str]] = []
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "phone", "timezone", "consent_sms", "updated_at", "first_name"])
        for i in range(rows):
            if recent and rng.random() < 0.05:
                cc, national = rng.choice(recent)
            else:
                cc, national = _number(rng)
                if len(recent) < 10_000:
                    recent.append((cc, national))
                else:
                    recent[rng.randrange(10_000)] = (cc, national)
            phone = "" if rng.random() < 0.005 else _format(rng, cc, national)
            writer.writerow([f"c{i}", phone, "America/New_York", "yes", "2026-11-20T08:00:00Z", "Ann"])


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _naive(path: str, limit: int, region: str) -> dict[str, Any]:
    import phonenumbers

    from dispatch.rules.phones import SMS_CAPABLE_TYPES

    counts: Counter[str] = Counter()
    seen: set[str] = set()
    started = time.perf_counter()
    n = 0
    with open(path, newline="", encoding="utf-8") as handle:
        for n, row in enumerate(csv.DictReader(handle), start=1):
            if n > limit:
                break
            raw = row["phone"].strip()
            if not raw:
                counts["missing_address"] += 1
                continue
            try:
                number = phonenumbers.parse(raw, region)
            except phonenumbers.NumberParseException:
                counts["invalid_phone"] += 1
                continue
            if not phonenumbers.is_valid_number(number):
                counts["invalid_phone"] += 1
                continue
            if phonenumbers.number_type(number) not in SMS_CAPABLE_TYPES:
                counts["not_sms_capable"] += 1
                continue
            e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
            if e164 in seen:
                counts["duplicate"] += 1
                continue
            seen.add(e164)
            counts["accepted"] += 1
    elapsed = time.perf_counter() - started
    n = min(n, limit)
    return {"rows": n, "seconds": elapsed, "counts": dict(counts), "peak_rss_mib": _peak_rss_mib()}


def _fast(path: str, limit: int, region: str, profile: bool) -> dict[str, Any]:
    from dispatch.plan.audience import Recipient, read_audience
    from dispatch.rules.validation import AddressValidator

    validator = AddressValidator(region)
    counts: Counter[str] = Counter()
    seen: set[bytes] = set()  # 8-byte digests: ~70 bytes per accepted recipient in CPython

    def run() -> int:
        n = 0
        check = validator.check
        for n, item in enumerate(read_audience(Path(path)), start=1):
            if n > limit:
                return n - 1
            if not isinstance(item, Recipient):
                counts[item.reason.value] += 1
                continue
            reason, e164 = check("sms", item.phone)
            if reason is not None:
                counts[reason.value] += 1
                continue
            key = hashlib.blake2b(e164.encode(), digest_size=8).digest()
            if key in seen:
                counts["duplicate"] += 1
                continue
            seen.add(key)
            counts["accepted"] += 1
        return n

    started = time.perf_counter()
    if profile:
        prof = cProfile.Profile()
        n = prof.runcall(run)
    else:
        n = run()
    elapsed = time.perf_counter() - started
    report = ""
    if profile:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
        report = out.getvalue()
    return {"rows": n, "seconds": elapsed, "counts": dict(counts), "peak_rss_mib": _peak_rss_mib(), "profile": report}


def _full(  # noqa: PLR0917
    path: str, limit: int, region: str, redis_url: str, home: str, processes: int | None, dedup_mib: int | None
) -> dict[str, Any]:
    """The full Planner, every check on, against a real Redis (see the module docstring)."""
    from datetime import timedelta

    import redis

    from dispatch.campaign import CampaignSpec
    from dispatch.config import load_settings
    from dispatch.plan.dedup import DEDUP_MEMORY_BYTES
    from dispatch.plan.planner import Planner
    from dispatch.rules.frequency import FrequencyCap
    from dispatch.rules.suppression import SuppressionStore, hasher_for
    from dispatch.rules.validation import AddressValidator

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    settings = load_settings({"DISPATCH_HOME": home, "DISPATCH_REDIS_URL": redis_url})
    cap = FrequencyCap(limit=1, window=timedelta(days=1))
    # 1% of the numbers suppressed and 1% already messaged: sampled from the file itself
    validator = AddressValidator(region)
    suppressed: list[str] = []
    messaged: list[str] = []
    with open(path, newline="", encoding="utf-8") as handle:
        for n, row in enumerate(csv.DictReader(handle)):
            if n >= min(limit, 200_000):
                break
            if n % 100 in (1, 2):
                reason, e164 = validator.check("sms", row["phone"])
                if reason is None:
                    (suppressed if n % 100 == 1 else messaged).append(e164)
    store = SuppressionStore(client, hasher=hasher_for(settings))
    store.add("sms", suppressed)
    now_ms = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    for e164 in messaged:
        pipe.zadd(b"dispatch:freq:sms:" + store.hasher(e164), {b"earlier": now_ms - 60_000})
    pipe.execute()
    before = int(client.info("memory")["used_memory"])
    budget = dedup_mib * 2**20 if dedup_mib is not None else DEDUP_MEMORY_BYTES
    planner = Planner.with_redis_checks(
        client, settings, frequency_cap=cap, default_region=region, dedup_memory_bytes=budget
    )
    spec = CampaignSpec(
        id="bench", channel="sms", body="Hi $first_name, 20% off today", max_staleness=timedelta(days=3650)
    )
    rows = _limited(path, limit)
    redis_cpu = _redis_cpu(client)
    cpu = _cpu_s()
    started = time.perf_counter()
    report = planner.plan_file(spec, rows, processes=processes)
    elapsed = time.perf_counter() - started
    cpu_after = _cpu_s()
    redis_cpu = _redis_cpu(client) - redis_cpu
    after = int(client.info("memory")["used_memory"])
    client.close()
    return {
        "rows": report.total,
        "seconds": elapsed,
        "accepted": report.accepted,
        "rejected": report.rejected,
        "batches": report.batches,
        "dedup": report.extra.get("dedup") or {},
        "redis_bytes": after - before,
        "peak_rss_mib": _peak_rss_mib(),
        "workers_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "cpu_planner_s": cpu_after[0] - cpu[0],
        "cpu_workers_s": cpu_after[1] - cpu[1],
        "cpu_redis_s": redis_cpu,
    }


def _cpu_s() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its ended children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _limited(path: str, limit: int) -> Path:
    """The file itself, or a copy of its first ``limit`` rows."""
    with open(path, "rb") as handle:
        lines = sum(1 for _ in handle) - 1
    if lines <= limit:
        return Path(path)
    out = Path(path).with_name(f"first-{limit}.csv")
    with open(path, "rb") as src, out.open("wb") as dst:
        for n, line in enumerate(src):
            if n > limit:
                break
            dst.write(line)
    return out


def _child_main(fn: Any, args: tuple[Any, ...], conn: Any) -> None:
    conn.send(fn(*args))
    conn.close()


def _in_child(fn: Any, *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh (spawned, non-daemonic: the planner starts workers) process."""
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
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--naive-rows", type=int, default=200_000, help="rows for the slow baseline")
    parser.add_argument("--region", default="US")
    parser.add_argument("--profile", action="store_true", help="cProfile the fast path (slower)")
    parser.add_argument("--keep", type=Path, help="write the generated CSV here and keep it")
    parser.add_argument("--skip-full", action="store_true", help="skip (c), the full planner")
    parser.add_argument("--fast-rows", type=int, default=1_000_000, help="rows for (b)")
    parser.add_argument("--processes", type=int, help="planner worker processes for (c) (default: one per CPU)")
    parser.add_argument(
        "--dedup-memory-mib",
        type=int,
        help="memory for dedup fingerprints before the planner spills them to disk (default: the planner's)",
    )
    parser.add_argument("--audience", type=Path, help="plan this existing CSV (made by --keep) instead of generating")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.audience or args.keep or Path(tmp) / "audience.csv"
        started = time.perf_counter()
        if args.audience is None:
            generate(path, args.rows)
            size_mib = path.stat().st_size / 2**20
            print(f"generated {args.rows:,} rows ({size_mib:.0f} MiB) in {time.perf_counter() - started:.1f} s")

        naive_rows = min(args.naive_rows, args.rows)
        naive = _in_child(_naive, str(path), naive_rows, args.region)
        fast_same = _in_child(_fast, str(path), naive_rows, args.region, False)
        fast = _in_child(_fast, str(path), min(args.rows, args.fast_rows), args.region, args.profile)
        full = None
        if not args.skip_full:
            from dispatch.store.embedded import ensure_embedded, stop_embedded

            home = Path(tmp) / "home"
            home.mkdir()
            server, _ = ensure_embedded(home)
            try:
                full = _in_child(
                    _full,
                    str(path),
                    args.rows,
                    args.region,
                    server.url,
                    str(home),
                    args.processes,
                    args.dedup_memory_mib,
                )
            finally:
                stop_embedded(home)

    def line(name: str, r: dict[str, Any]) -> float:
        rate = float(r["rows"] / r["seconds"])
        print(f"{name:<34} {r['rows']:>10,} rows {r['seconds']:8.2f} s {rate:>11,.0f} rows/s  "
              f"peak RSS {r['peak_rss_mib']:6.1f} MiB")  # fmt: skip
        return rate

    load_after = os.getloadavg()
    cores = os.cpu_count() or 1
    print(f"{'(default region ' + args.region + f', {cores} CPUs)':<34} load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.1f}' for x in load_before)}, after {'/'.join(f'{x:.1f}' for x in load_after)}: "
          "the machine is shared, a load above the CPU count means other work took CPU from these figures")  # fmt: skip
    naive_rate = line("(a) naive csv + phonenumbers", naive)
    fast_rate = line("(b) reader + fast validation", fast)
    print(f"speed-up (b)/(a): {fast_rate / naive_rate:.1f}x")
    if full is not None:
        full_rate = line("(c) full Planner, every check", full)
        per_million = full["redis_bytes"] / max(full["accepted"], 1) * 1e6 / 2**20
        redis_mib = full["redis_bytes"] / 2**20
        print(f"    accepted {full['accepted']:,} in {full['batches']:,} batches; Redis +{redis_mib:.1f} MiB = "
              f"{per_million:.1f} MiB per million accepted; (c)/(a) {full_rate / naive_rate:.1f}x; "
              f"target 200,000 rows/s: {'met' if full_rate >= 200_000 else 'NOT met'}")  # fmt: skip
        print(f"    rejected by reason: {sorted(full['rejected'].items())}")
        dedup = full["dedup"]
        print(f"    dedup: {dedup.get('memory_bytes', 0) / 2**20:.0f} MiB in memory, "
              + (f"spilled to disk, {dedup['deferred_rows']:,} rows decided partition by partition"
                 if dedup.get("spilled") else "no spill"))  # fmt: skip
        cpu_total = full["cpu_planner_s"] + full["cpu_workers_s"] + full["cpu_redis_s"]
        per_row_us = cpu_total / full["rows"] * 1e6
        print(f"    CPU: planner {full['cpu_planner_s']:.1f} s + workers {full['cpu_workers_s']:.1f} s + Redis "
              f"{full['cpu_redis_s']:.1f} s = {per_row_us:.1f} us per row, i.e. at most "
              f"{cores / per_row_us * 1e6:,.0f} rows/s on {cores} idle CPUs; peak RSS of a worker "
              f"{full['workers_peak_rss_mib']:.0f} MiB")  # fmt: skip
    same = naive["counts"] == fast_same["counts"]
    print(f"same counts on the first {naive_rows:,} rows: {same}")
    if not same:
        print(f"  naive {sorted(naive['counts'].items())}\n  fast  {sorted(fast_same['counts'].items())}")
    print(f"counts (b): {sorted(fast['counts'].items())}")
    total = sum(fast["counts"].values())
    print(f"counts add up: {total == fast['rows']} ({total:,} = {fast['rows']:,})")
    if fast.get("profile"):
        print(fast["profile"])


if __name__ == "__main__":
    main()
