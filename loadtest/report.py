"""Figures of a load test: percentiles, Prometheus histogram scraping, per-second series, text.

Latency comes from the workers' ``dispatch_send_latency_seconds`` histograms (cumulative buckets,
summed over workers and label sets); a percentile is read from buckets the way PromQL's
``histogram_quantile`` does it (linear interpolation inside the bucket that holds the rank), so
it is only as precise as the bucket bounds. Raw samples (the bench's bare client) use
:func:`percentile` on the values themselves.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LATENCY_METRIC",
    "OWN_PACKAGES",
    "Buckets",
    "Sample",
    "bucket_percentile",
    "diff_buckets",
    "format_report",
    "parse_histogram",
    "percentile",
    "sum_buckets",
    "summarize_profile",
]

#: The workers' provider-latency histogram (see ``monitoring.metrics``).
LATENCY_METRIC = "dispatch_send_latency_seconds"

#: Cumulative histogram: sorted ``(upper bound, count <= bound)``, the last bound ``inf``.
Buckets = list[tuple[float, float]]

_BUCKET_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)_bucket\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)")
_LE = re.compile(r'(?:^|,)le="(?P<le>[^"]+)"')
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>[^()]*?)(?::\d+)?\)$")
#: Prefixes of absolute paths in front of a module path (site-packages, the standard library).
_PATH_PREFIX = re.compile(r"^.*(?:site-packages/|/python3\.\d+/)")
#: The project's own packages: the "ours" view of a profile.
OWN_PACKAGES = frozenset({"dispatch", "channels", "ratelimit", "monitoring", "loadtest"})


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of raw values, interpolating linearly between closest ranks."""
    if not values:
        return math.nan
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def bucket_percentile(buckets: Buckets, q: float) -> float:
    """``histogram_quantile(q, ...)`` over cumulative buckets; NaN without observations."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    total = buckets[-1][1]
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > previous_count:
            if math.isinf(bound):
                return previous_bound  # PromQL answers the highest finite bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    return previous_bound


def parse_histogram(text: str, name: str = LATENCY_METRIC) -> Buckets:
    """Cumulative buckets of metric ``name`` in a Prometheus text exposition, summed over series."""
    by_bound: dict[float, float] = {}
    for line in text.splitlines():
        match = _BUCKET_LINE.match(line)
        if match is None or match["name"] != name:
            continue
        le = _LE.search(match["labels"])
        if le is None:
            continue
        bound = float(le["le"])  # "+Inf" parses as inf
        by_bound[bound] = by_bound.get(bound, 0.0) + float(match["value"])
    return sorted(by_bound.items())


def sum_buckets(parts: Iterable[Buckets]) -> Buckets:
    """Add histograms with the same bounds (one per worker)."""
    total: dict[float, float] = {}
    for buckets in parts:
        for bound, count in buckets:
            total[bound] = total.get(bound, 0.0) + count
    return sorted(total.items())


def diff_buckets(now: Buckets, before: Buckets) -> Buckets:
    """Observations between two scrapes of the same histogram (a counter never goes down)."""
    earlier = dict(before)
    return [(bound, max(0.0, count - earlier.get(bound, 0.0))) for bound, count in now]


def _frame(raw: str) -> tuple[str, str]:
    """(``function (file)``, package) of one py-spy frame ``function (path:line)``."""
    match = _FRAME.match(raw.strip())
    if match is None:
        return raw.strip(), "?"
    path = match["path"]
    module = _PATH_PREFIX.sub("", path)
    for own in OWN_PACKAGES:  # an absolute path into this repository
        if f"/{own}/" in module:
            module = module[module.index(f"/{own}/") + 1 :]
    return f"{match['func']} ({module})", module.split("/", 1)[0].removesuffix(".py")


def summarize_profile(collapsed: str, top: int = 15) -> dict[str, Any]:
    """Hot spots of a py-spy ``--format raw`` (collapsed stacks) profile.

    ``self``: share of samples whose innermost frame is the function (a Python frame that calls
    into C, such as uvloop's loop in ``Thread.run``, holds the C time too); ``inclusive``: share of
    samples with the function anywhere on the stack; ``ours``: the inclusive view restricted to
    this project's packages; ``packages``: by top-level package or module (``dispatch``,
    ``aiohttp``, ``redis``, ``asyncio``...), counted once per sample. Idle time is not sampled.
    """
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    ours: dict[str, int] = {}
    packages: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(raw) for raw in stack.split(";") if raw.strip()]
        if not frames:
            continue
        leaf = frames[-1][0]
        own[leaf] = own.get(leaf, 0) + count
        for name, package in set(frames):
            inclusive[name] = inclusive.get(name, 0) + count
            if package in OWN_PACKAGES:
                ours[name] = ours.get(name, 0) + count
        for package in {package for _, package in frames}:
            packages[package] = packages.get(package, 0) + count

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [(name, round(n / total, 4)) for name, n in best] if total else []

    return {
        "samples": total,
        "self": ranked(own),
        "inclusive": ranked(inclusive),
        "ours": ranked(ours),
        "packages": ranked(packages),
    }


@dataclass(frozen=True, slots=True)
class Sample:
    """One second of a load test."""

    #: Seconds since the campaign started.
    t: float
    #: Messages with a final outcome so far (the campaign counters).
    done: int
    #: Messages sent so far (the campaign's ``sent`` counter): the cumulative curve of the chart.
    sent: int
    #: Messages per second the pipeline finished in this interval.
    rate: float
    #: Messages the provider accepted in this wall-clock second (its own ledger).
    provider_rate: int
    #: Provider-call latency percentiles (ms) of the calls in this interval; NaN if none.
    p50_ms: float
    p95_ms: float
    p99_ms: float
    retries: int

    def as_dict(self) -> dict[str, Any]:
        def ms(value: float) -> float | None:
            return None if math.isnan(value) else round(value, 2)

        return {
            "t": round(self.t, 3),
            "done": self.done,
            "sent": self.sent,
            "rate": round(self.rate, 1),
            "provider_rate": self.provider_rate,
            "p50_ms": ms(self.p50_ms),
            "p95_ms": ms(self.p95_ms),
            "p99_ms": ms(self.p99_ms),
            "retries": self.retries,
        }


def format_report(report: Mapping[str, Any]) -> str:
    """The human summary of a load-test report (the JSON has every figure)."""
    lat = report["latency_ms"]
    thr = report["throughput"]
    pred = report["prediction"]
    prov = report["provider"]
    limit = prov["rate_limit"]
    limit_text = f"limit {limit:,.0f}/s" if limit else "no limit"

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f}"

    lines = [
        f"campaign    {report['campaign_id']} ({report['channel']}, {report['workers']} workers)",
        f"audience    {report['recipients']:,} rows, {report['accepted']:,} accepted",
        f"sent        {report['sent']:,}   failed {report['failed']:,}   retries {report['retries']:,}",
        f"provider    accepted {prov['accepted']:,} (unique {prov['unique']:,}), replays {prov['replays']:,}",
        f"lost        {report['lost']:,}   duplicates {report['duplicates']:,}",
        f"throughput  mean {thr['mean']:,.0f} msg/s, sustained (median 1-s) {thr['sustained']:,.0f} msg/s",
        f"latency     p50 {ms(lat['p50'])} ms  p95 {ms(lat['p95'])} ms  p99 {ms(lat['p99'])} ms",
        f"duration    predicted {pred['predicted_s']:.2f} s ({pred['bottleneck']}), "
        f"actual {pred['actual_s']:.2f} s, error {pred['error_pct']:+.1f}% "
        f"(machine speed factor {pred.get('speed_factor', 1.0):.2f} at plan, "
        f"{pred.get('speed_factor_after', 1.0):.2f} after)",
        f"peak 1-s    {prov['peak_1s']:,} msg/s at the provider ({limit_text})",
    ]
    cpu = report.get("cpu")
    if cpu:
        per = ", ".join(f"{k} {v:,.0f}" for k, v in cpu["us_per_message"].items() if v is not None)
        lines.append(f"cpu         us per message: {per}")
    for name, profile in (report.get("profile") or {}).items():
        packages = ", ".join(f"{pkg} {share:.0%}" for pkg, share in profile["packages"][:6])
        lines.append(f"profile     {name}: {profile['samples']:,} samples; by package {packages}")
        for func, share in profile["self"][:8]:
            lines.append(f"              {share:6.1%} self  {func}")
    if report.get("json_file"):
        lines.append(f"report      {report['json_file']}")
    if report.get("chart_file"):
        lines.append(f"chart       {report['chart_file']}")
    lines.append("OK: every accepted message reached the provider exactly once" if report["ok"] else "FAILED")
    return "\n".join(lines)
