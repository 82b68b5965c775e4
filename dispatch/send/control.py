"""Campaign control: start, pause, resume, cancel, re-rate, and status.

The control hash of a campaign is the single source of truth every worker reads: the claim
script refuses to claim while a campaign is not ``running``, and workers re-read it at least
every ``CONTROL_TTL_S`` between chunks, between two rate-limit acquisitions and while waiting for
one, so a pause or cancel takes effect across all workers within about a second.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, cast

import redis

from dispatch.errors import CampaignStateError, ConfigError
from dispatch.plan.calibration import FleetSpeed, speed_factor
from dispatch.plan.snapshot import extend_retention, load_manifest
from dispatch.send.eta import LiveEta, live_eta
from dispatch.send.resilience import waiting_for
from dispatch.send.tracking import campaign_counters
from dispatch.store import keys

__all__ = [
    "CONTROL_TTL_S",
    "LIVE_WINDOW_S",
    "NO_RATE_CAP",
    "CampaignControl",
    "CampaignStatus",
    "EnqueueFn",
    "live_rate",
    "parse_rate",
]

#: Default seconds a campaign's data outlives its end (``Settings.retention_s``).
DEFAULT_RETENTION_S = 7 * 86400.0
#: Longest a worker trusts its cached view of a campaign's state.
CONTROL_TTL_S = 0.5

#: Seconds of progress samples the live rate of ``status`` spans.
LIVE_WINDOW_S = 10.0
#: Shortest span the live rate is measured over.
LIVE_MIN_SPAN_S = 1.0
#: Least seconds between two progress samples, and the most kept (over a minute's worth).
SAMPLE_EVERY_S = 1.0
SAMPLES_KEPT = 64

#: Enqueue one batch: (campaign id, batch number, delay in ms).
EnqueueFn = Callable[[str, int, int], None]

TERMINAL = ("sent", "failed", "suppressed", "skipped")

#: The words ``dispatch rate`` takes for "no campaign cap" (0 is documented too).
NO_RATE_CAP = ("unlimited", "none")
_ZERO = re.compile(r"\+?(0+(\.0*)?|\.0+)")


def parse_rate(text: str) -> float | None:
    """A rate as typed by an operator: messages per second > 0, or no cap (None) for one of
    :data:`NO_RATE_CAP` or ``0``. Anything else (negative, not a number, not finite) is refused,
    so a typo never silently removes the cap."""
    word = text.strip().lower()
    if word in NO_RATE_CAP or _ZERO.fullmatch(word):
        return None
    try:
        rate = float(word)
    except ValueError:
        rate = math.nan
    if not math.isfinite(rate) or rate <= 0:  # 1e-400 is 0.0 as a float, but not a typed 0
        raise ConfigError(
            "rate",
            f"{text!r} is not a rate",
            "give messages per second (a number above 0), or 'unlimited' (or 0) to remove the cap",
        )
    return rate


@dataclass(frozen=True, kw_only=True)
class CampaignStatus:
    """A campaign's progress at one moment (``as_of``).

    Every accepted message is in exactly one of four parts, in every state::

        accepted = sent + failed + not_sent + pending

    ``not_sent``: messages that will not be sent (suppressed, skipped, and once the campaign is
    cancelled every message it had not sent or failed); ``pending``: queued or in flight (0 once
    cancelled: a message in flight at the cancel moves from ``not_sent`` to ``sent`` or ``failed``
    when its provider answers). ``done`` is ``accepted - pending``.
    """

    campaign_id: str
    state: str
    accepted: int
    counters: dict[str, int]
    done: int
    not_sent: int
    pending: int
    rate: float | None
    #: The live rate when known, else the mean rate (messages with an outcome per second).
    current_rate: float
    #: Messages with an outcome per second over the last :data:`LIVE_WINDOW_S` (None: no sample yet).
    live_rate: float | None
    #: Messages with an outcome per second since the start (until the end once ended).
    mean_rate: float
    eta_s: float | None
    predicted_s: float
    deadline: float | None
    started_at: float | None
    #: When the campaign completed or was cancelled (epoch seconds), None while it goes on.
    ended_at: float | None = None
    #: When this status was read (epoch seconds).
    as_of: float = 0.0
    #: The machine-speed factor the plan's prediction used, and the live workers' median now
    #: (:mod:`dispatch.plan.calibration`; > 1: slower than the reference machine). None: unknown.
    speed_factor_plan: float | None = None
    speed_factor_now: float | None = None
    #: What a running campaign waits for: ``provider twilio (breaker open since ...)``; None: nothing.
    waiting_for: str | None = None
    #: Why a paused campaign was paused by a worker (a provider refused the account); None when an
    #: operator paused it or it is not paused.
    pause_reason: str | None = None
    #: The rate the ETA assumes (messages/s) and where it came from (:mod:`dispatch.send.eta`:
    #: ``live``, ``before_gap``: the last rate before a quiet-hours wait, ``plan``, ``none``).
    eta_rate: float | None = None
    eta_source: str = "none"
    #: The plan's range of the finish (epoch seconds; None: a plan without one, or not started).
    predicted_finish_low: float | None = None
    predicted_finish_high: float | None = None

    @property
    def speed_change(self) -> float | None:
        """How much slower (> 0) or faster (< 0) the workers measure the machine now than the plan
        did, as a share (0.3: 30% slower); None when either figure is unknown."""
        if not self.speed_factor_plan or not self.speed_factor_now:
            return None
        return self.speed_factor_now / self.speed_factor_plan - 1.0

    @property
    def complete(self) -> bool:
        """Every message has its final outcome (a cancelled campaign is not complete)."""
        return self.state != "cancelled" and self.pending == 0

    @property
    def predicted_finish(self) -> float | None:
        """When the plan's prediction says the campaign ends (epoch seconds); None before the start."""
        return None if self.started_at is None else self.started_at + self.predicted_s

    @property
    def eta_at(self) -> float | None:
        """When the campaign ends at the current rate (epoch seconds); None when unknown."""
        return None if self.eta_s is None else self.as_of + self.eta_s

    def with_accepted(self, accepted: int) -> CampaignStatus:
        """The same status for another accepted count (a triggered campaign counts its own)."""
        composed = _compose(
            eta=None,
            campaign_id=self.campaign_id,
            state=self.state,
            accepted=accepted,
            counters=self.counters,
            live_rate=self.live_rate,
            mean_rate=self.mean_rate,
            rate=self.rate,
            predicted_s=self.predicted_s,
            deadline=self.deadline,
            started_at=self.started_at,
            ended_at=self.ended_at,
            as_of=self.as_of,
        )
        return replace(
            composed,
            speed_factor_plan=self.speed_factor_plan,
            speed_factor_now=self.speed_factor_now,
            waiting_for=self.waiting_for,
            pause_reason=self.pause_reason,
            predicted_finish_low=self.predicted_finish_low,
            predicted_finish_high=self.predicted_finish_high,
        )

    def as_dict(self) -> dict[str, Any]:
        def rounded(value: float | None, digits: int) -> float | None:
            return None if value is None else round(value, digits)

        return {
            "campaign_id": self.campaign_id,
            "state": self.state,
            "accepted": self.accepted,
            "done": self.done,
            "not_sent": self.not_sent,
            "pending": self.pending,
            "counters": self.counters,
            "rate": self.rate,
            "current_rate": round(self.current_rate, 1),
            "live_rate": rounded(self.live_rate, 1),
            "mean_rate": round(self.mean_rate, 1),
            "eta_s": rounded(self.eta_s, 1),
            "eta_at": rounded(self.eta_at, 3),
            "predicted_s": round(self.predicted_s, 2),
            "predicted_finish": rounded(self.predicted_finish, 3),
            "deadline": self.deadline,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "as_of": round(self.as_of, 3),
            "speed_factor_plan": rounded(self.speed_factor_plan, 3),
            "speed_factor_now": rounded(self.speed_factor_now, 3),
            "waiting_for": self.waiting_for,
            "pause_reason": self.pause_reason,
            "eta_rate": rounded(self.eta_rate, 1),
            "eta_source": self.eta_source,
            "predicted_finish_low": rounded(self.predicted_finish_low, 3),
            "predicted_finish_high": rounded(self.predicted_finish_high, 3),
        }


def live_rate(samples: Sequence[tuple[float, int]], now: float, count: int) -> float | None:
    """Messages per second over the last :data:`LIVE_WINDOW_S`: from the oldest sample in that
    window (at least :data:`LIVE_MIN_SPAN_S` old) to ``count`` now; None without such a sample."""
    inside = [(t, n) for t, n in samples if now - LIVE_WINDOW_S <= t <= now - LIVE_MIN_SPAN_S]
    if not inside:
        return None
    t, n = min(inside)
    return max(0, count - n) / (now - t)


def _compose(
    *,
    eta: LiveEta | None,
    campaign_id: str,
    state: str,
    accepted: int,
    counters: dict[str, int],
    live_rate: float | None,
    mean_rate: float,
    rate: float | None,
    predicted_s: float,
    deadline: float | None,
    started_at: float | None,
    ended_at: float | None,
    as_of: float,
) -> CampaignStatus:
    """The four parts of ``accepted`` (see :class:`CampaignStatus`) and the ETA."""
    sent, failed = counters["sent"], counters["failed"]
    if state == "cancelled":
        # nothing is queued any more: what was neither sent nor failed will not be sent (messages
        # never claimed have no counter: the cancel stopped them before any record)
        not_sent, pending = max(0, accepted - sent - failed), 0
    else:
        not_sent = counters["suppressed"] + counters["skipped"]
        pending = max(0, accepted - sent - failed - not_sent)
    speed = live_rate if live_rate is not None else mean_rate
    eta_rate: float | None = None
    source = "none"
    if state != "running" or not pending:
        eta_s = None
    elif eta is not None:  # the live ETA (dispatch.send.eta)
        eta_s, eta_rate, source = eta.eta_s, eta.rate, eta.source
    else:  # no progress ring (a triggered campaign's own count): the current rate
        eta_s = pending / speed if speed > 0 else None
        eta_rate, source = (speed, "live") if eta_s is not None else (None, "none")
    return CampaignStatus(
        campaign_id=campaign_id,
        state=state,
        accepted=accepted,
        counters=counters,
        done=accepted - pending,
        not_sent=not_sent,
        pending=pending,
        rate=rate,
        current_rate=speed,
        live_rate=live_rate,
        mean_rate=mean_rate,
        eta_s=eta_s,
        eta_rate=eta_rate,
        eta_source=source,
        predicted_s=predicted_s,
        deadline=deadline,
        started_at=started_at,
        ended_at=ended_at,
        as_of=as_of,
    )


class CampaignControl:
    """Changes campaign state; ``enqueue`` hands batches to the broker."""

    def __init__(
        self,
        client: redis.Redis,
        enqueue: EnqueueFn | None = None,
        *,
        retention_s: float = DEFAULT_RETENTION_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._enqueue = enqueue
        self._retention_s = retention_s
        self._clock = clock
        self._sample = client.register_script(
            resources.files("dispatch.send").joinpath("progress.lua").read_text(encoding="utf-8")
        )

    def _state(self, campaign_id: str) -> str:
        raw = self._client.hget(keys.control(campaign_id), "state")
        return raw.decode() if isinstance(raw, bytes) else "planned"

    def start(self, campaign_id: str) -> bool:
        """Start a planned campaign; starting it again is a no-op (returns False)."""
        manifest = load_manifest(self._client, campaign_id)
        if self._enqueue is None:
            raise CampaignStateError("this control has no broker to enqueue batches")
        now = self._clock()
        if not self._client.hsetnx(keys.control(campaign_id), "started_at", f"{now:.3f}"):
            return False
        self._client.hset(keys.control(campaign_id), mapping={"state": "running"})
        # a campaign started long after planning must not outlive its snapshot
        predicted = manifest.predicted_duration_s
        extend_retention(self._client, campaign_id, predicted + self._retention_s)
        for number in range(manifest.batches):
            self._enqueue(campaign_id, number, 0)
        return True

    def pause(self, campaign_id: str) -> None:
        self._transition(campaign_id, {"running"}, "paused")

    def resume(self, campaign_id: str) -> None:
        """Resume a paused campaign; a pause reason a worker gave (``dispatch.send.resilience``) goes."""
        if self._transition(campaign_id, {"paused"}, "running"):
            self._client.hdel(keys.control(campaign_id), "pause_reason", "paused_at", "paused_by")

    def cancel(self, campaign_id: str) -> None:
        if self._transition(campaign_id, {"running", "paused", "planned"}, "cancelled"):
            self._client.hset(keys.control(campaign_id), "cancelled_at", f"{self._clock():.3f}")

    def finalize(self, campaign_id: str, retention_s: float) -> bool:
        """Mark a finished campaign completed and let all its keys expire ``retention_s`` later.

        A cancelled campaign's keys expire the same way (its state stays ``cancelled``).

        Idempotent; any worker may call it. Returns False while the campaign is not finished.
        """
        status = self.status(campaign_id, speed=False)
        if not status.complete and status.state != "cancelled":
            return False
        control = keys.control(campaign_id)
        if self._client.hget(control, "state") == b"running":
            self._client.hset(control, mapping={"state": "completed", "completed_at": f"{self._clock():.3f}"})
        manifest = load_manifest(self._client, campaign_id)
        extend_retention(self._client, campaign_id, retention_s)
        ttl = int(retention_s)
        pipe = self._client.pipeline(transaction=False)
        for key in (
            control,
            keys.counters(campaign_id),
            keys.dead_letters(campaign_id),
            keys.progress(campaign_id),
            keys.done_batches(campaign_id),
            keys.engagement_counters(campaign_id),
        ):
            pipe.expire(key, ttl)
        for number in range(manifest.batches):
            pipe.expire(keys.records(campaign_id, number), ttl)
            pipe.expire(keys.engagement(campaign_id, number), ttl)
        pipe.execute()
        return True

    def retry_failed(self, campaign_id: str) -> tuple[int, int]:
        """Send dead-lettered messages again (and only those); returns (messages, batches)."""
        load_manifest(self._client, campaign_id)
        if self._enqueue is None:
            raise CampaignStateError("this control has no broker to enqueue batches")
        state = self._state(campaign_id)
        if state not in {"running", "paused", "completed"}:
            raise CampaignStateError(f"campaign {campaign_id!r} is {state}; only a started campaign can retry")
        if state == "completed":
            self._client.hset(keys.control(campaign_id), "state", "running")
        script = self._client.register_script(
            resources.files("dispatch.send").joinpath("requeue_dead.lua").read_text(encoding="utf-8")
        )
        prefix = keys.records(campaign_id, 0)[: -len("0")]
        result = cast(
            list[int],
            script(
                keys=[keys.dead_letters(campaign_id), keys.counters(campaign_id)], args=[prefix, f"{time.time():.3f}"]
            ),
        )
        *batches, count = result
        for number in sorted(batches):
            self._enqueue(campaign_id, int(number), 0)
        return int(count), len(batches)

    def set_rate(self, campaign_id: str, rate: float | None) -> None:
        load_manifest(self._client, campaign_id)
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise CampaignStateError(f"rate must be a positive number, got {rate}")
        self._client.hset(keys.control(campaign_id), "rate", "" if rate is None else str(rate))

    def _transition(self, campaign_id: str, allowed: set[str], target: str) -> bool:
        """Move to ``target``; False when the campaign already was there."""
        load_manifest(self._client, campaign_id)
        current = self._state(campaign_id)
        if current == target:
            return False
        if current not in allowed:
            raise CampaignStateError(f"campaign {campaign_id!r} is {current}; cannot make it {target}")
        self._client.hset(keys.control(campaign_id), "state", target)
        return True

    def status(self, campaign_id: str, *, speed: bool = True) -> CampaignStatus:
        """The campaign's progress now. While it runs (or is paused) this also adds a sample to
        its progress ring, at most one every :data:`SAMPLE_EVERY_S` whoever reads: the workers'
        gauges (every few seconds each) and status readers keep the live rate fed. ``speed``: also
        read the workers' machine-speed figures (``speed_factor_now``; for people, not gauges)."""
        manifest = load_manifest(self._client, campaign_id)
        control: dict[bytes, bytes] = self._client.hgetall(keys.control(campaign_id))  # type: ignore[assignment]
        counters = campaign_counters(self._client, campaign_id)
        now = self._clock()
        accepted = manifest.accepted
        outcomes = sum(counters[name] for name in TERMINAL)
        state = control.get(b"state", b"planned").decode()
        if state == "running" and outcomes >= accepted:
            state = "completed"  # finished; a worker records it (finalize) within seconds

        def stamp(name: bytes) -> float | None:
            raw = control.get(name)
            return float(raw) if raw else None

        started = stamp(b"started_at")
        ended = stamp(b"completed_at") if state == "completed" else stamp(b"cancelled_at")
        if state == "completed" and ended is None:
            ended = now
        elapsed = (ended or now) - started if started is not None else 0.0
        mean = outcomes / elapsed if elapsed > 0 else 0.0
        live = None
        rate_raw = control.get(b"rate")
        cap = float(rate_raw) if rate_raw else manifest.rate
        prediction = manifest.prediction or {}
        eta: LiveEta | None = None
        if state in {"running", "paused"} and started is not None:
            raw = cast(
                list[bytes],
                self._sample(
                    keys=[keys.progress(campaign_id), keys.manifest(campaign_id)],
                    args=[f"{now:.3f}", outcomes, SAMPLE_EVERY_S, SAMPLES_KEPT],
                ),
            )
            samples = [_parse_sample(item) for item in raw]
            live = live_rate(samples, now, outcomes)
            pending = accepted - counters["sent"] - counters["failed"] - counters["suppressed"] - counters["skipped"]
            eta = live_eta(
                now=now,
                done=outcomes,
                pending=max(0, pending),
                samples=samples,
                schedule=_held(manifest.schedule, float(prediction.get("start") or manifest.created_at)),
                rate_cap=cap,
                plan_rate=float(prediction["rate"]) if prediction.get("rate") else None,
            )
        composed = _compose(
            eta=eta,
            campaign_id=campaign_id,
            state=state,
            accepted=accepted,
            counters=counters,
            live_rate=live,
            mean_rate=mean,
            rate=cap,
            predicted_s=manifest.predicted_duration_s,
            deadline=manifest.deadline,
            started_at=started,
            ended_at=ended,
            as_of=now,
        )
        plan_factor = prediction.get("speed_factor")
        low, high = prediction.get("duration_low_s"), prediction.get("duration_high_s")
        now_factor = None
        if speed and state in {"running", "paused"}:  # what the workers measure while they send
            figures = list(FleetSpeed(self._client).live().values())
            now_factor = speed_factor(statistics.median(figures)) if figures else None
        reason = control.get(b"pause_reason")
        return replace(
            composed,
            speed_factor_plan=float(plan_factor) if plan_factor else None,
            speed_factor_now=now_factor,
            waiting_for=waiting_for(self._client, control) if state == "running" else None,
            pause_reason=reason.decode() if reason and state == "paused" else None,
            predicted_finish_low=started + float(low) if started is not None and low else None,
            predicted_finish_high=started + float(high) if started is not None and high else None,
        )


def _held(schedule: list[Any] | None, planned_at: float) -> list[tuple[float, int]]:
    """The plan's groups held back by quiet hours: (not_before, recipients) of those due after
    the plan was made (the others were due at once; their not_before is no wait)."""
    groups = [(float(g["not_before"]), int(g["recipients"])) for g in schedule or ()]
    return [(nb, n) for nb, n in groups if nb > planned_at]


def _parse_sample(raw: bytes) -> tuple[float, int]:
    t, _, count = raw.decode().partition(":")
    return float(t), int(count)
