"""Benchmark: a campaign through real workers while its SMS provider is down, with and without a
second provider (issue 18's check).

Three runs on one machine, each a fresh cluster (Redis, mock provider, workers) sending the same
campaign at a capped rate:

1. **baseline**: no outage; its duration is what the others are measured against;
2. **failover**: Twilio's twin down (``--mode``: 503s or dropped connections) for ``--outage-s``
   seconds from the moment a tenth of the campaign is sent, a second mock serving Aliyun, the
   workers configured with ``DISPATCH_SMS_PROVIDERS=twilio,aliyun``;
3. **wait**: the same outage, Twilio alone: the campaign must wait and resume by itself.

For each it prints the duration, the time lost to the outage (duration minus the baseline's),
messages lost (accepted but neither at a provider nor failed), accepted twice (at one provider or
at both: the sum of the providers' ledgers minus the campaign's sent count), dead letters, and
how many each provider carried::

    python -m loadtest.bench_failover --messages 3000 --rate 150 --outage-s 30
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from dispatch.campaign import CampaignSpec
from dispatch.config import load_settings
from dispatch.plan.planner import Planner
from dispatch.send.broker import build_broker, enqueue_batch
from dispatch.send.control import CampaignControl
from dispatch.send.tracking import campaign_counters
from loadtest.audience import generate_rows
from loadtest.cluster import LocalCluster, fetch_mock_stats

__all__ = ["Outcome", "main", "run"]


@dataclass(frozen=True, slots=True)
class Outcome:
    name: str
    duration_s: float
    accepted: int
    sent: int
    dead_letters: int
    by_provider: dict[str, int]
    duplicates: int

    @property
    def lost(self) -> int:
        return self.accepted - self.sent - self.dead_letters


class _SecondMock:
    """A second mock provider process (the Aliyun twin's host)."""

    def __init__(self, home: Path) -> None:
        ready = home / "second-mock.url"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "loadtest.mock_provider", "--port", "0", "--ready-file", str(ready)],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the second mock provider did not start")
            time.sleep(0.02)
        self.url = ready.read_text().strip()

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)


def run(name: str, *, messages: int, rate: float, outage_s: float, mode: str, second: bool, workers: int) -> Outcome:
    with tempfile.TemporaryDirectory(prefix=f"bench-failover-{name}-") as tmp:
        home = Path(tmp)
        settings = load_settings({"DISPATCH_HOME": str(home), "DISPATCH_BATCH_SIZE": "200"})
        other = _SecondMock(home) if second else None
        worker_env = {}
        if other is not None:
            worker_env = {"DISPATCH_SMS_PROVIDERS": "twilio,aliyun", "DISPATCH_ALIYUN_BASE_URL": f"{other.url}/aliyun"}
        try:
            with LocalCluster(settings, workers=workers, worker_env=worker_env) as cluster:
                assert cluster.target is not None
                client = redis.Redis.from_url(cluster.target.app_url)
                broker = build_broker(settings, cluster.target.broker_url)
                cid = f"bench-{name}"
                spec = CampaignSpec(id=cid, channel="sms", body="Hello $first_name", rate=rate)
                plan = Planner(client, settings).plan(spec, generate_rows(messages, seed=11))
                control = CampaignControl(client, lambda c, n, d: enqueue_batch(broker, c, n, d))
                started = time.monotonic()
                control.start(cid)
                if outage_s > 0:
                    while campaign_counters(client, cid)["sent"] < plan.accepted // 10:
                        time.sleep(0.05)
                    asyncio.run(cluster.set_faults({"outage_s": outage_s, "outage_mode": mode}))
                while not control.status(cid, speed=False).complete:
                    time.sleep(0.1)
                duration = time.monotonic() - started
                counters = campaign_counters(client, cid)
                first: dict[str, Any] = cluster.mock_stats()
                by_provider = {"twilio": int(first["accepted"])}
                if other is not None:
                    by_provider["aliyun"] = int(fetch_mock_stats(other.url)["accepted"])
                broker.close()
                client.close()
        finally:
            if other is not None:
                other.stop()
    duplicates = sum(by_provider.values()) - counters["sent"]
    return Outcome(name, duration, plan.accepted, counters["sent"], counters["dead_letters"], by_provider, duplicates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=150.0, help="campaign cap, messages per second")
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--mode", choices=["503", "reset"], default="503")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    common = {"messages": args.messages, "rate": args.rate, "mode": args.mode, "workers": args.workers}
    baseline = run("baseline", outage_s=0, second=False, **common)
    results = [
        baseline,
        run("failover", outage_s=args.outage_s, second=True, **common),
        run("wait", outage_s=args.outage_s, second=False, **common),
    ]
    print(
        f"{args.messages} messages at {args.rate:g}/s, outage {args.outage_s:g} s ({args.mode}), {args.workers} workers"
    )
    print("run        duration  lost_to_outage  lost  twice  dead  by provider")
    for r in results:
        lost_time = r.duration_s - baseline.duration_s
        print(
            f"{r.name:<10} {r.duration_s:7.1f}s  {lost_time:13.1f}s  {r.lost:4d}  {r.duplicates:5d}  "
            f"{r.dead_letters:4d}  {r.by_provider}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
