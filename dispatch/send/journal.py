"""What a worker process knows of its own recent answers, for as long as Redis could lose them.

Every final outcome a run confirms is remembered here *before* it is written to Redis, and kept
until Redis has surely made it durable: an entry written at ``t`` is forgotten only once the
engine has seen the same Redis server (same run id) at a time later than ``t + keep_s``
(:meth:`Journal.durable`; ``keep_s`` covers ``appendfsync everysec``'s window). While Redis is
unreachable nothing is forgotten, however long the outage. So:

- when a write fails (Redis unreachable) the run's answers are not lost: the next run of the
  batch finds its messages ``sending`` (issued by this process) and takes the known answer instead
  of reconciling them with the provider;
- Redis with ``appendfsync everysec`` loses up to about a second of writes when its machine
  crashes; a restarted server may then show a message ``sending``, or not issued at all, that this
  process has already sent: when the engine sees that Redis restarted (its run id changed) it
  writes every remembered outcome again (``Engine.reassert``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from dispatch.send.tracking import Outcome

__all__ = ["FINAL_STATES", "Journal"]

#: Outcome states worth remembering (a 'retry' is not an answer).
FINAL_STATES = frozenset({"sent", "failed", "dead", "suppressed", "skipped"})


class Journal:
    """Recent final outcomes of this process, by (campaign, batch) and index."""

    def __init__(self, *, keep_s: float = 3.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._keep_s = keep_s
        self._clock = clock
        self._by_batch: dict[tuple[str, int], dict[int, Outcome]] = {}
        #: (when written, campaign, batch, index, outcome), oldest first, for pruning.
        self._written: deque[tuple[float, str, int, int, Outcome]] = deque()

    def remember(self, campaign_id: str, batch: int, outcomes: Sequence[Outcome]) -> None:
        """Answers known now, not yet written (kept until they are, and ``keep_s`` after)."""
        known = self._by_batch.setdefault((campaign_id, batch), {})
        for outcome in outcomes:
            if outcome.state in FINAL_STATES:
                known[outcome.index] = outcome

    def written(self, campaign_id: str, batch: int, outcomes: Sequence[Outcome]) -> None:
        """``outcomes`` reached Redis (not yet surely its disk: see :meth:`durable`)."""
        now = self._clock()
        for outcome in outcomes:
            if outcome.state in FINAL_STATES:
                self._written.append((now, campaign_id, batch, outcome.index, outcome))

    def durable(self, seen_at: float) -> None:
        """The same Redis server answered at ``seen_at`` (this journal's clock): what was written
        more than ``keep_s`` before it is on its disk and is forgotten."""
        self._prune(seen_at)

    def known(self, campaign_id: str, batch: int) -> dict[int, Outcome]:
        return self._by_batch.get((campaign_id, batch), {})

    def batches(self) -> Iterator[tuple[str, int, list[Outcome]]]:
        for (campaign_id, batch), known in list(self._by_batch.items()):
            if known:
                yield campaign_id, batch, list(known.values())

    def __len__(self) -> int:
        return sum(len(known) for known in self._by_batch.values())

    def _prune(self, now: float) -> None:
        horizon = now - self._keep_s
        written = self._written
        while written and written[0][0] < horizon:
            _, campaign_id, batch, index, outcome = written.popleft()
            known = self._by_batch.get((campaign_id, batch))
            if known is not None and known.get(index) is outcome:
                del known[index]
                if not known:
                    del self._by_batch[(campaign_id, batch)]
