"""What this deployment's own recent sends measured: the prediction's first source of costs.

The send itself is the best measurement of the send: a one-second synthetic probe of a shared VM
read the machine 27% slower than it then ran (issue 21). So every worker process folds windows of
its own sends (:class:`dispatch.send.sendstats.SendStats`, one window every two seconds) into
running statistics per channel and provider, kept in Redis (:data:`dispatch.store.keys.evidence`,
one hash of fixed fields per channel and provider: bounded size):

* ``cpu_s``: the worker process's CPU seconds per provider answer;
* ``latency_s``: the provider's mean answer time;
* ``rate``: provider answers per second per worker process, from windows in which the process
  had answers in every heartbeat (busy throughout: a capacity figure, not an idle one);
* ``inflight``: the process's mean concurrency over the window (``rate x latency``, Little's law);
* ``workers``: worker processes that published within :data:`WORKER_LIVE_S`.

Each is an exponentially weighted mean and variance (:data:`WEIGHT` for the newest window; a plain
mean over the first ``1 / WEIGHT`` windows, so the first window does not linger), so old sends
fade and a spread is always at hand. A plan turns them into a speed factor (:func:`evidence_speed`):
the worker CPU per message measured now over the worker CPU per message measured when the
prediction's costs stand for (:data:`REFERENCE_WORKER_CPU_S`), with a stated spread. Only when
there is no recent evidence (:data:`MIN_SAMPLES`, :data:`MAX_AGE_S`) does the planner fall back to
the synthetic probe (:mod:`dispatch.plan.calibration`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import Final

import redis

from channels import default_registry
from dispatch.plan.calibration import FACTOR_RANGE, Speed
from dispatch.store import keys

__all__ = [
    "FIELDS",
    "MAX_AGE_S",
    "MIN_SAMPLES",
    "REFERENCE_WORKER_CPU_S",
    "WEIGHT",
    "Evidence",
    "EvidenceStore",
    "Stat",
    "Window",
    "evidence_speed",
    "provider_of",
]

#: The measured quantities, in the order a window carries them.
FIELDS: Final = ("cpu_s", "latency_s", "rate", "inflight", "workers")
#: Weight of the newest window in the running statistics (a window is ~2 s of one worker's sends:
#: the statistics remember roughly the last 20 windows, some 20-40 s of sending).
WEIGHT = 0.05
#: Windows needed before the statistics are trusted over a probe.
MIN_SAMPLES = 4
#: Evidence older than this (seconds since the last window) is not used: the machine may have changed.
MAX_AGE_S = 86_400.0
#: A worker counts as live this long after its last window.
WORKER_LIVE_S = 30.0
#: How long the statistics are kept after the last window.
KEEP_S = 30 * 86_400
#: Worker-process CPU seconds per message at speed factor 1 (the machine the prediction's cost
#: constants stand for), per-message-API and batch-API channels. SMS: the workers' measured CPU per
#: message over the factor their send's actual throughput implies (2 workers, CPU-bound, 20k-50k
#: SMS, 2026-12-03: 303 us at 1.76, 384 us at 2.16, 367 us at 1.91, i.e. 172-192 us), beside the
#: model's effective worker cost, 190 us (DEFAULT_WORKER_CPU_PER_MESSAGE_S). Email: the workers'
#: 14 us per recipient of 2026-11-26 scaled by the same 185/160 (not validated yet).
REFERENCE_WORKER_CPU_S: Final = (185e-6, 16.2e-6)
#: z of the 10th and 90th percentiles of a normal distribution.
Z90 = 1.2816


def provider_of(channel: str) -> str:
    """The provider that sends ``channel`` in this deployment (the registry's default)."""
    return default_registry().provider_for(channel).name


@dataclass(frozen=True)
class Stat:
    """One measured quantity: exponentially weighted mean and standard deviation, and how many
    windows went into it."""

    mean: float
    std: float
    n: int

    @property
    def relative_spread(self) -> float:
        """Standard deviation over the mean (0 when the mean is 0)."""
        return self.std / self.mean if self.mean > 0 else 0.0


@dataclass(frozen=True, kw_only=True)
class Window:
    """One worker process's measurements over one window of its sends."""

    #: None: the process was mostly waiting (rate cap, latency), so its CPU per answer is no cost figure.
    cpu_s: float | None
    latency_s: float
    #: None: the process was not busy throughout the window, so its rate says nothing of capacity.
    rate: float | None
    inflight: float | None


@dataclass(frozen=True, kw_only=True)
class Evidence:
    channel: str
    provider: str
    stats: dict[str, Stat]
    updated_at: float

    def usable(self, now: float) -> bool:
        """Enough recent windows of the CPU cost to stand for this deployment now."""
        cpu = self.stats.get("cpu_s")
        return cpu is not None and cpu.n >= MIN_SAMPLES and cpu.mean > 0 and now - self.updated_at <= MAX_AGE_S

    def as_dict(self) -> dict[str, object]:
        return {
            "channel": self.channel,
            "provider": self.provider,
            "updated_at": round(self.updated_at, 3),
            **{
                name: {"mean": _round(stat.mean), "std": _round(stat.std), "n": stat.n}
                for name, stat in self.stats.items()
            },
        }


def _round(value: float) -> float:
    return float(f"{value:.4g}")


class EvidenceStore:
    """The running statistics in Redis (application database)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._fold = client.register_script(
            resources.files("dispatch.plan").joinpath("evidence.lua").read_text(encoding="utf-8")
        )

    def record(self, channel: str, provider: str, owner: str, window: Window, *, now: float) -> int:
        """Fold ``window`` of worker ``owner`` into ``channel``/``provider``'s statistics; returns
        the live workers (the ``workers`` statistic gets that count)."""
        values: list[tuple[str, float]] = [("latency_s", window.latency_s)]
        if window.cpu_s is not None:
            values.append(("cpu_s", window.cpu_s))
        if window.rate is not None:
            values.append(("rate", window.rate))
        if window.inflight is not None:
            values.append(("inflight", window.inflight))
        for name, value in values:
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"send evidence {name} must be a finite number >= 0, got {value!r}")
        args: list[str | float] = [f"{now:.3f}", WEIGHT, owner, WORKER_LIVE_S, KEEP_S]
        for name, value in values:
            args += [name, repr(value)]
        return int(self._fold(keys=[keys.evidence(channel, provider), keys.EVIDENCE_WORKERS], args=args))

    def read(self, channel: str, provider: str) -> Evidence | None:
        """The statistics of ``channel``/``provider``, None when no window was ever recorded."""
        raw: dict[bytes, bytes] = self._client.hgetall(keys.evidence(channel, provider))  # type: ignore[assignment]
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        stats: dict[str, Stat] = {}
        for name in FIELDS:
            if f"{name}:n" in fields:
                var = max(0.0, float(fields[f"{name}:var"]))
                stats[name] = Stat(float(fields[f"{name}:mean"]), math.sqrt(var), int(fields[f"{name}:n"]))
        return Evidence(channel=channel, provider=provider, stats=stats, updated_at=float(fields["updated_at"]))

    def clear(self, channel: str, provider: str) -> None:
        self._client.delete(keys.evidence(channel, provider))


def evidence_speed(evidence: Evidence, *, batch_api: bool) -> Speed:
    """The speed factor the evidence measured: the workers' CPU per message now over
    :data:`REFERENCE_WORKER_CPU_S`, with its relative spread (the 10th-90th percentile half-width
    over the mean, from the decayed standard deviation)."""
    cpu = evidence.stats["cpu_s"]
    reference = REFERENCE_WORKER_CPU_S[1 if batch_api else 0]
    low, high = FACTOR_RANGE
    factor = min(high, max(low, cpu.mean / reference))
    return Speed(factor, None, "evidence", cpu.n, spread=Z90 * cpu.relative_spread)
