"""Campaign control: start, pause, resume, cancel, re-rate, and status.

The control hash of a campaign is the single source of truth every worker reads: the claim
script refuses to claim while a campaign is not ``running``, and workers re-read it at least
every ``CONTROL_TTL_S`` between chunks, between two rate-limit acquisitions and while waiting for
one, so a pause or cancel takes effect across all workers within about a second.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import redis

from dispatch.errors import CampaignStateError, ConfigError
from dispatch.plan.snapshot import extend_retention, load_manifest
from dispatch.send.tracking import campaign_counters
from dispatch.store import keys

__all__ = ["CONTROL_TTL_S", "NO_RATE_CAP", "CampaignControl", "CampaignStatus", "EnqueueFn", "parse_rate"]

#: Default seconds a campaign's data outlives its end (``Settings.retention_s``).
DEFAULT_RETENTION_S = 7 * 86400.0
#: Longest a worker trusts its cached view of a campaign's state.
CONTROL_TTL_S = 0.5

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
    campaign_id: str
    state: str
    accepted: int
    counters: dict[str, int]
    done: int
    rate: float | None
    current_rate: float
    eta_s: float | None
    predicted_s: float
    deadline: float | None
    started_at: float | None

    @property
    def complete(self) -> bool:
        return self.done >= self.accepted

    def as_dict(self) -> dict[str, Any]:
        return {
            "campaign_id": self.campaign_id,
            "state": self.state,
            "accepted": self.accepted,
            "done": self.done,
            "not_sent": self.accepted - self.counters["sent"],
            "counters": self.counters,
            "rate": self.rate,
            "current_rate": round(self.current_rate, 1),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "predicted_s": round(self.predicted_s, 2),
            "deadline": self.deadline,
            "started_at": self.started_at,
        }


class CampaignControl:
    """Changes campaign state; ``enqueue`` hands batches to the broker."""

    def __init__(
        self, client: redis.Redis, enqueue: EnqueueFn | None = None, *, retention_s: float = DEFAULT_RETENTION_S
    ) -> None:
        self._client = client
        self._enqueue = enqueue
        self._retention_s = retention_s

    def _state(self, campaign_id: str) -> str:
        raw = self._client.hget(keys.control(campaign_id), "state")
        return raw.decode() if isinstance(raw, bytes) else "planned"

    def start(self, campaign_id: str) -> bool:
        """Start a planned campaign; starting it again is a no-op (returns False)."""
        manifest = load_manifest(self._client, campaign_id)
        if self._enqueue is None:
            raise CampaignStateError("this control has no broker to enqueue batches")
        now = time.time()
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
        self._transition(campaign_id, {"paused"}, "running")

    def cancel(self, campaign_id: str) -> None:
        self._transition(campaign_id, {"running", "paused", "planned"}, "cancelled")

    def finalize(self, campaign_id: str, retention_s: float) -> bool:
        """Mark a finished campaign completed and let all its keys expire ``retention_s`` later.

        A cancelled campaign's keys expire the same way (its state stays ``cancelled``).

        Idempotent; any worker may call it. Returns False while the campaign is not finished.
        """
        status = self.status(campaign_id)
        if not status.complete and status.state != "cancelled":
            return False
        control = keys.control(campaign_id)
        if self._client.hget(control, "state") == b"running":
            self._client.hset(control, mapping={"state": "completed", "completed_at": f"{time.time():.3f}"})
        manifest = load_manifest(self._client, campaign_id)
        extend_retention(self._client, campaign_id, retention_s)
        ttl = int(retention_s)
        pipe = self._client.pipeline(transaction=False)
        for key in (control, keys.counters(campaign_id), keys.dead_letters(campaign_id)):
            pipe.expire(key, ttl)
        for number in range(manifest.batches):
            pipe.expire(keys.records(campaign_id, number), ttl)
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

    def _transition(self, campaign_id: str, allowed: set[str], target: str) -> None:
        load_manifest(self._client, campaign_id)
        current = self._state(campaign_id)
        if current == target:
            return
        if current not in allowed:
            raise CampaignStateError(f"campaign {campaign_id!r} is {current}; cannot make it {target}")
        self._client.hset(keys.control(campaign_id), "state", target)

    def status(self, campaign_id: str) -> CampaignStatus:
        manifest = load_manifest(self._client, campaign_id)
        control: dict[bytes, bytes] = self._client.hgetall(keys.control(campaign_id))  # type: ignore[assignment]
        counters = campaign_counters(self._client, campaign_id)
        accepted = manifest.accepted
        done = sum(counters[name] for name in TERMINAL)
        state = control.get(b"state", b"planned").decode()
        if state == "running" and done >= accepted:
            state = "completed"  # finished; a worker records it (finalize) within seconds
        started_raw = control.get(b"started_at")
        started = float(started_raw) if started_raw else None
        elapsed = time.time() - started if started else 0.0
        current_rate = done / elapsed if elapsed > 0 else 0.0
        eta = (accepted - done) / current_rate if current_rate > 0 and done < accepted else None
        rate_raw = control.get(b"rate")
        return CampaignStatus(
            campaign_id=campaign_id,
            state=state,
            accepted=accepted,
            counters=counters,
            done=done,
            rate=float(rate_raw) if rate_raw else manifest.rate,
            current_rate=current_rate,
            eta_s=eta,
            predicted_s=float(manifest.prediction["duration_s"]),
            deadline=manifest.deadline,
            started_at=started,
        )
