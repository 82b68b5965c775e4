"""``dispatch demo``: a complete campaign on embedded defaults, from nothing to a report.

It generates an audience (with invalid and duplicate rows), starts the embedded Redis, the mock
provider and worker processes, plans, sends with a progress bar, and reports. It stops everything
it started, and succeeds only if every accepted recipient reached the provider exactly once.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import Any

import orjson
import redis

from dispatch.campaign import CampaignSpec
from dispatch.config import Settings
from dispatch.credentials import redact_url
from dispatch.plan.planner import Planner, read_csv_rows
from dispatch.send.broker import build_broker, enqueue_batch
from dispatch.send.control import CampaignControl, CampaignStatus
from loadtest.audience import generate_csv
from loadtest.cluster import LocalCluster

__all__ = ["progress_line", "run_campaign", "run_demo"]


def progress_line(status: CampaignStatus, width: int = 30) -> str:
    share = status.done / status.accepted if status.accepted else 1.0
    filled = int(share * width)
    eta = f"{status.eta_s:5.1f}s" if status.eta_s is not None else "  -  "
    return (
        f"\r[{'#' * filled}{'.' * (width - filled)}] {status.done:>9,}/{status.accepted:,} "
        f"{status.current_rate:8,.0f} msg/s  eta {eta}"
    )


def run_campaign(
    cluster: LocalCluster, spec: CampaignSpec, rows: Any, *, progress: bool, timeout_s: float | None = None
) -> tuple[dict[str, Any], CampaignStatus, float]:
    """Plan, start and wait for one campaign on a running cluster; returns (plan, status, seconds)."""
    assert cluster.target is not None
    client = redis.Redis.from_url(cluster.target.app_url)
    broker = build_broker(cluster.settings, cluster.target.broker_url)
    try:
        plan = Planner.for_settings(client, cluster.settings).plan(spec, rows)
        control = CampaignControl(client, lambda cid, n, delay: enqueue_batch(broker, cid, n, delay))
        started = time.monotonic()
        control.start(spec.id)
        limit = timeout_s or max(120.0, plan.prediction["duration_s"] * 5 + 60)
        tty = sys.stderr.isatty()
        last_line = 0.0
        while True:
            status = control.status(spec.id)
            if progress and (tty or time.monotonic() - last_line >= 2.0 or status.complete):
                last_line = time.monotonic()
                sys.stderr.write(progress_line(status) if tty else progress_line(status).lstrip("\r") + "\n")
                sys.stderr.flush()
            if status.complete or time.monotonic() - started > limit:
                break
            workers = cluster.worker_processes
            if workers and all(proc.poll() is not None for proc in workers):
                raise RuntimeError("every worker process has exited; their stderr says why")
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        if progress and tty:
            sys.stderr.write("\n")
        return plan.as_dict(), control.status(spec.id), elapsed
    finally:
        broker.close()
        client.close()


def run_demo(settings: Settings, *, recipients: int, workers: int | None, as_json: bool) -> int:
    settings = replace(settings, workers=workers or settings.workers)
    home = settings.home.resolve()
    audience = generate_csv(home / "demo" / "audience.csv", recipients)
    spec = CampaignSpec(
        id=f"demo-{int(time.time() * 1000)}",
        channel="sms",
        body="Hi $first_name, your dispatch demo message has arrived.",
    )
    say = (lambda *_: None) if as_json else print
    say(f"dispatch demo: {recipients:,} recipients, {settings.workers} worker processes")
    with LocalCluster(settings, workers=settings.workers) as cluster:
        say(f"  redis   {redact_url(cluster.target.app_url) if cluster.target else '?'}")
        say(f"  mock    {cluster.mock_url}")
        plan, status, elapsed = run_campaign(cluster, spec, read_csv_rows(audience), progress=not as_json)
        stats = cluster.mock_stats()
    report = {
        "campaign_id": spec.id,
        "audience_total": plan["total"],
        "accepted": plan["accepted"],
        "rejected": plan["rejected"],
        "sent": status.counters["sent"],
        "failed": status.counters["failed"],
        "provider_received": stats["accepted"],
        "provider_duplicates": stats["duplicates"],
        "provider_replays": stats["replays"],
        "predicted_seconds": round(plan["prediction"]["duration_s"], 2),
        "actual_seconds": round(elapsed, 2),
        "messages_per_second": round(status.counters["sent"] / elapsed, 1) if elapsed else 0.0,
        "rejected_file": plan["rejected_file"],
    }
    ok = (
        report["provider_received"] == report["accepted"] == report["sent"]
        and report["provider_duplicates"] == 0
        and report["audience_total"] == report["accepted"] + sum(report["rejected"].values())
    )
    report["ok"] = ok
    if as_json:
        print(orjson.dumps(report).decode())
    else:
        print(f"audience   {report['audience_total']:,} rows")
        print(f"accepted   {report['accepted']:,}")
        for reason, count in sorted(report["rejected"].items()):
            print(f"rejected   {count:,} {reason}")
        print(f"sent       {report['sent']:,}   failed {report['failed']:,}")
        print(f"provider   received {report['provider_received']:,}, duplicates {report['provider_duplicates']}")
        print(f"duration   predicted {report['predicted_seconds']}s, actual {report['actual_seconds']}s")
        print("OK: every accepted recipient was sent exactly once" if ok else "FAILED: see the counts above")
    return 0 if ok else 1
