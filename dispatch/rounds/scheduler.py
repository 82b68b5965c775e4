"""The round scheduler: starts each round of every registered funnel once it is due, exactly once.

Any number of schedulers may run (``dispatch funnel run``, or inside ``dispatch serve``), in
any number of processes. Per round, :meth:`RoundScheduler.tick`:

1. decides whether it is due: a first round at once; a follow-up when its source campaign is
   ``completed`` and ``after`` has passed since it ended (the end instant is the source's
   ``completed_at``, recorded once in the round's state hash the first time a scheduler sees it,
   so every scheduler waits for the same instant);
2. claims it (``claim.lua``): a lease of ``lease_s`` seconds on the round's state hash
   (``keys.round_state``), refused while another owner's lease is live, taken over once it ran
   out (its holder died);
3. plans it (a stored plan is reused as it is: a derived audience is frozen once) and starts it
   with :meth:`dispatch.send.control.CampaignControl.start`, whose ``HSETNX started_at`` is the
   exactly-once point: a scheduler that took over from one that died after starting finds the
   campaign started and enqueues nothing;
4. settles it (``settle.lua``: ``started``, or ``empty`` when nobody qualifies, or ``failed``
   with the planner's message when the round cannot be planned or its contacts file cannot be
   read: an operator fixes and resubmits it under a new id). Any other error (Redis down)
   leaves the claim to expire, and a later tick tries again.

Every instant is the injected ``clock`` (leases included), so a test moves time by hand.
:meth:`RoundScheduler.run` also publishes each planned round's report as engagement gauges
(``dispatch.rounds.report.publish_report``) when given ``metrics``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Final, cast

import redis

from dispatch.errors import AudienceError, CampaignNotFound, PlanError
from dispatch.plan.planner import Planner, PlanReport
from dispatch.rounds.derive import EmptyRound, plan_round
from dispatch.rounds.funnel import Funnel, Round, registered_funnels
from dispatch.rounds.report import publish_report, round_report
from dispatch.send.control import CampaignControl
from dispatch.store import keys
from monitoring.metrics import Metrics

__all__ = ["DEFAULT_LEASE_S", "RoundScheduler", "Tick"]

log = logging.getLogger(__name__)

#: Seconds a claim holds a round: longer than planning a large derived round takes.
DEFAULT_LEASE_S: Final = 900.0
#: Seconds between two scans of the funnels in :meth:`RoundScheduler.run`.
DEFAULT_INTERVAL_S: Final = 5.0


@cache
def _script(name: str) -> str:
    return resources.files("dispatch.rounds").joinpath(name).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Tick:
    """What one round's turn did: ``waiting`` (not due), ``busy`` (another scheduler holds it),
    ``done`` (settled before), ``started``, ``empty``, ``failed``, ``already_started``, ``error``
    (something else went wrong: logged, retried by a later tick)."""

    campaign_id: str
    outcome: str
    detail: str = ""


class RoundScheduler:
    """Starts due rounds; see the module docstring. ``before_start`` is called with the round's id
    between planning and starting (tests use it to kill a scheduler mid-start)."""

    def __init__(
        self,
        client: redis.Redis,
        control: CampaignControl,
        planner: Callable[[], Planner],
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        lease_s: float = DEFAULT_LEASE_S,
        before_start: Callable[[str], None] | None = None,
        metrics: Metrics | None = None,
        prices: Mapping[str, float] | None = None,
    ) -> None:
        self._client = client
        self._control = control
        self._planner = planner
        self.owner = owner or secrets.token_hex(6)
        self._clock = clock
        self._lease_s = lease_s
        self._before_start = before_start
        self._metrics = metrics
        self._prices = dict(prices or {})
        self._claim = client.register_script(_script("claim.lua"))
        self._settle = client.register_script(_script("settle.lua"))

    def tick(self) -> list[Tick]:
        """One pass over every registered funnel's rounds."""
        out: list[Tick] = []
        for funnel in registered_funnels(self._client):
            out.extend(self.tick_funnel(funnel))
        return out

    def tick_funnel(self, funnel: Funnel) -> list[Tick]:
        out = []
        for round_ in funnel.rounds:
            try:
                out.append(self._turn(round_))
            except Exception as exc:  # one round's trouble (Redis, a bug) never stops the others
                log.exception("round %s: this turn failed; its claim expires and a later tick retries", round_.spec.id)
                out.append(Tick(round_.spec.id, "error", type(exc).__name__))
        return out

    def due_at(self, round_: Round) -> float | None:
        """When ``round_`` may start (epoch s, the scheduler's clock); None while its source runs."""
        follow = round_.follow
        if follow is None:
            return 0.0
        state_key = keys.round_state(round_.spec.id)
        ended = self._client.hget(state_key, "source_ended_at")
        if ended is None:
            try:
                status = self._control.status(follow.source, speed=False)
            except CampaignNotFound:
                return None
            if status.state != "completed":
                return None
            self._client.hsetnx(state_key, "source_ended_at", f"{status.ended_at or self._clock():.3f}")
            ended = self._client.hget(state_key, "source_ended_at")
        after = follow.after.total_seconds() if follow.after else 0.0
        return float(cast(bytes, ended)) + after

    def states(self, funnel: Funnel) -> list[dict[str, str | float | None]]:
        """Each round's state for people: ``state`` (waiting, claimed, started, empty, failed), its
        source's state (a follow-up of a cancelled source waits for good: it never completes),
        ``due_at`` (None while its source runs) and the settling ``detail``."""
        out: list[dict[str, str | float | None]] = []
        for round_ in funnel.rounds:
            raw = cast(dict[bytes, bytes], self._client.hgetall(keys.round_state(round_.spec.id)))
            out.append(
                {
                    "round": round_.spec.id,
                    "from": None if round_.follow is None else round_.follow.source,
                    "where": None if round_.follow is None else round_.follow.where,
                    "state": raw.get(b"state", b"waiting").decode(),
                    "source_state": None if round_.follow is None else self._source_state(round_.follow.source),
                    "due_at": self.due_at(round_),
                    "detail": raw.get(b"detail", b"").decode(),
                }
            )
        return out

    def _source_state(self, campaign_id: str) -> str:
        raw = self._client.hget(keys.control(campaign_id), "state")
        if raw is not None:
            return cast(bytes, raw).decode()
        return "planned" if self._client.exists(keys.manifest(campaign_id)) else "unknown"

    def _turn(self, round_: Round) -> Tick:
        cid = round_.spec.id
        state_key = keys.round_state(cid)
        state = self._client.hget(state_key, "state")
        if state in (b"started", b"empty", b"failed"):
            return Tick(cid, "done", state.decode())
        due = self.due_at(round_)
        now = self._clock()
        if due is None or due > now:
            return Tick(cid, "waiting")
        claimed = int(self._claim(keys=[state_key], args=[self.owner, f"{now:.3f}", self._lease_s]))
        if claimed == 0:
            return Tick(cid, "done")
        if claimed < 0:
            return Tick(cid, "busy")
        try:
            report = self._plan(round_)
        except EmptyRound as exc:
            self._finish(cid, "empty", str(exc))
            return Tick(cid, "empty", str(exc))
        except (PlanError, AudienceError, CampaignNotFound) as exc:  # a contacts file or a source gone
            log.warning("round %s cannot be planned: %s", cid, exc)
            self._finish(cid, "failed", str(exc))
            return Tick(cid, "failed", str(exc))
        if self._before_start is not None:
            self._before_start(cid)
        started = self._control.start(cid)
        self._finish(cid, "started", f"{report.accepted} recipients")
        return Tick(cid, "started" if started else "already_started")

    def _plan(self, round_: Round) -> PlanReport:
        planner = self._planner()
        spec = round_.spec
        if round_.follow is not None:
            return plan_round(planner, self._client, spec, round_.follow, clock=self._clock)
        stored = planner.stored_plan(spec)
        if stored is not None:
            return stored
        assert round_.audience_path is not None
        return planner.plan_file(spec, Path(round_.audience_path))

    def _finish(self, cid: str, state: str, detail: str) -> None:
        state_key = keys.round_state(cid)
        if int(self._settle(keys=[state_key], args=[self.owner, state, f"{self._clock():.3f}"])) == 1:
            self._client.hset(state_key, "detail", detail[:500])

    def publish(self) -> int:
        """Publish the report of every planned round of the registered funnels as engagement
        gauges (``metrics``); returns the number published."""
        if self._metrics is None:
            return 0
        published = 0
        for funnel in registered_funnels(self._client):
            for round_ in funnel.rounds:
                try:
                    publish_report(self._metrics, round_report(self._client, round_.spec.id, self._prices))
                except CampaignNotFound:
                    continue
                published += 1
        return published

    def run(self, stop: threading.Event, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        """Tick (and publish) every ``interval_s`` until ``stop`` is set; an error is logged and retried."""
        while not stop.is_set():
            try:
                for tick in self.tick():
                    if tick.outcome in {"started", "empty", "failed", "already_started"}:
                        log.info("round %s: %s %s", tick.campaign_id, tick.outcome, tick.detail)
                self.publish()
            except Exception:  # the thread must outlive any one bad pass: the next tick retries
                log.exception("round scheduler: this pass failed; retrying in %.0f s", interval_s)
            stop.wait(interval_s)
