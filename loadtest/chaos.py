"""The crash drill (``dispatch chaos``): a campaign sent through real processes while they are
killed, checked recipient by recipient against what the provider received.

A deployment of its own (an embedded Valkey in a fresh ``DISPATCH_HOME``, the mock provider with
its ledger journaled to a file, ``workers`` worker processes) sends one SMS campaign to a Twilio
twin that, like Twilio, ignores ``Idempotency-Key``. While it sends, at fixed shares of the
campaign sent:

- ``worker-kill``: a worker process is SIGKILLed (requests on the wire and all); a supervisor's
  restart brings a new one ``restart_after_s`` later (as systemd's ``Restart=always`` would);
- ``valkey-kill``: the Valkey server is SIGKILLed; with ``cut_aof`` its append-only file is cut
  back to its size of one second before (what ``appendfsync everysec`` may lose when the machine
  itself crashes); it is restarted on its port ``restart_after_s`` later;
- ``outage``: the provider drops every connection for ``outage_s`` seconds (requests in doubt).

Nobody touches the campaign: it must finish by itself. Then the provider's ledger (the journal
file, the mock's own truth) is compared with the campaign's records:

- ``duplicates``: recipients the provider accepted more than once;
- ``missing``: accepted recipients the provider never got whose record does not say failed;
- ``phantom``: records ``sent`` whose provider id the provider never issued;
- ``held``: messages held in doubt (dead-lettered ``in_doubt``: nothing could tell).

It passes when the campaign completed and duplicates, missing and phantom are all 0. The workers'
logs (in ``<home>/logs``) give how many messages each event left in doubt and how each was
resolved.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
from dramatiq.errors import QueueJoinTimeout

from dispatch.campaign import CampaignSpec
from dispatch.config import Settings
from dispatch.plan.planner import Planner
from dispatch.plan.snapshot import iter_batches
from dispatch.send.broker import build_broker, enqueue_batch
from dispatch.send.control import CampaignControl
from dispatch.send.tracking import iter_records
from dispatch.store.embedded import ensure_embedded, find_embedded
from loadtest.audience import generate_rows
from loadtest.cluster import LocalCluster

__all__ = ["ChaosOptions", "ChaosReport", "run_chaos"]

_RESOLVED = re.compile(r"(\d+) message\(s\) in doubt at (\w+) resolved: (\w+)")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChaosOptions:
    recipients: int = 20_000
    workers: int = 3
    #: Campaign cap (messages per second): long enough a campaign for every event to land mid-send.
    rate: float = 500.0
    worker_kills: int = 2
    valkey_kill: bool = True
    cut_aof: bool = True
    outage_s: float = 20.0
    restart_after_s: float = 2.0
    latency_ms: float = 20.0
    timeout_s: float = 900.0
    seed: int = 11


@dataclass(slots=True)
class ChaosReport:
    campaign_id: str
    accepted: int = 0
    sent: int = 0
    provider_accepted: int = 0
    duplicates: int = 0
    missing: int = 0
    phantom: int = 0
    held: int = 0
    failed: int = 0
    completed: bool = False
    elapsed_s: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    #: resolution -> messages, from the workers' logs (journal, found, not_found, held, ...).
    in_doubt: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.completed and self.duplicates == 0 and self.missing == 0 and self.phantom == 0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


def _aof_file(home: Path) -> Path | None:
    """The incremental AOF file the embedded server appends to (the newest)."""
    files = sorted((home / "valkey-data").glob("**/*.incr.aof"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def run_chaos(settings: Settings, options: ChaosOptions, *, say: Callable[[str], None] = print) -> ChaosReport:
    """Run the drill in ``settings.home`` (which must hold no other deployment); see the module doc."""
    home = settings.home.resolve()
    ledger = home / "mock-ledger.jsonl"
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    drill = dataclasses.replace(
        settings,
        redis_url=None,
        sms_honours_idempotency=False,
        heartbeat_timeout_ms=3000,
        batch_size=200,
    )
    cid = f"chaos-{int(time.time())}"
    report = ChaosReport(cid)
    mock_args = ["--faults", orjson.dumps({"latency_ms": options.latency_ms}).decode(), "--ledger", str(ledger)]
    started = time.monotonic()
    with LocalCluster(drill, workers=options.workers, mock_args=mock_args, log_dir=logs) as cluster:
        assert cluster.target is not None
        client = redis.Redis.from_url(cluster.target.app_url, socket_timeout=5, retry_on_timeout=True)
        spec = CampaignSpec(id=cid, channel="sms", body="Hi $first_name, chaos drill", rate=options.rate)
        plan = Planner(client, drill).plan(spec, generate_rows(options.recipients, seed=options.seed))
        report.accepted = plan.accepted
        broker = build_broker(drill, cluster.target.broker_url)
        control = CampaignControl(client, lambda c, n, d: enqueue_batch(broker, c, n, d))
        control.start(cid)
        say(f"chaos: {plan.accepted:,} SMS in {plan.batches} batches, {options.workers} workers, cap {options.rate}/s")
        shares = [0.15 + 0.15 * i for i in range(options.worker_kills)]
        schedule: list[tuple[float, str]] = [(share, "worker-kill") for share in shares]
        if options.valkey_kill:
            schedule.append((0.5, "valkey-kill"))
        if options.outage_s > 0:
            schedule.append((0.7, "outage"))
        schedule.sort()
        restarts: list[tuple[float, str]] = []
        deadline = started + options.timeout_s
        done = 0
        while time.monotonic() < deadline:
            try:
                status = control.status(cid, speed=False)
            except (redis.RedisError, OSError):
                status = None  # the server is down or restarting
            if status is not None:
                done = status.done
                if status.complete:
                    report.completed = True
                    break
            while schedule and done >= schedule[0][0] * plan.accepted:
                _, event = schedule.pop(0)
                report.events.append({"event": event, "at_done": done, "t": round(time.monotonic() - started, 1)})
                say(f"chaos: {event} at {done:,}/{plan.accepted:,}")
                if event == "worker-kill":
                    victim = next(p for p in cluster.worker_processes if p.poll() is None)
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
                    restarts.append((time.monotonic() + options.restart_after_s, "worker"))
                elif event == "valkey-kill":
                    server = find_embedded(home)
                    assert server is not None
                    aof = _aof_file(home)
                    kept = aof.stat().st_size if aof is not None else 0
                    time.sleep(1.0)  # the last second before the crash: what the cut loses
                    os.kill(server.pid, signal.SIGKILL)
                    _wait(lambda: find_embedded(home) is None, 10)
                    if options.cut_aof and aof is not None:
                        cut = aof.stat().st_size - kept
                        with aof.open("r+b") as handle:
                            handle.truncate(kept)
                        report.events[-1]["aof_bytes_cut"] = cut
                    restarts.append((time.monotonic() + options.restart_after_s, "valkey"))
                elif event == "outage":
                    _post_faults(
                        cluster,
                        {"latency_ms": options.latency_ms, "outage_s": options.outage_s, "outage_mode": "reset"},
                    )
            for due, what in list(restarts):
                if time.monotonic() >= due:
                    restarts.remove((due, what))
                    if what == "worker":
                        cluster.add_worker()
                    else:
                        ensure_embedded(home)  # its port, its data (what the AOF kept)
                        say("chaos: valkey restarted")
            time.sleep(0.1)
        report.elapsed_s = round(time.monotonic() - started, 1)
        try:
            # duplicate batch messages still queued finish first (nothing is checked before);
            # a message a Redis restart left in a live worker's ack set never drains: dramatiq
            # requeues it only when that worker dies, and its run then finds every message done
            cluster.wait_drained(timeout_s=15)
        except QueueJoinTimeout:
            report.events.append({"event": "broker-not-drained", "t": round(time.monotonic() - started, 1)})
        status = control.status(cid, speed=False)
        report.sent = status.counters["sent"]
        report.failed = status.counters["failed"]
        report.held = status.counters.get("in_doubt", 0)
        _compare(report, client, cid, plan.batches, ledger)
        broker.close()
        client.close()
    for log_file in logs.glob("*.log"):
        for match in _RESOLVED.finditer(log_file.read_text(errors="replace")):
            report.in_doubt[match.group(3)] = report.in_doubt.get(match.group(3), 0) + int(match.group(1))
    return report


def _compare(report: ChaosReport, client: redis.Redis, cid: str, batches: int, ledger: Path) -> None:
    """Recipient by recipient: the provider's journal against the campaign's records."""
    received: Counter[str] = Counter()
    sids: set[str] = set()
    for line in ledger.read_bytes().splitlines():
        if not line.strip():
            continue
        entry = orjson.loads(line)
        if entry.get("ch") == "sms":
            received[str(entry["to"])] += 1
            sids.add(str(entry.get("id")))
    report.provider_accepted = sum(received.values())
    report.duplicates = sum(n - 1 for n in received.values() if n > 1)
    addresses = {
        (snapshot.number, index): row.address
        for snapshot in iter_batches(client, cid, batches)
        for index, row in enumerate(snapshot.rows)
    }
    states = {(r.batch, r.index): r for r in iter_records(client, cid, batches)}
    for key, address in addresses.items():
        record = states.get(key)
        if received[address] == 0 and (record is None or record.state != "failed"):
            report.missing += 1
        if record is not None and record.state in {"sent", "delivered"} and record.provider_id not in sids:
            report.phantom += 1


def _post_faults(cluster: LocalCluster, faults: dict[str, Any]) -> None:
    import urllib.request

    request = urllib.request.Request(
        f"{cluster.mock_url}/_mock/faults",
        data=orjson.dumps(faults),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


def _wait(condition: Callable[[], bool], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
