"""A worker process's measurements of its own sends, published as plan-time evidence.

:class:`SendStats` counts the provider answers the send path observes (``observe``: from the
runtime's per-answer callback, on the event loop thread) and, on the heartbeat thread (``tick``,
every heartbeat), closes a window every :data:`WINDOW_S`: the process's CPU seconds per answer,
the mean provider latency, and, when the process had answers in every heartbeat of the window,
its rate and mean concurrency. The window goes to :class:`dispatch.plan.evidence.EvidenceStore`.

A window tells the CPU cost only when the process had answers in every heartbeat of it and of the
window before (a send's first windows open its connections and fetch its first batches, its last
one idles: measured here, such windows put the workers' CPU per message 40-55% above what the
whole 20k-message send averaged) and spent a fair share of a core sending
(:data:`MIN_CPU_SHARE`): a rate-capped or latency-bound send spends most of its time waiting, and
the heartbeat's, the gauges' and the limiter's polling would then weigh on each message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dispatch.plan.evidence import EvidenceStore, Window

__all__ = ["MIN_CPU_SHARE", "MIN_WINDOW_ANSWERS", "WINDOW_S", "SendStats"]

log = logging.getLogger(__name__)

#: Seconds of one window.
WINDOW_S = 2.0
#: A window with fewer answers is dropped (too few to say anything).
MIN_WINDOW_ANSWERS = 100
#: A final window (the process stops) shorter than this is dropped.
MIN_FINAL_S = 0.5
#: Least CPU share of one core the process used over a window for its CPU per answer to count
#: (0.3 left a busy machine's workers, each on a fifth of a core beside a busy loop and the other
#: sessions, without any evidence; below 0.1 the process's fixed polling, ~10 ms/s, weighs >10%).
MIN_CPU_SHARE = 0.1


@dataclass
class _Tally:
    answers: int = 0
    latency_s: float = 0.0


class SendStats:
    """Per-process send measurements (thread-safe: ``observe`` and ``tick`` run on different threads)."""

    def __init__(
        self,
        store: EvidenceStore,
        owner: str,
        *,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self._store = store
        self._owner = owner
        self._window_s = window_s
        self._clock = clock
        self._wall = wall
        self._cpu = cpu
        self._lock = threading.Lock()
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._since_tick = 0
        self._busy = True
        #: Whether the window before the current one was busy throughout (a send's first busy
        #: window still opens its connections and fetches its first batches).
        self._was_busy = False
        self._started = clock()
        self._cpu_started = cpu()
        #: Windows published and dropped so far (for tests and logs).
        self.published = 0
        self.dropped = 0

    def observe(self, channel: str, provider: str, elapsed_s: float) -> None:
        """One provider answer of ``channel`` through ``provider`` after ``elapsed_s``."""
        with self._lock:
            tally = self._tallies.get((channel, provider))
            if tally is None:
                tally = self._tallies[(channel, provider)] = _Tally()
            tally.answers += 1
            tally.latency_s += elapsed_s
            self._since_tick += 1

    def tick(self) -> None:
        """Called every heartbeat: notes whether answers came since the last one, and publishes
        the window once it is :data:`WINDOW_S` old."""
        self._close(final=False)

    def flush(self) -> None:
        """Publish the window so far (the process stops: a short send's answers must not be lost)."""
        self._close(final=True)

    def _close(self, *, final: bool) -> None:
        now = self._clock()
        with self._lock:
            if self._since_tick == 0 and not final:
                self._busy = False
            self._since_tick = 0
            span = now - self._started
            if span < (MIN_FINAL_S if final else self._window_s):
                return
            tallies, busy = self._tallies, self._busy
            cpu_now = self._cpu()
            cpu_used = cpu_now - self._cpu_started
            self._tallies, self._busy, self._started, self._cpu_started = {}, True, now, cpu_now
        answers = sum(t.answers for t in tallies.values())
        steady, self._was_busy = self._was_busy, busy and answers >= MIN_WINDOW_ANSWERS
        if answers < MIN_WINDOW_ANSWERS:
            if answers:
                self.dropped += 1
            return
        cpu_share = cpu_used / span
        for (channel, provider), tally in tallies.items():
            if tally.answers < MIN_WINDOW_ANSWERS:
                continue
            latency = tally.latency_s / tally.answers
            rate = tally.answers / span if busy else None
            window = Window(
                cpu_s=cpu_used / answers if busy and steady and cpu_share >= MIN_CPU_SHARE else None,
                latency_s=latency,
                rate=rate,
                inflight=rate * latency if rate is not None else None,
            )
            try:
                self._store.record(channel, provider, self._owner, window, now=self._wall())
            except ValueError as exc:  # a clock gone wrong: drop the window, never the heartbeat
                log.warning("send evidence window dropped: %s", exc)
                self.dropped += 1
                continue
            self.published += 1
