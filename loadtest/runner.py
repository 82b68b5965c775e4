"""``dispatch loadtest``: one campaign through real worker processes against the mock provider.

It generates an audience, starts Redis + the mock provider (with the requested latency and
error rate) + W worker processes each serving ``/metrics``, plans, starts, and samples every
second: finished messages (the campaign counters), the provider's own per-second ledger and the
workers' latency histograms. The report (a dict, written as JSON, with a PNG chart) holds:

* throughput: mean over the run, the median 1-s rate ("sustained"), and the series;
* provider-call latency p50/p95/p99 (from the workers' histograms, bucket precision);
* retries, lost (accepted recipients neither at the provider nor recorded as failed),
  duplicates (the provider accepted the same message twice);
* predicted vs actual duration, and the highest 1-s rate the provider saw vs the limit.

Errors: :class:`LoadtestError` (a ``DispatchError``: the CLI prints it) when the run cannot
start (a channel not wired into the workers, a worker that never comes up).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis

from channels import default_registry
from dispatch.campaign import CampaignSpec
from dispatch.config import Settings
from dispatch.errors import DispatchError
from dispatch.plan.calibration import local_speed
from dispatch.plan.planner import Planner
from dispatch.send.broker import build_broker, enqueue_batch
from dispatch.send.control import CampaignControl, CampaignStatus
from dispatch.send.runtime import build_channels
from loadtest.audience import generate_rows
from loadtest.chart import render_loadtest_chart
from loadtest.cluster import LocalCluster
from loadtest.demo import progress_line
from loadtest.report import (
    Buckets,
    Sample,
    bucket_percentile,
    diff_buckets,
    parse_histogram,
    sum_buckets,
    summarize_profile,
)

__all__ = [
    "CHANNELS",
    "LoadtestError",
    "LoadtestOptions",
    "audience_rows",
    "children_running",
    "cpu_seconds",
    "free_port",
    "run_loadtest",
    "wired_channels",
]

#: Channels a load test can use: those with a provider in the registry (the mock provider serves each).
CHANNELS = default_registry().channel_names(sendable=True)
#: Seconds a worker may take to serve its first /metrics answer.
WORKER_START_TIMEOUT_S = 60.0
#: How often the runner checks whether the campaign finished (the samples are 1 s apart).
POLL_S = 0.05
#: The message every load-test recipient gets: one GSM-7 segment after substitution.
BODY = "Hi $first_name, this is a dispatch load test message."


class LoadtestError(DispatchError):
    """A load test cannot run as asked (the message says why and what to do)."""


@dataclass(frozen=True, kw_only=True)
class LoadtestOptions:
    recipients: int
    workers: int = 2
    channel: str = "sms"
    #: Latency the mock adds to every request, and the latency the prediction assumes.
    provider_latency_ms: float = 0.0
    #: Share of provider requests answered 500/503 (half each); the pipeline retries them.
    error_rate: float = 0.0
    #: Provider account limit (SMS: segments/s; other channels: the campaign's cap), None = none.
    rate_limit: float | None = None
    out_dir: Path | None = None
    seed: int = 7
    campaign_id: str | None = None
    timeout_s: float | None = None
    progress: bool = True
    interval_s: float = 1.0
    #: Recipients per batch; None = the settings' ``batch_size``.
    batch_size: int | None = None
    #: Seconds of py-spy sampling of every worker and the mock from the campaign's start (0 = off).
    profile_s: float = 0.0
    #: Called with each sample (the bench prints its own lines).
    on_sample: Callable[[Sample], None] | None = field(default=None, compare=False)
    #: Called with (seconds since the start, status) at every poll (the prediction matrix reads the live ETA).
    on_status: Callable[[float, CampaignStatus], None] | None = field(default=None, compare=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wired_channels(settings: Settings) -> set[str]:
    """Channels the worker runtime builds (``dispatch.send.runtime.build_channels``)."""

    async def names() -> set[str]:
        async with aiohttp.ClientSession() as session:
            channels = build_channels(settings, session)
            for channel in channels.values():
                await channel.close()
            return set(channels)

    return asyncio.run(names())


def audience_rows(count: int, *, seed: int = 7) -> Iterator[dict[str, str]]:
    """The synthetic audience with an address column for every channel (see loadtest.audience)."""
    for i, row in enumerate(generate_rows(count, seed=seed)):
        row["email"] = f"user{i}@loadtest.example.com"
        row["push_token"] = f"lt{i:010d}-" + "a" * 140
        row["webhook_url"] = f"https://hooks.loadtest.example.com/r/{i}"
        yield row


def _fetch(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def _faults(options: LoadtestOptions) -> dict[str, Any]:
    faults: dict[str, Any] = {"latency_ms": options.provider_latency_ms}
    if options.error_rate:
        faults["p_500"] = options.error_rate / 2
        faults["p_503"] = options.error_rate / 2
    return faults


def loadtest_settings(settings: Settings, options: LoadtestOptions) -> Settings:
    """Settings for the run: worker count, account limit and the latency the prediction assumes."""
    changes: dict[str, Any] = {
        "workers": options.workers,
        "provider_latency_ms": options.provider_latency_ms,
        "sms_rate": options.rate_limit if options.channel == "sms" and options.rate_limit else 0.0,
    }
    if options.batch_size:
        changes["batch_size"] = options.batch_size
    return replace(settings, **changes)


class _Scraper:
    """Latest latency histogram of every worker (a worker that stops answering keeps its last)."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.last: dict[str, Buckets] = {}

    def wait_ready(self, cluster: LocalCluster, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.urls)
        while pending:
            try:
                _fetch(pending[0], timeout=1.0)
                pending.pop(0)
                continue
            except (OSError, urllib.error.URLError):
                pass
            if any(proc.poll() is not None for proc in cluster.worker_processes):
                raise LoadtestError("a worker process exited during start-up (see its log above)")
            if time.monotonic() > deadline:
                raise LoadtestError(f"workers did not serve /metrics within {timeout_s:.0f} s")
            time.sleep(0.1)

    def scrape(self) -> Buckets:
        for url in self.urls:
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                self.last[url] = parse_histogram(_fetch(url).decode())
        return sum_buckets(self.last.values())


def _processes(match: Callable[[int, str], bool]) -> list[int]:
    """Pids whose (parent pid, command line) satisfy ``match`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                ppid = int(handle.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if match(ppid, cmdline):
            found.append(int(entry))
    return found


def children_running(module: str) -> list[int]:
    """Pids of this process's children whose command line names ``module``."""
    return _processes(lambda ppid, cmdline: ppid == os.getpid() and module in cmdline)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuMeter:
    """CPU seconds used by each part of the deployment between ``start`` and ``stop``."""

    def __init__(self, cluster: LocalCluster) -> None:
        assert cluster.target is not None
        port = cluster.target.app_url.rsplit(":", 1)[-1].split("/", 1)[0]
        self.parts: dict[str, list[int]] = {
            "workers": [proc.pid for proc in cluster.worker_processes],
            "mock": children_running("loadtest.mock_provider"),
            "redis": _processes(lambda _, cmd: ("valkey-server" in cmd or "redis-server" in cmd) and f":{port}" in cmd),
            "runner": [os.getpid()],
        }
        self._start: dict[int, float] = {}

    def _read(self) -> dict[int, float]:
        values = {}
        for pids in self.parts.values():
            for pid in pids:
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    values[pid] = cpu
        return values

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> dict[str, float | None]:
        """CPU seconds per part (None when its processes could not be found)."""
        end = self._read()
        used: dict[str, float | None] = {}
        for name, pids in self.parts.items():
            seen = [pid for pid in pids if pid in end and pid in self._start]
            used[name] = round(sum(end[pid] - self._start[pid] for pid in seen), 3) if seen else None
        return used


class _Profiler:
    """py-spy ``record`` on the workers and the mock provider for a fixed number of seconds."""

    def __init__(self, cluster: LocalCluster, out_dir: Path, seconds: float) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            raise LoadtestError("--profile needs py-spy: .venv/bin/pip install py-spy")
        out_dir.mkdir(parents=True, exist_ok=True)
        targets = [(f"worker{i}", proc.pid) for i, proc in enumerate(cluster.worker_processes)]
        targets += [("mock", pid) for pid in children_running("loadtest.mock_provider")]
        self.files: dict[str, Path] = {}
        self._procs: list[subprocess.Popen[bytes]] = []
        for name, pid in targets:
            path = out_dir / f"{name}.collapsed.txt"
            self.files[name] = path
            command = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "250"]
            # --gil: only samples holding the GIL, i.e. Python CPU (not sleeps, not epoll waits)
            command += ["--format", "raw", "--output", str(path), "--nonblocking", "--gil"]
            self._procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def finish(self, timeout_s: float) -> dict[str, Any]:
        for proc in self._procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
        summary: dict[str, Any] = {}
        for name, path in self.files.items():
            if path.exists():
                summary[name] = {"file": str(path), **summarize_profile(path.read_text())}
        return summary


def _latency(buckets: Buckets) -> tuple[float, float, float]:
    return (
        bucket_percentile(buckets, 0.50) * 1000,
        bucket_percentile(buckets, 0.95) * 1000,
        bucket_percentile(buckets, 0.99) * 1000,
    )


def _ms(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 2)


def run_loadtest(
    settings: Settings, options: LoadtestOptions, *, cluster: LocalCluster | None = None
) -> dict[str, Any]:
    """Run one load test and return its report (also written to ``out_dir`` as JSON and PNG).

    With ``cluster`` (a running one, without workers: the bench's) the run uses its Redis and mock
    provider (whose faults it sets) and adds the workers to it; otherwise it starts its own.
    """
    if options.channel not in CHANNELS:
        raise LoadtestError(f"unknown channel {options.channel!r}; use one of {', '.join(CHANNELS)}")
    if options.recipients < 1 or options.workers < 1:
        raise LoadtestError("--recipients and --workers must be at least 1")
    if not 0.0 <= options.error_rate <= 1.0:
        raise LoadtestError("--error-rate is a probability from 0 to 1")
    settings = loadtest_settings(settings, options)
    if options.channel not in wired_channels(settings):
        raise LoadtestError(
            f"the {options.channel} channel is not wired into the worker runtime yet "
            "(dispatch.send.runtime.build_channels); only these are: " + ", ".join(sorted(wired_channels(settings)))
        )
    cid = options.campaign_id or f"loadtest-{int(time.time() * 1000)}"
    out_dir = _out_dir(settings, options)
    spec = CampaignSpec(
        id=cid,
        channel=options.channel,
        body=BODY,
        subject="dispatch load test" if options.channel == "email" else None,
        rate=options.rate_limit if options.channel != "sms" else None,
        batch_size=options.batch_size,
    )
    ports = [free_port() for _ in range(options.workers)]
    if cluster is None:
        mock_args = ["--faults", orjson.dumps(_faults(options)).decode()]
        with LocalCluster(settings, workers=0, mock_args=mock_args, metrics_ports=ports) as own:
            report = _with_workers(own, settings, spec, options, ports)
    else:
        cluster.settings = settings
        asyncio.run(cluster.set_faults(_faults(options)))
        report = _with_workers(cluster, settings, spec, options, ports)
    report["json_file"] = str(out_dir / f"{cid}.json")
    report["chart_file"] = str(out_dir / f"{cid}.png")
    out_dir.mkdir(parents=True, exist_ok=True)
    _chart(report, Path(report["chart_file"]))
    Path(report["json_file"]).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return report


def _out_dir(settings: Settings, options: LoadtestOptions) -> Path:
    return (options.out_dir or settings.home / "loadtest").resolve()


def _add_workers(cluster: LocalCluster, ports: list[int]) -> _Scraper:
    for port in ports:
        # one /metrics port per worker: LocalCluster.env() is read again by each add_worker
        cluster.worker_env["DISPATCH_METRICS_PORT"] = str(port)
        cluster.add_worker()
    cluster.worker_env.pop("DISPATCH_METRICS_PORT", None)
    scraper = _Scraper([f"http://127.0.0.1:{port}/metrics" for port in ports])
    scraper.wait_ready(cluster, WORKER_START_TIMEOUT_S)
    return scraper


def _with_workers(
    cluster: LocalCluster, settings: Settings, spec: CampaignSpec, options: LoadtestOptions, ports: list[int]
) -> dict[str, Any]:
    """Plan (before any worker runs), start the workers, then send and sample."""
    assert cluster.target is not None
    client = redis.Redis.from_url(cluster.target.app_url)
    broker = build_broker(settings, cluster.target.broker_url)
    try:
        plan_started = time.monotonic()
        rows = audience_rows(options.recipients, seed=options.seed)
        plan = Planner(client, settings).plan(spec, rows).as_dict()
        plan_s = time.monotonic() - plan_started
        scraper = _add_workers(cluster, ports)
        control = CampaignControl(client, lambda cid, n, delay: enqueue_batch(broker, cid, n, delay))
        baseline = scraper.scrape()
        meter = _CpuMeter(cluster)
        meter.start()
        started = time.monotonic()
        started_wall = time.time()
        control.start(spec.id)
        profiler = None
        if options.profile_s > 0:
            profiler = _Profiler(cluster, _out_dir(settings, options) / f"{spec.id}-profile", options.profile_s)
        samples, status, actual_s, final_buckets = _sample(
            control=control,
            cid=spec.id,
            plan=plan,
            options=options,
            scraper=scraper,
            started=started,
            baseline=baseline,
        )
        cpu = meter.stop()
        speed_after = local_speed(probes=1).factor
        time.sleep(0.2)  # answers in flight when the counters completed reach the ledger
        stats = cluster.mock_stats()
        profile = profiler.finish(options.profile_s + 15) if profiler is not None else None
    finally:
        broker.close()
        client.close()
    report = _build_report(
        settings=settings,
        spec=spec,
        options=options,
        plan=plan,
        plan_s=plan_s,
        samples=samples,
        status=status,
        actual_s=actual_s,
        started_wall=started_wall,
        stats=stats,
        latency=diff_buckets(final_buckets, baseline),
    )
    report["prediction"]["speed_factor_after"] = round(speed_after, 3)  # probed after the send
    sent = max(1, report["sent"])
    report["cpu"] = {
        "seconds": cpu,
        "us_per_message": {k: None if v is None else round(v / sent * 1e6, 1) for k, v in cpu.items()},
        "cores_busy": {k: None if v is None else round(v / max(report["prediction"]["actual_s"], 1e-6), 2)
                       for k, v in cpu.items()},
        "note": "runner = this process (planning excluded: counted from the campaign's start)",
    }  # fmt: skip
    if profile is not None:
        report["profile"] = profile
    return report


def _sample(
    *,
    control: CampaignControl,
    cid: str,
    plan: dict[str, Any],
    options: LoadtestOptions,
    scraper: _Scraper,
    started: float,
    baseline: Buckets,
) -> tuple[list[Sample], CampaignStatus, float, Buckets]:
    limit = options.timeout_s or max(120.0, plan["prediction"]["duration_s"] * 5 + 60)
    tty = sys.stderr.isatty()
    samples: list[Sample] = []
    previous_t, previous_done, previous_retries, previous_buckets = 0.0, 0, 0, baseline
    next_sample = started + options.interval_s
    last_line = 0.0
    finished_at: float | None = None
    while True:
        status = control.status(cid)
        now = time.monotonic()
        if options.on_status is not None:
            options.on_status(now - started, status)
        if status.complete and finished_at is None:
            finished_at = now
        if now >= next_sample or finished_at is not None:
            buckets = scraper.scrape()
            t = now - started
            done, retries = status.done, status.counters.get("retries", 0)
            interval = diff_buckets(buckets, previous_buckets)
            p50, p95, p99 = _latency(interval)
            sample = Sample(
                t=t,
                done=done,
                sent=status.counters["sent"],
                rate=(done - previous_done) / max(t - previous_t, 1e-6),
                provider_rate=0,  # filled from the provider's final ledger
                p50_ms=p50,
                p95_ms=p95,
                p99_ms=p99,
                retries=retries - previous_retries,
            )
            samples.append(sample)
            if options.on_sample is not None:
                options.on_sample(sample)
            previous_t, previous_done, previous_retries, previous_buckets = t, done, retries, buckets
            next_sample += options.interval_s * max(1, math.ceil((now - next_sample) / options.interval_s + 1e-9))
        if options.progress and (tty or now - last_line >= 2.0 or finished_at is not None):
            last_line = now
            line = progress_line(status)
            sys.stderr.write(line if tty else line.lstrip("\r") + "\n")
            sys.stderr.flush()
        if finished_at is not None:
            break
        if now - started > limit:
            finished_at = now
            break
        time.sleep(POLL_S)
    if options.progress and tty:
        sys.stderr.write("\n")
    return samples, status, finished_at - started, previous_buckets


def _build_report(
    *,
    settings: Settings,
    spec: CampaignSpec,
    options: LoadtestOptions,
    plan: dict[str, Any],
    plan_s: float,
    samples: list[Sample],
    status: CampaignStatus,
    actual_s: float,
    started_wall: float,
    stats: dict[str, Any],
    latency: Buckets,
) -> dict[str, Any]:
    counters = status.counters
    accepted = int(plan["accepted"])
    sent = counters.get("sent", 0)
    failed = counters.get("failed", 0)
    unique = int(stats["accepted"]) - int(stats["duplicates"])
    accounted = failed + counters.get("suppressed", 0) + counters.get("skipped", 0)
    per_second = {int(k): int(v) for k, v in stats["per_second"].items()}
    first_second = int(started_wall)
    provider_series = [(second - started_wall, n) for second, n in sorted(per_second.items())]
    # provider rate of each sample: the wall-clock second the sample ended in (the last full one)
    filled = [
        replace(s, provider_rate=per_second.get(int(started_wall + s.t) - 1, 0)) if s.t >= 1 else s for s in samples
    ]
    rates = [s.rate for s in filled[1:-1]] or [s.rate for s in filled]
    mean = sent / actual_s if actual_s > 0 else 0.0
    predicted = float(plan["prediction"]["duration_s"])
    p50, p95, p99 = _latency(latency)
    rate_limit = options.rate_limit
    peak = max(per_second.values(), default=0)
    complete = status.complete
    report: dict[str, Any] = {
        "campaign_id": spec.id,
        "channel": spec.channel,
        "workers": options.workers,
        "recipients": int(plan["total"]),
        "accepted": accepted,
        "rejected": plan["rejected"],
        "sent": sent,
        "failed": failed,
        "dead_letters": counters.get("dead_letters", 0),
        "retries": counters.get("retries", 0),
        "lost": accepted - unique - accounted,
        "duplicates": int(stats["duplicates"]),
        "complete": complete,
        "throughput": {
            "mean": round(mean, 1),
            "sustained": round(statistics.median(rates), 1) if rates else 0.0,
            "peak_sample": round(max((s.rate for s in filled), default=0.0), 1),
        },
        "latency_ms": {
            "p50": _ms(p50),
            "p95": _ms(p95),
            "p99": _ms(p99),
            "observations": int(latency[-1][1]) if latency else 0,
            "source": "workers' dispatch_send_latency_seconds histograms (bucket interpolation)",
        },
        "prediction": {
            "predicted_s": round(predicted, 3),
            "actual_s": round(actual_s, 3),
            "error_pct": round((predicted - actual_s) / actual_s * 100, 1) if actual_s > 0 else 0.0,
            "bottleneck": plan["prediction"]["bottleneck"],
            "predicted_rate": round(float(plan["prediction"]["rate"]), 1),
            "plan_s": round(plan_s, 3),
            "speed_factor": plan["prediction"].get("speed_factor", 1.0),  # the plan's (dispatch.plan.calibration)
            # the plan's range (p10-p90) and what it rests on (dispatch.plan.prediction, dispatch.plan.evidence)
            "predicted_low_s": round(float(plan["prediction"].get("duration_low_s") or predicted), 3),
            "predicted_high_s": round(float(plan["prediction"].get("duration_high_s") or predicted), 3),
            "speed_source": plan["prediction"].get("speed_source", "off"),
            "speed_spread": plan["prediction"].get("speed_spread", 0.0),
            "busy_cores": plan["prediction"].get("busy_cores", 0.0),
        },
        "provider": {
            "accepted": int(stats["accepted"]),
            "unique": unique,
            "replays": int(stats["replays"]),
            "rejected": int(stats["rejected"]),
            "faults": stats.get("faults", {}),
            "max_in_flight": stats.get("max_in_flight"),
            "peak_1s": peak,
            "rate_limit": rate_limit,
            "peak_over_limit": round(peak / rate_limit, 3) if rate_limit else None,
            "first_second": first_second,
        },
        "settings": {
            "provider_latency_ms": options.provider_latency_ms,
            "error_rate": options.error_rate,
            "batch_size": settings.batch_size,
            "worker_threads": settings.worker_threads,
            "send_concurrency": settings.send_concurrency,
            "max_attempts": settings.max_attempts,
            "cpu_per_message_us": settings.cpu_per_message_us,
        },
        "samples": [s.as_dict() for s in filled],
        "provider_per_second": [[round(t, 3), n] for t, n in provider_series],
    }
    report["ok"] = bool(
        complete
        and report["lost"] == 0
        and report["duplicates"] == 0
        and sent + accounted == accepted
        and (not rate_limit or options.channel != "sms" or peak <= rate_limit * 1.1 + 10)
    )
    return report


def _chart(report: dict[str, Any], path: Path) -> Path:
    return render_loadtest_chart(report, path)
