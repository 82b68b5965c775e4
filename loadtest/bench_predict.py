"""``dispatch bench --matrix``: how well the plan and the live ETA predict a send (issue 21).

    .venv/bin/dispatch bench --matrix                        # every case, quiet machine
    .venv/bin/dispatch bench --matrix --busy 1               # the same beside one busy loop
    .venv/bin/dispatch bench --matrix --cases sms-20k,capped # a subset

Each case is one ``dispatch loadtest`` on its own deployment (the deployment's home, so the send
evidence of earlier runs and cases, :mod:`dispatch.plan.evidence`, is there for the next plan). It
prints the plan's point estimate and range (p10-p90), the actual duration, the point's error, whether
the actual fell inside the range, and the live ETA's error once 10% of the campaign is settled
(``eta10``: the ETA ``dispatch status`` showed then, as a finish time, against the actual finish;
in % of the actual duration, and of the time that was left then).

``--warmup N`` first sends N messages of each channel the chosen cases use (email: 10 N; not
reported as a case), so the first case's plan has its deployment's evidence rather than a synthetic probe, as a
deployment that has sent before has. ``--busy N`` starts N busy loops (``python -c 'while True:
pass'``) before the first send and stops them after the last: the busy variant of the matrix.

Targets (issue 21): quiet machine, the point within +-10%; busy machine, the actual inside the
range; the live ETA within 5% once 10% is sent. Not a test: a benchmark that prints figures.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Final

import orjson

from dispatch.config import Settings
from dispatch.send.control import CampaignStatus
from loadtest.runner import LoadtestError, LoadtestOptions, run_loadtest

__all__ = ["CASES", "Case", "busy_loops", "parse_cases", "run_matrix"]


@dataclass(frozen=True, kw_only=True)
class Case:
    recipients: int
    channel: str = "sms"
    workers: int = 2
    latency_ms: float = 0.0
    #: Provider account limit (SMS: segments/s; email: the campaign's cap), 0 = none.
    rate_limit: float = 0.0
    what: str = ""


#: The matrix of issue 21: sizes of the CPU-bound path, the batch API, a rate-capped and a
#: latency-bound case.
CASES: Final[dict[str, Case]] = {
    "sms-20k": Case(recipients=20_000, what="CPU-bound, small"),
    "sms-200k": Case(recipients=200_000, what="CPU-bound"),
    "sms-1m": Case(recipients=1_000_000, what="CPU-bound, large"),
    "email-300k": Case(recipients=300_000, channel="email", what="batch API, CPU-bound"),
    "capped": Case(recipients=20_000, rate_limit=2_000.0, what="rate-capped: 10 s at 2,000 segments/s"),
    "latency": Case(recipients=30_000, workers=1, latency_ms=200.0, what="latency-bound: 1 worker, 200 ms"),
}
#: Warm-up size per channel, in multiples of ``--warmup``: a batch API sends a recipient for a
#: tenth of the CPU, and the evidence needs some seconds of steady sending (two-second windows).
WARMUP_SCALE: Final[dict[str, int]] = {"email": 10}
#: Shares of the campaign settled when the live ETA is read (the target is for the first).
ETA_AT: Final = (0.10, 0.25, 0.50)


def parse_cases(text: str | None) -> list[str]:
    """``--cases``: comma-separated names of :data:`CASES` (None: all, in order)."""
    if not text:
        return list(CASES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CASES]
    if unknown or not names:
        raise LoadtestError(
            f"--cases: unknown case(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(CASES)}"
        )
    return names


@contextmanager
def busy_loops(n: int) -> Iterator[list[int]]:
    """``n`` busy-loop processes for the duration (their pids); stopped (by pid) on exit."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL) for _ in range(n)]
    try:
        yield [p.pid for p in loops]
    finally:
        for p in loops:
            p.terminate()
        for p in loops:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class _EtaAt:
    """The live ETA the first time ``share`` of the campaign is settled."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.t: float | None = None
        self.eta_s: float | None = None
        self.source = "none"

    def __call__(self, t: float, status: CampaignStatus) -> None:
        if self.t is not None or status.accepted <= 0 or status.done < self.share * status.accepted:
            return
        if status.eta_s is None and not status.complete:
            return  # no estimate yet: the next poll
        self.t, self.eta_s, self.source = t, status.eta_s or 0.0, status.eta_source


def _pct(value: float, of: float) -> float | None:
    return round(value / of * 100, 1) if of > 0 else None


def run_case(settings: Settings, name: str, case: Case) -> dict[str, Any]:
    etas = [_EtaAt(share) for share in ETA_AT]

    def on_status(t: float, status: CampaignStatus) -> None:
        for eta in etas:
            eta(t, status)

    report = run_loadtest(
        replace(settings, workers=case.workers),
        LoadtestOptions(
            recipients=case.recipients,
            workers=case.workers,
            channel=case.channel,
            provider_latency_ms=case.latency_ms,
            rate_limit=case.rate_limit or None,
            progress=False,
            on_status=on_status,
        ),
    )
    pred = report["prediction"]
    actual = float(pred["actual_s"])
    low, high = float(pred["predicted_low_s"]), float(pred["predicted_high_s"])
    row: dict[str, Any] = {
        "case": name,
        "channel": case.channel,
        "recipients": case.recipients,
        "workers": case.workers,
        "latency_ms": case.latency_ms,
        "rate_limit": case.rate_limit or None,
        "bottleneck": pred["bottleneck"],
        "predicted_s": pred["predicted_s"],
        "range_s": [low, high],
        "actual_s": actual,
        "error_pct": pred["error_pct"],
        "inside_range": low <= actual <= high,
        "speed_source": pred["speed_source"],
        "speed_factor": pred["speed_factor"],
        "speed_spread": pred["speed_spread"],
        "busy_cores_at_plan": pred["busy_cores"],
        "ok": report["ok"],
        "lost": report["lost"],
        "duplicates": report["duplicates"],
        "mean_rate": report["throughput"]["mean"],
        "cpu_us_per_message": report["cpu"]["us_per_message"],
        "json_file": report["json_file"],
    }
    for eta in etas:
        key = f"eta{round(eta.share * 100)}"
        row[f"{key}_at_s"] = None if eta.t is None else round(eta.t, 2)
        row[f"{key}_source"] = eta.source
        row[f"{key}_error_pct"] = row[f"{key}_error_of_remaining_pct"] = None
        if eta.t is not None and eta.eta_s is not None:
            miss = eta.t + eta.eta_s - actual  # > 0: the ETA said later than it ended
            row[f"{key}_error_pct"] = _pct(miss, actual)
            row[f"{key}_error_of_remaining_pct"] = _pct(miss, actual - eta.t)
    return row


def _line(row: dict[str, Any]) -> str:
    low, high = row["range_s"]
    eta = "-" if row["eta10_error_pct"] is None else f"{row['eta10_error_pct']:+.1f}% ({row['eta10_source']})"
    later = "/".join(
        "-" if row[f"{k}_error_pct"] is None else f"{row[f'{k}_error_pct']:+.1f}" for k in ("eta25", "eta50")
    )
    eta += f", at 25/50% {later}%"
    return (
        f"  {row['case']:<10} {row['bottleneck']:<15} predicted {row['predicted_s']:8.1f} s "
        f"range {low:7.1f}-{high:<8.1f} actual {row['actual_s']:8.1f} s error {row['error_pct']:+6.1f}% "
        f"{'inside' if row['inside_range'] else 'OUTSIDE'} | eta10 {eta} | speed {row['speed_source']} "
        f"{row['speed_factor']:.2f}+-{row['speed_spread']:.0%} busy {row['busy_cores_at_plan']:.1f} | "
        f"{row['mean_rate']:,.0f} msg/s{'' if row['ok'] else ' NOT OK'}"
    )


def run_matrix(settings: Settings, *, cases: list[str], busy: int = 0, warmup: int = 0, as_json: bool = False) -> int:
    """Run ``cases`` (names of :data:`CASES`) beside ``busy`` busy loops; 0 when every send was ok."""

    def say(text: str) -> None:
        if not as_json:
            print(text, flush=True)

    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    say(f"prediction matrix: {', '.join(cases)}; {busy} busy loop(s); home {settings.home}")
    with busy_loops(busy):
        if warmup > 0:
            for channel in dict.fromkeys(CASES[name].channel for name in cases):
                n = warmup * WARMUP_SCALE.get(channel, 1)
                report = run_loadtest(
                    settings, LoadtestOptions(recipients=n, workers=settings.workers, channel=channel, progress=False)
                )
                say(f"  warm-up    {channel} {n:,}: {report['prediction']['actual_s']:.1f} s (send evidence)")
        for name in cases:
            row = run_case(settings, name, CASES[name])
            row["busy_loops"] = busy
            rows.append(row)
            say(_line(row))
    errors = [abs(r["error_pct"]) for r in rows]
    inside = sum(1 for r in rows if r["inside_range"])
    etas = [abs(r["eta10_error_pct"]) for r in rows if r["eta10_error_pct"] is not None]
    say(
        f"  worst |point error| {max(errors):.1f}% (target <= 10% quiet); actual inside the range in "
        f"{inside}/{len(rows)} (target: all busy); worst |eta10 error| "
        f"{max(etas) if etas else float('nan'):.1f}% (target <= 5%); {time.monotonic() - started:.0f} s in all"
    )
    if as_json:
        print(orjson.dumps({"busy_loops": busy, "warmup": warmup, "cases": rows}).decode())
    return 0 if all(r["ok"] for r in rows) else 1
