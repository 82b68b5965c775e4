"""Self-healing: campaigns that stopped moving with nobody working on them are set going again.

Every batch of a running campaign is on the broker's queue, or being sent under a lease (a field
of its records hash, ``claim.lua``), or done (``keys.done_batches``), or waiting for its
``not_before`` (field ``W``). A Redis restart that lost its last second of writes can break
that: the broker's message of a batch is gone (its enqueue, or its fetch into a worker's ack set,
was lost) while its records say it is not done. Nothing would ever send that batch again.

One worker at a time (an election key, ``keys.SWEEPER``) looks every few seconds at the running
campaigns. A campaign whose count of final outcomes has not moved for ``stall_s`` seconds is
*stalled*; for a stalled campaign it enqueues again every batch that is neither done, nor leased
by a live worker, nor waiting, at most once per ``cooldown_s``. A batch enqueued twice is
harmless: its second run finds every message done (or takes the lease and sends what is left,
exactly once). When every batch is done but the counters disagree with the records (a restart
lost counter updates but not records), the counters are recomputed from the records.
Each action is logged and counted (``dispatch_sweeps_total{action}``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import redis

from dispatch.plan.snapshot import load_manifest
from dispatch.send.tracking import COUNTERS, iter_records
from dispatch.store import keys

__all__ = ["Sweeper", "recount"]

log = logging.getLogger(__name__)

#: Counters a message record decides (``retries`` counts events, not messages: left alone).
_FROM_RECORDS = ("sent", "delivered", "undelivered", "bounced", "failed", "dead_letters", "suppressed", "skipped")
_TERMINAL = ("sent", "failed", "suppressed", "skipped")
#: A lease younger than this is its run's, whatever its holder's heartbeat says yet (claim.lua).
LEASE_FRESH_S = 5.0


@dataclass(slots=True)
class _Seen:
    outcomes: int
    since: float
    requeued_at: float = -float("inf")


def recount(client: redis.Redis, campaign_id: str, batches: int) -> dict[str, int]:
    """Counters recomputed from the records; writes and returns those that differed.

    A record ``failed`` with a provider id was sent and then reported undelivered by a receipt;
    without one the provider refused it. Dead letters are the dead-letter set's members.
    """
    counts = dict.fromkeys((*_FROM_RECORDS, "in_doubt"), 0)
    for record in iter_records(client, campaign_id, batches):
        state = record.state
        if state == "failed" and record.provider_id:
            counts["sent"] += 1
            counts["undelivered"] += 1
        elif state in {"delivered", "bounced"}:
            counts["sent"] += 1
            counts[state] += 1
        elif state in {"sent", "failed", "suppressed", "skipped"}:
            counts[state] += 1
        if state == "failed" and record.code == "in_doubt":
            counts["in_doubt"] += 1
    counts["dead_letters"] = int(client.scard(keys.dead_letters(campaign_id)))
    raw: dict[bytes, bytes] = client.hgetall(keys.counters(campaign_id))  # type: ignore[assignment]
    current = {name: int(raw.get(name.encode(), 0)) for name in COUNTERS}
    changed = {name: value for name, value in counts.items() if current.get(name, 0) != value}
    if changed:
        client.hset(keys.counters(campaign_id), mapping=changed)  # type: ignore[arg-type]
    return changed


class Sweeper:
    """Finds stalled campaigns and sets them going (see the module doc). ``sweep`` is called by
    every worker's heartbeat; only the elected one acts."""

    def __init__(
        self,
        client: redis.Redis,
        enqueue: Callable[[str, int], None],
        *,
        owner: str,
        stall_s: float = 10.0,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_action: Callable[[str, int], None] | None = None,
    ) -> None:
        self._client = client
        self._enqueue = enqueue
        self._owner = owner
        self._stall_s = stall_s
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._wall = wall
        self._on_action = on_action
        self._seen: dict[str, _Seen] = {}

    def elected(self) -> bool:
        """Whether this worker sweeps now (the key lasts three sweeps of silence)."""
        client = self._client
        ttl_ms = int(max(self._stall_s, 5.0) * 1000)
        if client.set(keys.SWEEPER, self._owner, nx=True, px=ttl_ms):
            return True
        if client.get(keys.SWEEPER) == self._owner.encode():
            client.pexpire(keys.SWEEPER, ttl_ms)
            return True
        return False

    def sweep(self) -> list[tuple[str, list[int]]]:
        """One look at every running campaign; returns the batches enqueued again, per campaign."""
        if not self.elected():
            self._seen.clear()
            return []
        acted: list[tuple[str, list[int]]] = []
        now = self._clock()
        running: set[str] = set()
        for raw_id in cast(list[bytes], self._client.zrange(keys.CAMPAIGNS, 0, -1)):
            campaign_id = raw_id.decode()
            if self._client.hget(keys.control(campaign_id), "state") != b"running":
                continue
            running.add(campaign_id)
            counters = cast(list[bytes | None], self._client.hmget(keys.counters(campaign_id), list(_TERMINAL)))
            outcomes = sum(int(v) for v in counters if v is not None)
            seen = self._seen.get(campaign_id)
            if seen is None or seen.outcomes != outcomes:
                self._seen[campaign_id] = _Seen(outcomes, now)
                continue
            if now - seen.since < self._stall_s or now - seen.requeued_at < self._cooldown_s:
                continue
            requeued = self._restart(campaign_id)
            seen.requeued_at = now
            if requeued:
                acted.append((campaign_id, requeued))
        for gone in set(self._seen) - running:
            del self._seen[gone]
        return acted

    def _restart(self, campaign_id: str) -> list[int]:
        manifest = load_manifest(self._client, campaign_id)
        done = {int(b) for b in cast(set[bytes], self._client.smembers(keys.done_batches(campaign_id)))}
        now = self._wall()
        stuck: list[int] = []
        for batch in range(manifest.batches):
            if batch in done:
                continue
            lease, waiting = cast(list[bytes | None], self._client.hmget(keys.records(campaign_id, batch), ["L", "W"]))
            if lease is not None and self._sending(lease.decode(), campaign_id, batch, now):
                continue
            if waiting is not None and float(waiting) > now:
                continue
            stuck.append(batch)
        for batch in stuck:
            self._enqueue(campaign_id, batch)
        if stuck:
            log.warning(
                "campaign %s made no progress for %.0f s with nobody sending it: %d unfinished batch(es) requeued",
                campaign_id,
                self._stall_s,
                len(stuck),
            )
            self._act("requeued", len(stuck))
        elif len(done) >= manifest.batches:
            changed = recount(self._client, campaign_id, manifest.batches)
            if changed:
                log.warning(
                    "campaign %s: every batch is done but its counters disagreed with its records; recounted %s",
                    campaign_id,
                    ", ".join(sorted(changed)),
                )
                self._act("recounted", 1)
        return stuck

    def _sending(self, lease: str, campaign_id: str, batch: int, now: float) -> bool:
        """Whether the lease's holder is sending the batch (as ``claim.lua`` reads a lease)."""
        holder, _, since = lease.partition("|")
        if not self._client.exists(keys.worker_alive(holder)):
            return False
        if since and now - float(since) < LEASE_FRESH_S:
            return True
        return bool(self._client.sismember(keys.worker_runs(holder), keys.run_member(campaign_id, batch)))

    def _act(self, action: str, n: int) -> None:
        if self._on_action is not None:
            self._on_action(action, n)
