"""The sealer of triggered micro-batches: open batch -> sealed snapshot batch -> one enqueue.

``dispatch.triggered.accept`` appends each accepted message to its campaign's open batch. This task
(one per API process) closes open batches and hands them to the broker:

* **linger**: after a request opens or extends a batch, the task waits ``linger_s`` (50 ms),
  collecting more messages, then runs ``triggered/seal.lua`` for each campaign it touched; a batch
  the accept script sealed at :data:`~dispatch.triggered.accept.SEAL_SIZE` rows (or a held message's
  own batch) is enqueued at once, without lingering.
* **enqueue**: each sealed batch is enqueued once (the sync dramatiq enqueue runs on a thread, via
  the ``enqueue`` coroutine passed in), then removed from :data:`~dispatch.triggered.accept.TO_ENQUEUE`.
* **sweep** (every ``sweep_every_s``): seal every registered campaign's open batch, whichever
  process opened it (a process that died leaves one behind), close campaigns whose hour ended
  :data:`CLOSE_GRACE_S` ago (their manifest's ``accepted`` becomes exact), and re-enqueue members of
  ``TO_ENQUEUE`` older than ``stale_after_s`` (a crash between sealing and enqueueing). A batch
  enqueued twice is harmless: the worker's claims dedup every message.

Sealing is one Lua script per campaign, so any number of sealers (in any number of processes) can
run at once: each batch is sealed by exactly one of them. :meth:`TriggeredSealer.flush` seals and
enqueues everything now (tests, shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from importlib import resources
from typing import Final, cast

import redis
import redis.asyncio as aredis

from dispatch.store import keys
from dispatch.triggered.accept import (
    REGISTRY,
    TO_ENQUEUE,
    AsyncEnqueue,
    batch_prefix,
    closes_at,
    open_prefix,
    parse_member,
    state_key,
)

__all__ = ["TriggeredSealer"]

log = logging.getLogger(__name__)

#: A campaign is closed this long after its hour ends (clocks of API processes may differ a little).
CLOSE_GRACE_S: Final = 300.0
#: How long stopping waits for the task and for the last flush.
STOP_TIMEOUT_S: Final = 5.0
#: Members re-enqueued per sweep at most.
_SWEEP_LIMIT: Final = 500


class TriggeredSealer:
    """Seals open triggered batches and enqueues sealed ones (see the module docstring)."""

    def __init__(
        self,
        client: aredis.Redis,
        enqueue: AsyncEnqueue,
        *,
        ttl_s: int,
        linger_s: float = 0.05,
        sweep_every_s: float = 1.0,
        stale_after_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._enqueue = enqueue
        self._ttl = ttl_s
        self._linger = linger_s
        self._sweep_every = sweep_every_s
        self._stale_after = stale_after_s
        self._clock = clock
        self._seal = client.register_script(
            resources.files("dispatch.triggered").joinpath("seal.lua").read_text(encoding="utf-8")
        )
        self._dirty: set[str] = set()
        self._sealed: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        #: batches this sealer enqueued (sealed here or swept), for tests and benchmarks
        self.enqueued = 0

    # --- called by the sender (event loop, no await) ---------------------------------------------

    def note_open(self, campaign_id: str) -> None:
        if campaign_id not in self._dirty:
            self._dirty.add(campaign_id)
            self._wake.set()

    def note_sealed(self, member: str) -> None:
        self._sealed.append(member)
        self._wake.set()

    # --- the work ------------------------------------------------------------------------------

    async def seal(self, campaign_id: str) -> str | None:
        """Seal the campaign's open batch; the ``TO_ENQUEUE`` member, or None when none was open."""
        now = self._clock()
        raw = await self._seal(
            keys=[state_key(campaign_id), keys.manifest(campaign_id), TO_ENQUEUE, REGISTRY],
            args=[
                campaign_id,
                batch_prefix(campaign_id),
                open_prefix(campaign_id),
                self._ttl,
                f"{now:.3f}",
                "1" if now >= closes_at(campaign_id) + CLOSE_GRACE_S else "0",
            ],
        )
        return bytes(raw).decode() if raw else None

    async def enqueue(self, members: list[str]) -> None:
        """Enqueue each sealed batch once, then forget it in ``TO_ENQUEUE``."""
        if not members:
            return
        now = self._clock()
        for member in dict.fromkeys(members):
            cid, n, not_before = parse_member(member)
            await self._enqueue(cid, n, max(0, int((not_before - now) * 1000)))
            self.enqueued += 1
        await self._client.zrem(TO_ENQUEUE, *members)

    async def flush(self) -> None:
        """Seal what this process touched and enqueue everything sealed so far."""
        async with self._lock:
            dirty, self._dirty = self._dirty, set()
            sealed = [member for cid in sorted(dirty) if (member := await self.seal(cid)) is not None]
            sealed, self._sealed = [*self._sealed, *sealed], []
            await self.enqueue(sealed)

    async def sweep(self) -> int:
        """Seal every registered campaign's open batch and re-enqueue stale sealed batches;
        returns how many batches were enqueued."""
        async with self._lock:
            sealed: list[str] = []
            for raw in cast(list[bytes], await self._client.zrange(REGISTRY, 0, -1)):
                member = await self.seal(raw.decode())
                if member is not None:
                    sealed.append(member)
            stale = cast(
                list[bytes],
                await self._client.zrangebyscore(
                    TO_ENQUEUE, "-inf", f"{self._clock() - self._stale_after:.3f}", start=0, num=_SWEEP_LIMIT
                ),
            )
            members = [*sealed, *(m.decode() for m in stale)]
            await self.enqueue(members)
            return len(set(members))

    async def run(self) -> None:
        """Seal and enqueue until cancelled; Redis or broker errors are logged and retried."""
        next_sweep = time.monotonic()
        while True:
            try:
                if not self._dirty and not self._sealed:
                    # asyncio.timeout, not wait_for: 3.11's wait_for can hang a cancelled task
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, next_sweep - time.monotonic())):
                            await self._wake.wait()
                self._wake.clear()
                if self._sealed:  # full or held batches: enqueue now, before lingering
                    async with self._lock:
                        sealed, self._sealed = self._sealed, []
                        await self.enqueue(sealed)
                if self._dirty:
                    await asyncio.sleep(self._linger)
                    await self.flush()
                if time.monotonic() >= next_sweep:
                    await self.sweep()
                    next_sweep = time.monotonic() + self._sweep_every
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as exc:
                log.warning("triggered sealer: %s (retrying; sealed batches wait in the sweep set)", exc)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("triggered sealer failed a round (retrying)")
                await asyncio.sleep(0.5)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="dispatch-triggered-sealer")

    async def stop(self) -> None:
        """Stop the task and seal/enqueue what is left (best effort: the sweep of another or a
        later process picks up anything this misses)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=STOP_TIMEOUT_S)
            self._task = None
        with contextlib.suppress(redis.RedisError, OSError, TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await self.flush()
