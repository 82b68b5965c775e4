"""Benchmark of ``POST /v1/messages``: open-loop at a fixed request rate, latency percentiles.

    .venv/bin/python -m loadtest.bench_api [--rate 1000] [--seconds 10] [--campaign 100000] [--profile DIR]

Starts a LocalCluster (embedded Redis, the mock provider, worker processes) and ``dispatch serve``
as its own process, then measures, each phase at ``--rate`` requests/s for ``--seconds``:

1. baseline: ``GET /healthz`` (HTTP + event loop only, no Redis) on the same server;
2. idle: ``POST /v1/messages`` (auth, idempotency, validation, suppression, snapshot, enqueue);
3. busy: the same while a ``--campaign``-recipient campaign sends at full speed (0 skips it).

Open loop: request *i* is due at ``start + i / rate`` whatever happened before, and its latency is
measured from that due time, so a stalled server shows up as latency instead of as fewer requests
(no coordinated omission). The load generator is ``loadtest.http_lite`` (``--client aiohttp`` for
aiohttp's, which costs the shared cores ~170 us per request), with its garbage collector off during
a phase. ``--worker-nice 10`` and ``--worker-sched-idle`` run the workers at a lower CPU priority
than the API (the ``worker_nice`` and ``worker_sched_idle`` settings: the deployment choice for a
latency-bound API sharing cores with throughput-bound workers). Each phase also prints the CPU
each part used (from /proc). ``--timeline CSV`` writes every request's latency and how late the
bench itself was to send it; after the run, Redis's latency events and slow log are printed.
``--profile DIR`` samples the server with py-spy (``--gil``) during the idle phase and prints its
hot spots. At the end the bench waits for the workers to hand every queued triggered message to
the mock (a check that micro-batches are sealed, enqueued and sent once) and prints the load
average before and after (the machine is shared: read latencies next to it). Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis
import uvloop

from dispatch.api.auth import ApiKeyStore
from dispatch.config import Settings, load_settings
from loadtest.audience import generate_rows
from loadtest.cluster import LocalCluster
from loadtest.http_lite import LiteHttp, LiteHttpError
from loadtest.report import summarize_profile
from loadtest.runner import children_running, cpu_seconds, free_port

__all__ = ["Phase", "main", "run_phase"]


@dataclass(frozen=True)
class Phase:
    name: str
    sent: int
    errors: int
    #: (seconds from the phase's start to the request's due time, latency ms, ms the bench itself was
    #: late to send it), in completion order
    timeline: list[tuple[float, float, float]]
    seconds: float
    server_cpu_s: float | None = None
    queued: int = 0
    campaign_accepted: int = 0
    #: CPU seconds of each part of the deployment during the phase
    parts_cpu_s: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def latencies_ms(self) -> list[float]:
        return [ms for _, ms, _ in self.timeline]

    def line(self) -> str:
        lat = sorted(self.latencies_ms)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else float("nan")

        return (
            f"{self.name:<28} {self.sent / self.seconds:7.0f} req/s  errors {self.errors:<5} "
            f"p50 {pct(50):6.2f} ms  p95 {pct(95):6.2f} ms  p99 {pct(99):6.2f} ms  max {max(lat, default=0):7.2f} ms"
            + (f"  server CPU {self.server_cpu_s / self.sent * 1e6:4.0f} us/req" if self.server_cpu_s else "")
            + (
                "\n"
                + " " * 29
                + "CPU cores used: "
                + ", ".join(f"{name} {used / self.seconds:.2f}" for name, used in self.parts_cpu_s.items())
                if self.parts_cpu_s
                else ""
            )
        )


#: (method, path, headers, body) of request i
MakeRequest = Callable[[int], tuple[str, str, dict[str, str], bytes]]
#: sends one request: (status, body)
Send = Callable[[str, str, dict[str, str], bytes], Awaitable[tuple[int, bytes]]]


def aiohttp_sender(session: aiohttp.ClientSession, base: str) -> Send:
    async def send(method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        async with session.request(method, base + path, headers=headers, data=body or None) as response:
            return response.status, await response.read()

    return send


async def run_phase(
    name: str,
    send: Send,
    make_request: MakeRequest,
    *,
    rate: float,
    seconds: float,
    server_pid: int | None = None,
    parts: dict[str, list[int]] | None = None,
) -> Phase:
    """Fire ``make_request(i)`` open-loop at ``rate`` for ``seconds``. The bench's own garbage
    collector is off meanwhile (as ``timeit`` does): a full collection over thousands of tasks
    stalls the bench's loop for tens of ms, which an open-loop measurement charges to the server."""
    total = int(rate * seconds)
    timeline: list[tuple[float, float, float]] = []
    errors = queued = 0
    cpu_before = cpu_seconds(server_pid) if server_pid else None
    parts_before = _parts_cpu(parts or {})
    clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution
    requests = [make_request(i) for i in range(total)]
    collecting = gc.isenabled()
    gc.disable()
    start = clock() + 0.05

    async def one(i: int, due: float) -> None:
        nonlocal errors, queued
        lag = clock() - due
        try:
            status, body = await send(*requests[i])
            ok = status < 400
            queued += status == 202 and b'"state":"queued"' in body
        except (aiohttp.ClientError, LiteHttpError, OSError):
            ok = False
        timeline.append((due - start, (clock() - due) * 1000, lag * 1000))
        if not ok:
            errors += 1

    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(total):
            due = start + i / rate
            delay = due - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
    finally:
        if collecting:
            gc.enable()
    cpu_after = cpu_seconds(server_pid) if server_pid else None
    used = cpu_after - cpu_before if cpu_after is not None and cpu_before is not None else None
    parts_used = {name: after - parts_before.get(name, 0.0) for name, after in _parts_cpu(parts or {}).items()}
    return Phase(name, total, errors, timeline, max(seconds, clock() - start), used, queued, 0, parts_used)


def _parts_cpu(parts: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_seconds(pid) or 0.0 for pid in pids) for name, pids in parts.items()}


#: Redis latency events (LATENCY LATEST) at least this long are printed after the run.
REDIS_LATENCY_THRESHOLD_MS = 5


def _print_redis_latency(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        events = client.execute_command("LATENCY", "LATEST")  # type: ignore[no-untyped-call]
        slow = client.slowlog_get(10)
        scripts = {sha: name for name, sha in _our_scripts().items()}
    finally:
        client.close()
    for entry in sorted(slow, key=lambda e: -int(e["duration"])):
        words = bytes(entry["command"]).split()
        name = words[0].decode(errors="replace").upper() if words else "?"
        if name == "EVALSHA" and len(words) > 1:  # which of our scripts; never its arguments (addresses)
            name += " " + scripts.get(words[1].decode(errors="replace"), words[1][:8].decode(errors="replace"))
        print(f"Redis slow command: {int(entry['duration']) / 1000:.1f} ms {name} ({len(words)} words)", flush=True)
    if not events:
        print(f"Redis: no stall of {REDIS_LATENCY_THRESHOLD_MS} ms or more", flush=True)
    for name, _at, latest, worst, *_ in events:
        label = name.decode() if isinstance(name, bytes) else name
        print(f"Redis stall {label}: latest {latest} ms, worst {worst} ms", flush=True)


def _our_scripts() -> dict[str, str]:
    """Name -> SHA1 of the Lua scripts shipped in ``dispatch/`` (to name them in the slow log)."""
    import hashlib

    import dispatch

    root = Path(dispatch.__file__).parent
    return {path.stem: hashlib.sha1(path.read_bytes()).hexdigest() for path in root.glob("*.lua")}


def _write_timeline(path: Path, phases: list[Phase]) -> None:
    """One row per request: phase, seconds from the phase's start to its due time, latency (ms), and
    how late the bench's own event loop was to send it (ms; a slow bench, not a slow server)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["phase", "due_s", "latency_ms", "bench_lag_ms"])
        for phase in phases:
            writer.writerows(
                (phase.name, f"{due:.6f}", f"{ms:.3f}", f"{lag:.3f}") for due, ms, lag in sorted(phase.timeline)
            )
    print(f"timeline: {path}", flush=True)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("dispatch serve exited")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("dispatch serve did not become ready")


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def _profile(pid: int, seconds: float, out_dir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "api-server.collapsed.txt"
    command = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "500"]
    command += ["--format", "raw", "--output", str(path), "--nonblocking", "--gil"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path


def _print_profile(path: Path) -> None:
    if not path.exists():
        print("profile: py-spy wrote nothing", flush=True)
        return
    summary = summarize_profile(path.read_text(), top=25)
    print(f"profile of the API server ({summary['samples']} samples with the GIL, {path}):")
    for title in ("packages", "self", "ours"):
        print(f"  {title}:")
        for name, share in summary[title]:
            print(f"    {share * 100:5.1f}%  {name}")


async def _bench(
    base: str,
    token: str,
    args: argparse.Namespace,
    audience: Path | None,
    *,
    server_pid: int,
    parts: dict[str, list[int]],
) -> list[Phase]:
    auth = {"Authorization": f"Bearer {token}"}
    run_id = os.urandom(4).hex()
    phases: list[Phase] = []
    connector = aiohttp.TCPConnector(limit=512)
    lite = LiteHttp(*_host_port(base))
    async with aiohttp.ClientSession(connector=connector) as session:
        send: Send = lite.request if args.client == "lite" else aiohttp_sender(session, base)

        def health(i: int) -> tuple[str, str, dict[str, str], bytes]:
            return "GET", "/healthz", {}, b""

        def message(prefix: str) -> MakeRequest:
            def make(i: int) -> tuple[str, str, dict[str, str], bytes]:
                body: dict[str, Any] = {"channel": "sms", "to": f"+4474009{i % 100_000:05d}"}
                body["body"] = "Your code is $code"
                body["attributes"] = {"code": f"{prefix}-{i:06d}"}
                headers = {**auth, "Idempotency-Key": f"{run_id}-{prefix}-{i}", "Content-Type": "application/json"}
                return "POST", "/v1/messages", headers, orjson.dumps(body)

            return make

        # warm connections and the triggered campaign
        phases.append(await run_phase("warm-up", send, message("warm"), rate=200, seconds=1))
        phases.append(
            await run_phase(
                "baseline GET /healthz",
                send,
                health,
                rate=args.rate,
                seconds=args.seconds,
                server_pid=server_pid,
                parts=parts,
            )
        )
        profiler = _profile(server_pid, args.seconds, Path(args.profile)) if args.profile else None
        phases.append(
            await run_phase(
                "POST /v1/messages idle",
                send,
                message("idle"),
                rate=args.rate,
                seconds=args.seconds,
                server_pid=server_pid,
                parts=parts,
            )
        )
        if profiler is not None:
            profiler[0].wait()
            _print_profile(profiler[1])
        if audience is not None:
            form = aiohttp.FormData()
            form.add_field(
                "spec", orjson.dumps({"id": f"bench-{run_id}", "channel": "sms", "body": "Hi $first_name"}).decode()
            )
            form.add_field("audience", audience.open("rb"), content_type="text/csv", filename="audience.csv")
            async with session.post(f"{base}/v1/campaigns", data=form, headers=auth) as response:
                plan = await response.json()
            async with session.post(f"{base}/v1/campaigns/bench-{run_id}/start", headers=auth) as response:
                await response.read()
            await asyncio.sleep(1.0)  # let the workers reach full speed
            busy = await run_phase(
                "POST /v1/messages + campaign",
                send,
                message("busy"),
                rate=args.rate,
                seconds=args.seconds,
                server_pid=server_pid,
                parts=parts,
            )
            async with session.get(f"{base}/v1/campaigns/bench-{run_id}", headers=auth) as response:
                status = await response.json()
            phases.append(dataclasses.replace(busy, campaign_accepted=int(plan["accepted"])))
            print(
                f"campaign: {plan['accepted']} accepted, {status['done']} done during the busy phase "
                f"({status['current_rate']:.0f} msg/s)",
                flush=True,
            )
    lite.close()
    return phases


def _host_port(base: str) -> tuple[str, int]:
    host, _, port = base.removeprefix("http://").partition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--campaign", type=int, default=100_000, help="recipients of the busy phase (0 = skip)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--profile", default="", metavar="DIR", help="py-spy the API server in the idle phase")
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=0,
        help="DISPATCH_WORKER_NICE of the workers (e.g. 10: the API, latency-bound, wins the CPU over sending)",
    )
    parser.add_argument(
        "--worker-sched-idle",
        action="store_true",
        help="DISPATCH_WORKER_SCHED_IDLE: the workers only get CPU time nothing else wants",
    )
    parser.add_argument(
        "--mock-sched-idle",
        action="store_true",
        help="run the mock provider under SCHED_IDLE (it stands for a remote provider)",
    )
    parser.add_argument(
        "--mock-nice",
        type=int,
        default=0,
        help="renice the mock provider (it stands for a remote provider, not for a process of the deployment)",
    )
    parser.add_argument(
        "--client",
        choices=("lite", "aiohttp"),
        default="lite",
        help="the load generator: a minimal keep-alive HTTP/1.1 client (few us per request) or aiohttp's",
    )
    parser.add_argument(
        "--timeline",
        default="",
        metavar="CSV",
        help="write each request's due time, latency and the bench's own send lag",
    )
    parser.add_argument("--drain", type=float, default=60.0, help="seconds to wait for the mock to get every message")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-api-") as home:
        settings: Settings = load_settings(
            {
                "DISPATCH_HOME": home,
                "DISPATCH_WORKER_NICE": str(args.worker_nice),
                "DISPATCH_WORKER_SCHED_IDLE": "true" if args.worker_sched_idle else "false",
            }
        )
        audience: Path | None = None
        if args.campaign:
            audience = Path(home) / "audience.csv"
            with audience.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=["id", "phone", "first_name"])
                writer.writeheader()
                writer.writerows(generate_rows(args.campaign, seed=1))
        with LocalCluster(settings, workers=args.workers) as cluster:
            if not args.workers:
                print("no workers: messages are accepted and enqueued, not sent", flush=True)
            if args.worker_nice:
                print(f"workers run at nice {args.worker_nice} (worker_nice setting)", flush=True)
            if args.worker_sched_idle:
                print("workers run under SCHED_IDLE (worker_sched_idle setting)", flush=True)
            if args.mock_nice or args.mock_sched_idle:
                for pid in children_running("loadtest.mock_provider"):
                    os.setpriority(os.PRIO_PROCESS, pid, args.mock_nice)
                    if args.mock_sched_idle:
                        for tid in os.listdir(f"/proc/{pid}/task"):
                            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
                print(f"the mock provider runs at nice {args.mock_nice}", flush=True)
            if args.mock_sched_idle:
                print("the mock provider runs under SCHED_IDLE", flush=True)
            assert cluster.target is not None
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            server = subprocess.Popen(
                [sys.executable, "-m", "dispatch.cli", "serve", "--port", str(port)],
                env=cluster.env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                _wait_ready(base, server)
                client = redis.Redis.from_url(cluster.target.app_url)
                token, _ = ApiKeyStore(client).create("write", "bench")
                redis_pid = int(client.info("server")["process_id"])
                # Redis's own record of its stalls (fork, AOF writes, slow commands) over the run
                client.config_set("latency-monitor-threshold", REDIS_LATENCY_THRESHOLD_MS)
                client.config_set("slowlog-log-slower-than", REDIS_LATENCY_THRESHOLD_MS * 1000)
                client.slowlog_reset()
                client.close()
                print(f"API at {base}; {args.rate:.0f} req/s for {args.seconds:.0f} s per phase, open loop", flush=True)
                print(f"before: {_load()}", flush=True)
                parts = {
                    "api": [server.pid],
                    "workers": [proc.pid for proc in cluster.worker_processes],
                    "mock": children_running("loadtest.mock_provider"),
                    "bench": [os.getpid()],
                    "redis": [redis_pid],  # a local server; cpu_seconds gives None for one elsewhere
                }
                phases = uvloop.run(_bench(base, token, args, audience, server_pid=server.pid, parts=parts))
                print(f"after:  {_load()}", flush=True)
                triggered = sum(phase.queued for phase in phases)
                expected = triggered + sum(phase.campaign_accepted for phase in phases)
                waited = time.monotonic()
                while cluster.mock_stats()["accepted"] < expected and time.monotonic() - waited < args.drain:
                    time.sleep(0.5)
            finally:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
            for phase in phases:
                print(phase.line())
            _print_redis_latency(cluster.target.app_url)
            if args.timeline:
                _write_timeline(Path(args.timeline), phases)
            stats = cluster.mock_stats()
            print(
                f"mock provider: {stats['accepted']} messages accepted of {expected} queued "
                f"({triggered} triggered), {stats['duplicates']} duplicates",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
