"""``dispatch status``: a campaign's progress for people, and ``--watch``.

The renderer reads the status as JSON (``CampaignStatus.as_dict()``, or the API's
``GET /v1/campaigns/{id}``, which has the same keys), so it shows the same thing locally and over
the API. Times are ISO 8601 in the reader's zone (``TZ``, else the local zone; UTC with ``--utc``).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, tzinfo
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["ENDED", "ETA_BASIS", "SLOWER_SHOWN", "reader_zone", "render", "watch", "watch_interval"]

#: States after which a campaign no longer changes (``--watch`` stops).
ENDED = frozenset({"completed", "cancelled"})
#: The live ETA and the plan's prediction are said to differ past this share.
SLOWER_SHOWN = 0.20
#: How the live ETA's rate was measured (``eta_source``), in the status's words.
ETA_BASIS: Final = {
    "live": "at the current rate",
    "ramp": "at the first seconds' rate, blended with the plan's",
    "before_gap": "at the rate before the quiet-hours wait",
    "plan": "at the plan's rate (not measured yet)",
}
#: Shortest time between two redraws of ``--watch``.
MIN_WATCH_S = 1.0


def reader_zone(*, utc: bool, environ: Mapping[str, str] | None = None) -> tzinfo:
    """UTC with ``utc``; else the zone ``TZ`` names; else the machine's local zone."""
    if utc:
        return UTC
    name = (os.environ if environ is None else environ).get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass  # a POSIX TZ string ("CET-1"): the C library already applies it to local time
    local = datetime.now().astimezone().tzinfo
    return local if local is not None else UTC


def watch_interval(text: str) -> float:
    """``--watch SECONDS`` (an argparse type): a positive number; redraws are never more often
    than once a second."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"seconds between redraws must be a number above 0, not {text!r}")
    return max(MIN_WATCH_S, seconds)


def _when(ts: float | None, zone: tzinfo) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, zone).isoformat(timespec="seconds")


def _span(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def _bar(share: float, width: int) -> str:
    share = min(1.0, max(0.0, share))
    filled = int(share * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} msg/s"


def render(status: Mapping[str, Any], *, zone: tzinfo, width: int = 40) -> str:
    """The status as lines for a terminal."""
    counters: Mapping[str, int] = status["counters"]
    state = str(status["state"])
    accepted = int(status["accepted"])
    sent, failed = int(counters.get("sent", 0)), int(counters.get("failed", 0))
    not_sent = int(status["not_sent"])
    pending = int(status.get("pending", max(0, accepted - sent - failed - not_sent)))
    done = accepted - pending
    share = done / accepted if accepted else 1.0
    channel = f" ({status['channel']})" if status.get("channel") else ""
    lines = [
        f"campaign  {status['campaign_id']}{channel}: {state}",
        *([f"waiting   for {status['waiting_for']}"] if status.get("waiting_for") else []),
        *(
            [f"paused    {status['pause_reason']} (fix it, then: dispatch resume)"]
            if status.get("pause_reason")
            else []
        ),
        f"progress  {_bar(share, width)} {share:6.1%}  {done:,} of {accepted:,} settled",
    ]
    parts = f"{sent:,} sent + {failed:,} failed + {not_sent:,} not sent"
    if state != "cancelled":
        parts += f" + {pending:,} pending"
    lines.append(f"messages  {accepted:,} accepted = {parts}")
    suppressed, skipped = int(counters.get("suppressed", 0)), int(counters.get("skipped", 0))
    why = [f"{suppressed:,} suppressed", f"{skipped:,} skipped"]
    if state == "cancelled":
        why.append(f"{max(0, not_sent - suppressed - skipped):,} cancelled before sending")
    lines.append(f"not sent  {', '.join(why)}")
    extra = [f"{counters[name]:,} {name}" for name in ("delivered", "undelivered", "bounced") if counters.get(name)]
    if counters.get("retries"):
        extra.append(f"{counters['retries']:,} retries")
    if counters.get("dead_letters"):
        extra.append(f"{counters['dead_letters']:,} dead letters")
    if extra:
        lines.append(f"also      {', '.join(extra)}")
    if counters.get("in_doubt"):
        lines.append(
            f"in doubt  {counters['in_doubt']:,} held: their provider may have them and cannot tell "
            "(dead letters; `dispatch retry-failed` sends them again)"
        )
    cap = status.get("rate")
    cap_text = f", cap {cap:,.1f} msg/s" if cap else ""
    live = status.get("live_rate")
    if state in ENDED:
        lines.append(f"rate      mean {_rate(status.get('mean_rate'))}{cap_text}")
    else:
        lines.append(f"rate      now {_rate(live)} (last 10 s), mean {_rate(status.get('mean_rate'))}{cap_text}")
    started, ended = status.get("started_at"), status.get("ended_at")
    lines.append(f"started   {_when(started, zone)}")
    predicted_finish = status.get("predicted_finish")
    if predicted_finish is None and started is not None:
        predicted_finish = started + float(status.get("predicted_s") or 0.0)
    predicted_s = float(status.get("predicted_s") or 0.0)
    if state in ENDED:
        took = f" after {_span(ended - started)}" if ended is not None and started is not None else ""
        lines.append(f"ended     {_when(ended, zone)}{took} (predicted {_span(predicted_s)})")
    elif started is not None:
        eta_at = status.get("eta_at")
        eta_s = status.get("eta_s")
        if eta_at is None and eta_s is not None:
            eta_at = float(status.get("as_of") or time.time()) + eta_s
        if state == "paused":
            estimate = "paused: no estimate"
        elif eta_at is None:
            estimate = "unknown (no messages finished lately)"
        else:
            basis = ETA_BASIS.get(str(status.get("eta_source") or "live"), "at the current rate")
            rate = status.get("eta_rate")
            at = f" ({rate:,.1f} msg/s)" if rate else ""
            estimate = f"{_when(eta_at, zone)} {basis}{at} (in {_span(eta_s or 0.0)})"
        lines.append(f"finish    {estimate}")
        lines.append(f"predicted {_when(predicted_finish, zone)} ({_span(predicted_s)} from the start)")
        low, high = status.get("predicted_finish_low"), status.get("predicted_finish_high")
        if low is not None and high is not None:
            inside = ""
            if eta_at is not None:
                inside = " - live ETA inside" if low <= eta_at <= high else " - live ETA outside"
            lines.append(f"          range {_when(low, zone)} .. {_when(high, zone)} (p10-p90){inside}")
        if eta_at is not None and predicted_s > 0:
            off = (eta_at - started) / predicted_s - 1.0
            if off > SLOWER_SHOWN:
                lines.append(f"          running {off:.0%} slower than predicted")
            elif off < -SLOWER_SHOWN:
                lines.append(f"          running {-off:.0%} faster than predicted")
        plan_factor, now_factor = status.get("speed_factor_plan"), status.get("speed_factor_now")
        if plan_factor and now_factor and abs(now_factor / plan_factor - 1.0) > SLOWER_SHOWN:
            change = now_factor / plan_factor - 1.0
            word = "slower" if change > 0 else "faster"
            lines.append(
                f"          the workers measure this machine {abs(change):.0%} {word} than when the campaign was "
                f"planned (speed factor {plan_factor:.2f} -> {now_factor:.2f})"
            )
    if status.get("deadline") is not None:
        lines.append(f"deadline  {_when(status['deadline'], zone)}")
    return "\n".join(lines)


def watch(
    fetch: Callable[[], Mapping[str, Any]],
    show: Callable[[Mapping[str, Any]], None],
    *,
    interval: float,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Show the status every ``interval`` seconds (at least one) until the campaign has ended;
    Ctrl-C stops watching (exit 0: the campaign goes on)."""
    interval = max(MIN_WATCH_S, interval)
    try:
        while True:
            status = fetch()
            show(status)
            if status["state"] in ENDED:
                return 0
            sleep(interval)
    except KeyboardInterrupt:
        return 0
