"""``dispatch bench``: the raw provider ceiling and the full pipeline, in one run, on one mock.

    .venv/bin/dispatch bench --messages 3000000 --workers 2
    .venv/bin/python -m loadtest.bench --messages 200000     # the same, without the CLI

(a) raw ceiling: W processes (the pipeline's worker count), each a bare aiohttp client (uvloop)
    keeping ``send_concurrency`` Twilio-form POSTs in flight against the mock provider for
    ``--raw-seconds``: no Redis, no dedup, no rate limiter, no metrics. Its rate is the most any
    client on this machine gets out of this mock, which runs on the same cores.
(b) the full pipeline: a ``dispatch loadtest`` run of ``--messages`` SMS through W worker
    processes (dedup claims, rate-limit step, retries, tracking, Prometheus metrics on) against
    the same mock process, after its ledger is reset.
(c) the raw ceiling again, right after the pipeline. A shared VM's speed drifts (the same 10-s
    raw measurement gave 7,110-8,903 msg/s within an hour), and one sample taken before a
    ten-minute run says little about the machine during it; the ratio is taken against the mean
    of (a) and (c), and printed against each alone as well.

It prints them, the ratios, and then the planner benchmark (``loadtest.bench_planner``: the
fast audience + validation path and the naive csv + phonenumbers baseline), and with
``--derive-rows`` the derived-audience benchmark (``loadtest.bench_derive``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import multiprocessing as mp
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

from dispatch.config import Settings
from loadtest import bench_derive, bench_planner
from loadtest.cluster import LocalCluster
from loadtest.report import percentile
from loadtest.runner import LoadtestOptions, children_running, cpu_seconds, run_loadtest

__all__ = ["PREDICTION_CASES", "main", "prediction_matrix", "raw_ceiling", "run_bench"]

#: Seconds of bare-client traffic before the measured window (connections, warm caches).
RAW_WARMUP_S = 1.0


async def _raw_client(
    url: str, *, account_sid: str, token: str, concurrency: int, seconds: float, offset: int
) -> dict[str, Any]:
    endpoint = f"{url}/2010-04-01/Accounts/{account_sid}/Messages.json"
    auth = aiohttp.encode_basic_auth(account_sid, token)
    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0}
    warm_until = time.monotonic() + RAW_WARMUP_S
    stop_at = warm_until + seconds
    serial = offset

    async def one_loop(session: aiohttp.ClientSession) -> None:
        nonlocal serial
        while True:
            serial += 1
            n = serial
            started = time.monotonic()
            if started >= stop_at:
                return
            form = {"To": f"+1201555{n % 10_000_000:07d}", "From": "+15005550006", "Body": f"raw ceiling {n}"}
            headers = {"Authorization": auth, "Idempotency-Key": f"raw-{n}"}
            async with session.post(endpoint, data=form, headers=headers) as response:
                await response.read()
                ok = response.status == 201
            if started >= warm_until:
                counts["ok" if ok else "errors"] += 1
                latencies.append(time.monotonic() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one_loop(session) for _ in range(concurrency)))
    return {**counts, "seconds": seconds, "latencies": latencies}


def _raw_process(url: str, options: dict[str, Any]) -> bytes:
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = uvloop.run(_raw_client(url, **options))
    after = resource.getrusage(resource.RUSAGE_SELF)
    # includes the warm-up second: a slight overestimate of the client's cost per message
    result["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return orjson.dumps(result)


def raw_ceiling(
    url: str, *, account_sid: str, token: str, processes: int, concurrency: int, seconds: float
) -> dict[str, Any]:
    """Messages/s the mock accepts from bare clients (``processes`` x ``concurrency`` in flight)."""
    ctx = mp.get_context("spawn")
    mock_pids = children_running("loadtest.mock_provider")
    mock_before = sum(cpu_seconds(pid) or 0.0 for pid in mock_pids)
    with ctx.Pool(processes) as pool:
        jobs = [
            pool.apply_async(
                _raw_process,
                (
                    url,
                    {
                        "account_sid": account_sid,
                        "token": token,
                        "concurrency": concurrency,
                        "seconds": seconds,
                        "offset": i * 100_000_000,
                    },
                ),
            )
            for i in range(processes)
        ]
        parts = [orjson.loads(job.get()) for job in jobs]
    mock_cpu = sum(cpu_seconds(pid) or 0.0 for pid in mock_pids) - mock_before
    ok = sum(p["ok"] for p in parts)
    total = max(1, ok)
    latencies = [x for p in parts for x in p["latencies"]]
    return {
        "processes": processes,
        "concurrency": concurrency,
        "seconds": seconds,
        "messages": ok,
        "errors": sum(p["errors"] for p in parts),
        "rate": round(ok / seconds, 1),
        "cpu_us_per_message": {
            "clients": round(sum(p["cpu_s"] for p in parts) / total * 1e6, 1),
            "mock": round(mock_cpu / total * 1e6, 1) if mock_pids else None,
        },
        "latency_ms": {
            q: round(percentile(latencies, v) * 1000, 2) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
        },
    }


#: (recipients, workers, provider latency ms, rate limit/s or 0, channel): sizes, rates, latencies
#: and channels that make each of the prediction's ceilings the bottleneck at least once.
PREDICTION_CASES: tuple[tuple[int, int, float, float, str], ...] = (
    (20_000, 1, 0.0, 0.0, "sms"),
    (100_000, 2, 0.0, 0.0, "sms"),
    (300_000, 2, 20.0, 0.0, "sms"),
    (30_000, 2, 20.0, 1000.0, "sms"),
    (40_000, 2, 0.0, 3000.0, "sms"),
    (30_000, 1, 200.0, 0.0, "sms"),
    (30_000, 2, 500.0, 0.0, "sms"),
    (300_000, 2, 0.0, 0.0, "email"),
    (1_000_000, 2, 0.0, 0.0, "email"),
    (200_000, 2, 0.0, 20_000.0, "email"),
)


def prediction_matrix(
    settings: Settings, cases: tuple[tuple[int, int, float, float, str], ...] = PREDICTION_CASES, *, quiet: bool = False
) -> list[dict[str, Any]]:
    """Predicted vs actual duration of one load test per case (each on its own deployment)."""
    rows = []
    for recipients, workers, latency, rate, channel in cases:
        report = run_loadtest(
            replace(settings, workers=workers),
            LoadtestOptions(
                recipients=recipients,
                workers=workers,
                channel=channel,
                provider_latency_ms=latency,
                rate_limit=rate or None,
                progress=False,
            ),
        )
        pred = report["prediction"]
        row = {
            "recipients": recipients,
            "channel": channel,
            "accepted": report["accepted"],
            "workers": workers,
            "latency_ms": latency,
            "rate_limit": rate or None,
            "bottleneck": pred["bottleneck"],
            "predicted_s": pred["predicted_s"],
            "actual_s": pred["actual_s"],
            "error_pct": pred["error_pct"],
            "mean_rate": report["throughput"]["mean"],
            "peak_1s": report["provider"]["peak_1s"],
            "lost": report["lost"],
            "duplicates": report["duplicates"],
            "cpu_us_per_message": report["cpu"]["us_per_message"],
            "speed_factor": pred["speed_factor"],
            "speed_factor_after": pred["speed_factor_after"],
        }
        rows.append(row)
        if not quiet:
            print(f"  {channel:<5} {recipients:>9,} rcpt {workers} w {latency:>5g} ms limit {rate or '-':>5} | "
                  f"{row['bottleneck']:<15} predicted {row['predicted_s']:7.2f} s actual {row['actual_s']:7.2f} s "
                  f"error {row['error_pct']:+6.1f}% | {row['mean_rate']:>7,.0f} msg/s peak {row['peak_1s']:,} "
                  f"lost {row['lost']} dup {row['duplicates']} | speed {row['speed_factor']:.2f}/"
                  f"{row['speed_factor_after']:.2f}", flush=True)  # fmt: skip
    return rows


def _derive(rows: int) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench_derive.main(["--rows", str(rows)])
    return out.getvalue()


def _planner(rows: int, naive_rows: int) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench_planner.main(["--rows", str(rows), "--naive-rows", str(min(naive_rows, rows))])
    return out.getvalue()


def run_bench(
    settings: Settings,
    *,
    messages: int,
    workers: int,
    raw_seconds: float = 10.0,
    planner_rows: int = 200_000,
    naive_rows: int = 50_000,
    out_dir: Path | None = None,
    as_json: bool = False,
    prediction: bool = False,
    derive_rows: int = 0,
) -> int:
    def say(*parts: object) -> None:
        if not as_json:
            print(*parts, flush=True)

    settings = replace(settings, workers=workers)
    say(f"dispatch bench: {workers} worker processes x {settings.send_concurrency} in flight, {messages:,} messages")
    with LocalCluster(settings, workers=0) as cluster:

        def measure_raw() -> dict[str, Any]:
            asyncio.run(_reset(cluster.mock_url))  # a fresh ledger, as the pipeline gets
            raw = raw_ceiling(
                cluster.mock_url,
                account_sid=settings.sms_account_sid,
                token=settings.sms_auth_token.reveal(),
                processes=workers,
                concurrency=settings.send_concurrency,
                seconds=raw_seconds,
            )
            lat = raw["latency_ms"]
            cpu = raw["cpu_us_per_message"]
            say(f"    {raw['rate']:>10,.0f} msg/s   ({raw['messages']:,} in {raw_seconds:g} s, errors {raw['errors']}; "
                f"latency p50 {lat['p50']} ms p95 {lat['p95']} ms p99 {lat['p99']} ms; "
                f"CPU us/msg: clients {cpu['clients']}, mock {cpu['mock']})")  # fmt: skip
            asyncio.run(_reset(cluster.mock_url))
            return raw

        say(f"(a) raw ceiling: bare aiohttp clients -> mock {cluster.mock_url}, {raw_seconds:g} s ...")
        raw = measure_raw()
        say("(b) full pipeline: dispatch loadtest (dedup, rate-limit step, retries, tracking, metrics) ...")
        report = run_loadtest(
            settings,
            LoadtestOptions(recipients=messages, workers=workers, out_dir=out_dir, progress=not as_json),
            cluster=cluster,
        )
        say(f"(c) raw ceiling again, right after the pipeline (the machine's speed drifts), {raw_seconds:g} s ...")
        raw_after = measure_raw()
    thr = report["throughput"]
    # the baseline over the pipeline's run: the mean of the raw ceilings just before and just after it
    baseline = (raw["rate"] + raw_after["rate"]) / 2
    ratio_mean = thr["mean"] / baseline if baseline else 0.0
    ratio_sustained = thr["sustained"] / baseline if baseline else 0.0
    say(f"    {thr['mean']:>10,.0f} msg/s mean, {thr['sustained']:,.0f} msg/s sustained (median 1-s) over "
        f"{report['sent']:,} messages in {report['prediction']['actual_s']:.1f} s")  # fmt: skip
    say(f"    lost {report['lost']}, duplicates {report['duplicates']}, retries {report['retries']}, "
        f"latency p50/p95/p99 {report['latency_ms']['p50']}/{report['latency_ms']['p95']}/"
        f"{report['latency_ms']['p99']} ms; predicted {report['prediction']['predicted_s']:.1f} s")  # fmt: skip
    say(f"    CPU us/msg: {report['cpu']['us_per_message']}")
    say(f"ratio pipeline/raw: {ratio_mean:.2f} (mean), {ratio_sustained:.2f} (sustained) against {baseline:,.0f} "
        f"msg/s, the mean of (a) and (c); mean against (a) alone {thr['mean'] / max(raw['rate'], 1):.2f}, "
        f"against (c) alone {thr['mean'] / max(raw_after['rate'], 1):.2f}   target >= 0.70")  # fmt: skip
    say(f"report {report['json_file']}\nchart  {report['chart_file']}")
    planner = ""
    if planner_rows > 0:
        say(f"planner benchmark (loadtest.bench_planner --rows {planner_rows} --naive-rows {naive_rows}):")
        planner = _planner(planner_rows, naive_rows)
        say(planner.rstrip())
    derive = ""
    if derive_rows > 0:
        say(f"derived-audience benchmark (loadtest.bench_derive --rows {derive_rows}):")
        derive = _derive(derive_rows)
        say(derive.rstrip())
    matrix: list[dict[str, Any]] = []
    if prediction:
        say(f"prediction matrix (DISPATCH_CPU_PER_MESSAGE_US={settings.cpu_per_message_us:g}):")
        matrix = prediction_matrix(settings, quiet=as_json)
        errors = [abs(row["error_pct"]) for row in matrix]
        say(f"  worst |error| {max(errors):.1f}%   target <= 10%")
    if as_json:
        summary = {
            "prediction": matrix,
            "raw": raw,
            "raw_after": raw_after,
            "raw_baseline_rate": round(baseline, 1),
            "pipeline": {k: v for k, v in report.items() if k not in {"samples", "provider_per_second"}},
            "ratio_mean": round(ratio_mean, 3),
            "ratio_sustained": round(ratio_sustained, 3),
            "planner": planner,
            "derive": derive,
        }
        print(orjson.dumps(summary).decode())
    return 0 if report["ok"] else 1


async def _reset(url: str) -> None:
    async with aiohttp.ClientSession() as session, session.post(f"{url}/_mock/reset") as response:
        response.raise_for_status()


def main(argv: list[str] | None = None) -> int:
    """``python -m loadtest.bench`` is ``dispatch bench`` (one parser, in loadtest.commands)."""
    from dispatch.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
