"""Send-window prediction: how long a campaign will take, and whether it fits its deadline.

The send rate is the smallest of three ceilings:

* the rate limits: the provider account's limit in cost units per second (SMS: segments)
  divided by the average cost of one message, and the campaign's own cap;
* the workers' in-flight capacity: ``processes x in-flight per process / time a slot is held``
  (Little's law), a slot being held for the provider latency plus the time its process takes to
  handle the answers that arrive with its own (:data:`SLOT_CPU_SHARE`);
* the CPU ceiling of the pipeline itself: ``cores / CPU seconds per message`` over everything that
  runs on the machine (workers, Redis, and the mock provider when it is local), and at most
  ``processes / worker CPU seconds per message`` since one worker process uses one core; less
  the batch tails (each running batch idles its slot for one provider latency at its end).
  The CPU costs are *effective* costs: cores divided by the throughput measured when CPU-bound
  (``dispatch bench --prediction``), so they include the time no process could use; they grow
  slowly with the campaign's size (:func:`size_factor`: SMS +9% per tenfold beyond 100k), and
  they follow the machine's measured speed (``Capacity.speed_factor``, :mod:`dispatch.plan.calibration`).

Batches held back by quiet hours start no earlier than their ``not_before``; the prediction walks
the batches in time order, so gaps in the schedule show up in the finish time.

The prediction is a range as well as a point (``finish_low`` .. ``finish_high``, meant as the 10th
to 90th percentile): the same walk at the ends of the speed factor's stated spread
(``Capacity.speed_spread``: from the deployment's own send evidence, :mod:`dispatch.plan.evidence`,
or the probes' range) and of the machine's load (``Capacity.busy_cores``: CPU other processes used
while planning, ``B`` cores of ``C``; the scheduler shares the cores in proportion to demand, so a
CPU-bound send gets ``C x C / (C + B)`` of them: the point assumes the load stays as measured, the
slow end that it grows by half, :data:`BUSY_SLOW_GROWTH`, the fast end that it goes away),
and never narrower than :data:`MIN_RANGE` below and :data:`MIN_RANGE_HIGH` above the point
(start-up jitter; a rate limit is never beaten, but a send near it often falls short of it). The
verdict reads the range: ``fits`` when even its slow end is before the deadline, ``at_risk`` when
the deadline falls inside it, ``does_not_fit`` when even its fast end is after it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Final, Literal

from channels import default_registry

__all__ = [
    "MIN_RANGE",
    "MIN_RANGE_HIGH",
    "Capacity",
    "Prediction",
    "Verdict",
    "cpu_costs",
    "predict",
    "size_factor",
    "speed_shift",
]

Verdict = Literal["fits", "at_risk", "does_not_fit", "no_deadline"]

#: Effective CPU cost of one SMS through the full send path (seconds) over every process of the
#: machine (workers, Redis, the local mock provider): cores / CPU-bound throughput measured by
#: ``dispatch bench --prediction`` on a 2-core machine (5,330-5,984 msg/s with 2 workers in four
#: runs; the processes reported 327 us, the rest is time no process could use).
DEFAULT_CPU_PER_MESSAGE_S = 352e-6
#: The same for one worker process alone (5,124 and 5,355 msg/s with 1 worker; 160 us reported).
DEFAULT_WORKER_CPU_PER_MESSAGE_S = 190e-6
#: Batch APIs carry many recipients per request (SendGrid: 1,000), so a recipient costs far less:
#: (all local processes, one worker) in seconds per recipient, measured the same way (email with
#: 2 workers: 84-87k recipients/s at 300k, 77-80k at 1M; workers reported 14 us, all 21 us).
BATCH_API_CPU_S: Final = (20.5e-6, 12.0e-6)
#: Campaign size the CPU costs above stand for, and the growth of the cost per tenfold size
#: beyond it (see :func:`size_factor`): per-message APIs from the SMS runs at 100k and 3M
#: messages, batch APIs from the email runs at 300k and 1M recipients (the mock's and Redis's
#: per-recipient state weighs more there).
SIZE_REFERENCE = 100_000
PER_MESSAGE_API_SLOPE: Final = 0.09
BATCH_API_SLOPE: Final = 0.24
#: The figures above per channel, by the request shape of its provider in the registry (a channel
#: whose provider has a batch API: email).
_BATCH_CHANNELS: Final = frozenset(default_registry().batch_limits())
BATCH_CHANNEL_CPU_S: Final[dict[str, tuple[float, float]]] = dict.fromkeys(_BATCH_CHANNELS, BATCH_API_CPU_S)
SIZE_SLOPE: Final[dict[str, float]] = {
    name: BATCH_API_SLOPE if name in _BATCH_CHANNELS else PER_MESSAGE_API_SLOPE
    for name in default_registry().channel_names(sendable=True)
}
#: When latency-bound, a slot is held for the provider latency plus its wait while the process
#: handles the other answers that came back with its own: this share of all its slots' messages'
#: CPU time (machine-wide cost x processes per core). 0.4 fits 1 worker at 200 ms and 2 at 500 ms
#: within 2% both on a normal day and on one 2.7x slower (a constant share of 0.93 did not).
SLOT_CPU_SHARE = 0.4


def cpu_costs(channel: str, cpu_per_message_s: float) -> tuple[float, float]:
    """(machine-wide, per-worker) CPU seconds per message of ``channel``."""
    if channel in BATCH_CHANNEL_CPU_S:
        return BATCH_CHANNEL_CPU_S[channel]
    share = DEFAULT_WORKER_CPU_PER_MESSAGE_S / DEFAULT_CPU_PER_MESSAGE_S
    return cpu_per_message_s, cpu_per_message_s * share


#: Least relative width of the predicted range below and above the point (rate-capped 20k SMS at
#: 2,000/s on a busy 2-core machine, five runs: 2% faster to 9% slower than the cap's 9.7 s).
MIN_RANGE = 0.03
MIN_RANGE_HIGH = 0.12
#: How much the other processes' load may grow during the send at the slow end of the range.
BUSY_SLOW_GROWTH = 1.5
#: Fixed start-up cost: workers fetching the first batches, connections opening (warm workers).
STARTUP_S = 0.2


@dataclass(frozen=True, kw_only=True)
class Capacity:
    processes: int
    inflight_per_process: int
    latency_s: float
    provider_rate: float | None  # cost units per second, None = unlimited
    campaign_rate: float | None  # messages per second, None = no cap
    cpu_per_message_s: float = DEFAULT_CPU_PER_MESSAGE_S
    worker_cpu_per_message_s: float = DEFAULT_WORKER_CPU_PER_MESSAGE_S
    cores: int = 0  # 0 = this machine's
    #: Messages of all the batches running at once (processes x threads x batch size); 0 = unknown.
    batch_messages_in_flight: int = 0
    #: The channel (its CPU cost's growth with the campaign size, :data:`SIZE_SLOPE`); None: one
    #: whose provider has a per-message API.
    channel: str | None = None
    #: CPU time the work takes now over the time it took when the costs were measured
    #: (:mod:`dispatch.plan.calibration`): both CPU costs are multiplied by it.
    speed_factor: float = 1.0
    #: Relative spread (10th-90th percentile half-width) of ``speed_factor`` (0: not stated).
    speed_spread: float = 0.0
    #: Cores' worth of CPU other processes used when the plan was made (0: idle or not measured).
    busy_cores: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Prediction:
    messages: int
    cost_units: int
    rate: float
    bottleneck: Literal["provider_rate", "campaign_rate", "worker_capacity", "cpu"]
    duration_s: float
    start: float
    finish: float
    deadline: float | None
    verdict: Verdict
    required_rate: float | None
    advice: str
    #: The machine-speed factor the CPU ceiling was scaled by (1.0: not measured).
    speed_factor: float = 1.0
    #: The range of the finish (10th-90th percentile, epoch seconds) and of the duration.
    finish_low: float = 0.0
    finish_high: float = 0.0
    duration_low_s: float = 0.0
    duration_high_s: float = 0.0
    #: Where the speed factor came from (``evidence``: this deployment's sends; ``workers``,
    #: ``local``: the synthetic probe; ``off``: not measured) and its stated relative spread.
    speed_source: str = "off"
    speed_spread: float = 0.0
    busy_cores: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def size_factor(messages: int, channel: str | None = None) -> float:
    """How much more CPU a message costs in a campaign of ``messages`` than at
    :data:`SIZE_REFERENCE`: Redis, the workers and the provider keep more state as a campaign
    grows (measured: SMS 5,330-5,984 msg/s at 100k, 5,107-5,193 msg/s at 3M)."""
    if messages <= SIZE_REFERENCE:
        return 1.0
    slope = SIZE_SLOPE.get(channel, PER_MESSAGE_API_SLOPE) if channel is not None else PER_MESSAGE_API_SLOPE
    return 1.0 + slope * math.log10(messages / SIZE_REFERENCE)


def _ceilings(capacity: Capacity, avg_cost: float, messages: int) -> dict[str, float]:
    full = capacity.cores or os.cpu_count() or 1
    # the cores' share a CPU-bound send gets beside other load (the scheduler shares by demand)
    cores = full * full / (full + max(0.0, capacity.busy_cores))
    scale = size_factor(messages, capacity.channel) * capacity.speed_factor
    machine_cpu = capacity.cpu_per_message_s * scale
    cpu = min(cores / machine_cpu, capacity.processes / (capacity.worker_cpu_per_message_s * scale))
    slots = capacity.inflight_per_process
    # Little's law over every slot: each holds a message for the latency plus its wait (above)
    slot_s = capacity.latency_s + SLOT_CPU_SHARE * slots * machine_cpu * capacity.processes / cores
    ceilings = {
        "worker_capacity": capacity.processes * slots / max(slot_s, 1e-6),
        "cpu": _with_batch_tails(cpu, capacity),
    }
    if capacity.provider_rate:
        ceilings["provider_rate"] = capacity.provider_rate / max(avg_cost, 1.0)
    if capacity.campaign_rate:
        ceilings["campaign_rate"] = capacity.campaign_rate
    return ceilings


def _bottleneck(capacity: Capacity, avg_cost: float, messages: int) -> tuple[str, float]:
    """The lowest ceiling: its name and rate (messages/s)."""
    ceilings = _ceilings(capacity, avg_cost, messages)
    name = min(ceilings, key=lambda k: ceilings[k])
    return name, ceilings[name]


def _with_batch_tails(rate: float, capacity: Capacity) -> float:
    """A CPU-bound rate less the batch tails: a batch's last responses keep its worker slot idle
    for about one provider latency, once per batch of each slot."""
    if capacity.batch_messages_in_flight <= 0 or capacity.latency_s <= 0:
        return rate
    return 1.0 / (1.0 / rate + capacity.latency_s / capacity.batch_messages_in_flight)


def _finish(schedule: Sequence[tuple[float, int]], start: float, rate: float) -> float:
    clock = start + STARTUP_S
    for not_before, n in sorted(schedule):
        clock = max(clock, not_before) + n / rate
    return clock


def speed_shift(*, schedule: Sequence[tuple[float, int]], cost_units: int, capacity: Capacity, slower: float) -> float:
    """Seconds later the campaign would finish on a machine ``slower`` times slower than
    ``capacity`` assumes (0 when rate limits bind either way): whether measuring the speed matters."""
    messages = sum(n for _, n in schedule)
    if not messages:
        return 0.0
    avg_cost = cost_units / messages
    now, slow = (
        _bottleneck(replace(capacity, speed_factor=capacity.speed_factor * k), avg_cost, messages)[1]
        for k in (1.0, slower)
    )
    return _finish(schedule, 0.0, slow) - _finish(schedule, 0.0, now)


def _ends(capacity: Capacity) -> tuple[Capacity, Capacity, Capacity]:
    """The capacity of the point estimate, of the range's fast end and of its slow end."""
    spread = max(0.0, capacity.speed_spread)
    busy = max(0.0, capacity.busy_cores)
    point = capacity
    fast = replace(capacity, speed_factor=capacity.speed_factor * max(0.1, 1.0 - spread), busy_cores=0.0)
    slow = replace(capacity, speed_factor=capacity.speed_factor * (1.0 + spread), busy_cores=busy * BUSY_SLOW_GROWTH)
    return point, fast, slow


def predict(
    *,
    schedule: Sequence[tuple[float, int]],
    cost_units: int,
    capacity: Capacity,
    start: float,
    deadline: float | None,
    speed_source: str = "off",
) -> Prediction:
    """Predict a campaign's send window: the point estimate and its range (module docstring).

    ``schedule`` is ``(not_before, messages)`` per batch; ``cost_units`` the total rate-limit cost
    of all messages (SMS segments).
    """
    messages = sum(n for _, n in schedule)
    avg_cost = cost_units / messages if messages else 1.0
    point, fast, slow = _ends(capacity)
    bottleneck, rate = _bottleneck(point, avg_cost, messages)
    finish = _finish(schedule, start, rate) if messages else start
    duration = finish - start
    if messages:
        low = _finish(schedule, start, _bottleneck(fast, avg_cost, messages)[1])
        high = _finish(schedule, start, _bottleneck(slow, avg_cost, messages)[1])
    else:
        low = high = start
    low = min(low, start + duration * (1.0 - MIN_RANGE))
    high = max(high, start + duration * (1.0 + MIN_RANGE_HIGH))
    required: float | None = None
    verdict: Verdict
    if deadline is None:
        verdict = "no_deadline"
        advice = "no deadline set"
    elif high <= deadline:
        verdict = "fits"
        advice = f"fits with {deadline - finish:.0f}s to spare ({deadline - high:.0f}s at the slow end of the range)"
    else:
        verdict = "at_risk" if low <= deadline else "does_not_fit"
        window = deadline - start - STARTUP_S
        required = messages / window if window > 0 else None
        if verdict == "at_risk":
            at_point = (
                f"fits by {deadline - finish:.0f}s" if finish <= deadline else f"misses it by {finish - deadline:.0f}s"
            )
            parts = [
                f"the deadline is inside the predicted range ({low - start:.0f}-{high - start:.0f}s): "
                f"{at_point} at the point estimate"
            ]
        else:
            parts = [f"finishes {finish - deadline:.0f}s after the deadline ({low - deadline:.0f}s at the fast end)"]
        if required is not None:
            parts.append(f"needs {required:.1f} msg/s where {rate:.1f} msg/s is possible ({bottleneck})")
        parts.append(f"or a deadline at least {high - deadline:.0f}s later")
        if window > 0:
            parts.append(f"or an audience of at most {int(window * rate)}")
        advice = "; ".join(parts)
    return Prediction(
        messages=messages,
        cost_units=cost_units,
        rate=rate,
        bottleneck=bottleneck,  # type: ignore[arg-type]
        duration_s=duration,
        start=start,
        finish=finish,
        deadline=deadline,
        verdict=verdict,
        required_rate=required,
        advice=advice,
        speed_factor=round(capacity.speed_factor, 3),
        finish_low=low,
        finish_high=high,
        duration_low_s=low - start,
        duration_high_s=high - start,
        speed_source=speed_source,
        speed_spread=round(capacity.speed_spread, 3),
        busy_cores=round(capacity.busy_cores, 2),
    )
