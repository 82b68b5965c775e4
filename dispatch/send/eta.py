"""The live ETA: when a running campaign ends, re-estimated from its measured rate.

From the first seconds of a send the send itself is the best measurement of the send. The rate is
the least-squares slope of the progress ring's samples (``dispatch.send.control``: messages with
an outcome, one sample a second at most) over the last :data:`ETA_WINDOW_S`, which smooths the
steps a batch-at-a-time counter makes. The remaining work is walked the way the plan walks it
(:func:`dispatch.plan.prediction.predict`): messages due now at that rate, then each group of
batches held back by quiet hours from its ``not_before``; and the campaign's rate cap (``dispatch
rate``, possibly changed since the rate was measured) bounds the rate.

The first seconds of a send are its ramp (workers fetching their first batches, connections
opening): a rate measured over them understates the send, and one measured over a second or two
is noise. So the rate is read only from the first sample at which messages had finished (the flat
start is left out), and over the first :data:`RAMP_S` of progress it moves linearly from the
plan's rate to the measured one (``source`` ``ramp``).

While the campaign waits for a quiet-hours window nothing finishes, so the window's rate says
nothing of the send: the ETA then uses the rate of the last window in which messages finished, else
the plan's rate. When work is due now and nothing finished over the window (a stall), the ETA is
unknown (None) rather than a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["ETA_MIN_SPAN_S", "ETA_WINDOW_S", "RAMP_S", "LiveEta", "live_eta", "window_rate"]

#: Seconds of progress samples the live rate spans (the window ``dispatch status`` calls "last 10 s").
ETA_WINDOW_S = 10.0
#: Shortest span of samples a rate is measured over.
ETA_MIN_SPAN_S = 1.0
#: Seconds of progress over which the ETA's rate moves from the plan's to the measured one (5 s
#: carried a wrong plan into half of a 7-s send's ETAs: +26% at 50% settled).
RAMP_S = 2.0


@dataclass(frozen=True)
class LiveEta:
    """Seconds from now to the end (None: unknown), the rate it assumes (messages/s) and where
    that rate came from."""

    eta_s: float | None
    rate: float | None
    source: Literal["live", "ramp", "before_gap", "plan", "none"]


def window_rate(
    samples: Sequence[tuple[float, int]], now: float, count: int, *, window_s: float = ETA_WINDOW_S
) -> float | None:
    """Messages per second over the ``window_s`` before ``now``: the least-squares slope of the
    samples ``(time, messages done)`` inside the window and ``(now, count)``; None when the points
    span less than :data:`ETA_MIN_SPAN_S`."""
    points = _from_first_progress([(t, n) for t, n in samples if now - window_s <= t < now] + [(now, count)])
    return _slope(points)


def _from_first_progress(points: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """``points`` without the flat start: from the last point before the count first grew."""
    ordered = sorted(points)
    for i in range(1, len(ordered)):
        if ordered[i][1] > ordered[0][1]:
            return ordered[i - 1 :]
    return ordered


def _first_progress(samples: Sequence[tuple[float, int]]) -> float | None:
    """When messages had first finished: the time of the last sample before the count grew."""
    ordered = sorted(samples)
    for i in range(1, len(ordered)):
        if ordered[i][1] > ordered[0][1]:
            return ordered[i - 1][0]
    return None


def _slope(points: Sequence[tuple[float, int]]) -> float | None:
    if len(points) < 2:
        return None
    times = [t for t, _ in points]
    if max(times) - min(times) < ETA_MIN_SPAN_S:
        return None
    mt = sum(times) / len(points)
    mn = sum(n for _, n in points) / len(points)
    var = sum((t - mt) ** 2 for t in times)
    cov = sum((t - mt) * (n - mn) for t, n in points)
    return max(0.0, cov / var) if var > 0 else None


def _before_gap(samples: Sequence[tuple[float, int]], window_s: float) -> float | None:
    """The rate over the ``window_s`` up to the last sample at which messages had finished
    (the end of the last stretch of sending)."""
    ordered = sorted(samples)
    for end in range(len(ordered) - 1, 0, -1):
        t_end, n_end = ordered[end]
        if ordered[end - 1][1] < n_end:
            return _slope([(t, n) for t, n in ordered[: end + 1] if t >= t_end - window_s])
    return None


def live_eta(
    *,
    now: float,
    done: int,
    pending: int,
    samples: Sequence[tuple[float, int]],
    schedule: Sequence[tuple[float, int]] = (),
    rate_cap: float | None = None,
    plan_rate: float | None = None,
    window_s: float = ETA_WINDOW_S,
) -> LiveEta:
    """The ETA of a running campaign at ``now``.

    ``done``: messages with an outcome (what ``samples`` count); ``pending``: messages still to
    send; ``samples``: the progress ring ``(time, done)``; ``schedule``: the plan's groups of
    ``(not_before, recipients)``; ``rate_cap``: the campaign's cap now (messages/s);
    ``plan_rate``: the plan's predicted rate.
    """
    if pending <= 0:
        return LiveEta(0.0, None, "none")
    later = sorted((nb, n) for nb, n in schedule if nb > now and n > 0)
    held = sum(n for _, n in later)
    due_now = max(0, pending - held)
    if held > pending:  # some of a later group went already (its not_before is an estimate): keep the last ones
        later = _trim(later, pending)
    rate = window_rate(samples, now, done, window_s=window_s)
    source: Literal["live", "ramp", "before_gap", "plan", "none"] = "live"
    began = _first_progress([*samples, (now, done)])
    if rate and plan_rate and began is not None and now - began < RAMP_S:
        weight = (now - began) / RAMP_S
        rate, source = weight * rate + (1.0 - weight) * plan_rate, "ramp"
    if not rate:
        covered = [t for t, _ in samples if now - window_s <= t < now]
        if due_now > 0 and rate is not None and covered and now - min(covered) >= window_s / 2:
            return LiveEta(None, 0.0, "none")  # work due and nothing finished for half a window: stalled
        rate = _before_gap(samples, window_s)
        source = "before_gap"
        if not rate:
            rate, source = plan_rate, "plan"
    if not rate or rate <= 0:
        return LiveEta(None, None, "none")
    if rate_cap:
        rate = min(rate, rate_cap)
    clock = now + due_now / rate
    for not_before, n in later:
        clock = max(clock, not_before) + n / rate
    return LiveEta(clock - now, rate, source)


def _trim(groups: list[tuple[float, int]], keep: int) -> list[tuple[float, int]]:
    """The last ``keep`` messages of ``groups`` (in time order)."""
    out: list[tuple[float, int]] = []
    for not_before, n in reversed(groups):
        take = min(n, keep)
        if take > 0:
            out.append((not_before, take))
        keep -= take
    return sorted(out)
