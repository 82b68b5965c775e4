"""The send path: one batch in, every message claimed, sent once, and recorded.

A batch runs as: claim (dedup) -> for each chunk of the channel's request size, through the
steps ``render -> rate limit -> send with retries`` -> track (buffered confirmations). Rendering
comes before the rate limit because an SMS's cost (its segments) depends on the rendered body.
A step is ``async def step(ctx, items, next)``: it may set a result on
items (they stop there) and passes the others on, in one call or in several smaller ones, so a
test can build the chain with stubs.

The rate-limit step releases a chunk in slices of about ``ACQUIRE_SLICE_S`` of the tightest
limit's traffic (a whole chunk on a fast key, one message at 10/s), each acquired right before it
is sent: a slow campaign is never sent in lumps, and the campaign's state is read again between
two slices and while waiting for one, so a pause or cancel stops the sends within about
``CONTROL_TTL_S``.

Short waits (5xx, timeouts, a 429 with a short Retry-After) are retried in-process with tenacity
(exponential backoff with jitter, Retry-After honoured). A wait longer than the policy's
``long_wait_s`` puts the message back to ``retry`` and the batch goes back to the broker with a
delay, so no worker slot sleeps through it. After ``max_attempts`` the message is dead-lettered,
unless its answers were provider trouble: those wait for the provider (its breaker,
``dispatch.send.health``) until the retry horizon (``dispatch.send.resilience``) has passed.
Every number comes from one :class:`~dispatch.send.retry.RetryPolicy`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import string
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

import redis.asyncio as aredis

from channels.base import Channel, Message, Permanent, Result, Retryable, Sent
from channels.email import Substitution
from channels.errors import PermanentProviderError, ProviderAccountError, RetryableProviderError
from dispatch.plan.manifest import Manifest
from dispatch.plan.snapshot import SnapshotRow, decode_batch
from dispatch.rules.frequency import AsyncFrequencyStore
from dispatch.rules.suppression import AsyncSuppressionStore
from dispatch.send.control import CONTROL_TTL_S
from dispatch.send.health import Admission, ProviderHealth, is_trouble
from dispatch.send.resilience import Resilience
from dispatch.send.retry import RetryPolicy
from dispatch.send.routing import Router
from dispatch.send.tracking import (
    CLAIM_BUSY,
    CLAIM_DONE,
    CLAIM_FRESH,
    CLAIM_RECLAIMED,
    GROUP_STATES,
    GroupOutcome,
    Outcome,
    Tracker,
    make_ref,
)
from dispatch.store import keys
from monitoring.metrics import Metrics
from ratelimit import Limit, RateLimiter

__all__ = [
    "SUBJECT_ATTRIBUTE",
    "BatchFilter",
    "BatchOutcome",
    "Engine",
    "FrequencyFilter",
    "GroupedMode",
    "Item",
    "PerMessageMode",
    "RateLimitStep",
    "SendContext",
    "SendMode",
    "SendStep",
    "Step",
    "SubstitutingChannel",
    "SuppressionFilter",
    "build_chain",
    "chunk_size",
    "group_outcome",
    "limiter_burst",
]

log = logging.getLogger(__name__)

#: Confirmations are written in groups of this many (one Lua call each).
TRACK_FLUSH = 64
#: The row attribute holding a triggered message's own subject (``dispatch.triggered``): one
#: triggered campaign carries messages with different subjects, so its manifest has none. Only
#: a triggered campaign's rows are read for it (an audience column of that name is not a subject).
SUBJECT_ATTRIBUTE = "subject"
#: Messages handed to a per-message channel per call (it sends them concurrently): one pass
#: through the chain, one rate-limit acquisition and one semaphore permit for all of them.
PER_MESSAGE_CHUNK = 8
#: Seconds of the tightest limit's traffic one rate-limit acquisition carries (at least one
#: token): short enough that a slow campaign is released message by message and a pause stops it
#: between two acquisitions, long enough that a fast key costs one acquisition per chunk.
ACQUIRE_SLICE_S = 0.05
#: How long a worker trusts its copy of an account limit's configuration.
ACCOUNT_LIMIT_TTL_S = 5.0


def chunk_size(channel: Channel) -> int:
    return channel.messages_per_request if channel.messages_per_request > 1 else PER_MESSAGE_CHUNK


def limiter_burst(rate: float) -> int:
    """Burst of a campaign's cap: ~100 ms of traffic, at least one token.

    Any 1-s window then holds at most ``rate + burst`` sends: the cap overshoots by a tenth at
    most, and by one message at low rates. Costs above the burst are acquired in slices.
    """
    return max(1, int(rate / 10))


@dataclass(slots=True)
class Item:
    """One message of a batch on its way through the chain."""

    index: int
    recipient_id: str
    address: str
    attrs: dict[str, str] | None
    attempts: int
    message: Message | None = None
    outcome: Outcome | None = None
    #: The provider said the address is bad or opted out: add it to the suppression list.
    suppress: bool = False
    #: A member of the batch's group record (batch channels): confirmed with the group.
    grouped: bool = False
    #: Its last answer was provider trouble (``dispatch.send.health.is_trouble``), not about it.
    trouble: bool = False
    #: The provider that carried its last request ("" before any).
    provider: str = ""
    #: Providers that refused it in a way another may not (``Permanent.reroutable``): skipped.
    excluded: tuple[str, ...] = ()
    #: The provider where its fate is in doubt (``SendStep.in_doubt``): retried there only.
    pinned: str = ""


@dataclass(slots=True)
class SendContext:
    campaign_id: str
    batch: int
    channel: Channel
    manifest: Manifest
    template: string.Template
    retries: int = 0
    long_wait: float = 0.0
    stopped: str | None = None  # "paused" / "cancelled" once seen mid-batch
    #: The body as provider-side substitutions (batch channels that offer it): not rendered here.
    substitution: Substitution | None = None
    #: Reads the campaign's state (the engine's cached view); None: the batch never stops early.
    read_state: Callable[[], Awaitable[str]] | None = None
    #: Until when (epoch s) provider trouble is retried before a message is dead-lettered
    #: (``dispatch.send.resilience``); None: after ``max_attempts``.
    retry_until: float | None = None
    #: The open breaker some of the batch's messages wait for (None: none waited).
    waiting: Admission | None = None
    #: Set when a provider refused the account: the campaign is paused with this reason.
    pause_reason: str | None = None
    pause_provider: str = ""

    async def running(self) -> bool:
        """False once the campaign is seen paused or cancelled (``stopped`` then names the state)."""
        if self.stopped is None and self.read_state is not None:
            state = await self.read_state()
            if state != "running":
                self.stopped = state
        return self.stopped is None

    def hand_back_retry(self, items: Sequence[Item]) -> None:
        """Items that were not sent (no attempt spent): back to ``retry``."""
        for item in items:
            item.outcome = Outcome(item.index, "retry", item.attempts, "", item.outcome.code if item.outcome else "")

    def hand_back(self, items: Sequence[Item]) -> None:
        """Items a stop keeps from the provider: back to ``retry`` on pause, ``skipped`` on cancel."""
        back = "skipped" if self.stopped == "cancelled" else "retry"
        for item in items:
            if item.outcome is None:
                item.outcome = Outcome(item.index, back, item.attempts)


@runtime_checkable
class SubstitutingChannel(Protocol):
    """A channel that personalizes one body per request itself (SendGrid substitutions)."""

    def substitution_template(self, template: str) -> Substitution | None: ...


Next = Callable[[SendContext, list[Item]], Awaitable[None]]
Step = Callable[[SendContext, list[Item], Next], Awaitable[None]]
#: A batch-level step (one Redis round trip per batch, not per message): sets outcomes on the
#: items it stops.
BatchFilter = Callable[[SendContext, list[Item]], Awaitable[None]]


class SuppressionFilter:
    """Re-check opt-outs at send time: an opt-out that arrived after planning is honoured."""

    def __init__(self, store: AsyncSuppressionStore) -> None:
        self._store = store

    async def __call__(self, ctx: SendContext, items: list[Item]) -> None:
        flags = await self._store.contains_many(ctx.channel.name, [item.address for item in items])
        for item, suppressed in zip(items, flags, strict=True):
            if suppressed:
                item.outcome = Outcome(item.index, "suppressed", item.attempts, "", "suppressed")

    async def feed(self, channel: str, addresses: list[str]) -> None:
        """Hard bounces and permanent rejections the provider flagged join the list."""
        if addresses:
            await self._store.add(channel, addresses)


class FrequencyFilter:
    """Enforce the cross-campaign frequency cap at send time (reservations keyed by message)."""

    def __init__(self, store: AsyncFrequencyStore) -> None:
        self._store = store

    async def __call__(self, ctx: SendContext, items: list[Item]) -> None:
        pairs = [
            (item.address, idempotency_key(ctx.campaign_id, item.recipient_id, ctx.channel.name)) for item in items
        ]
        allowed = await self._store.reserve_many(ctx.channel.name, pairs)
        for item, ok in zip(items, allowed, strict=True):
            if not ok:
                item.outcome = Outcome(item.index, "skipped", item.attempts, "", "frequency_capped")


def build_chain(steps: Sequence[Step]) -> Next:
    """Compose steps into one callable; the last step's ``next`` does nothing."""

    async def end(ctx: SendContext, items: list[Item]) -> None:
        return None

    chain: Next = end
    for step in reversed(steps):

        def bind(step: Step, nxt: Next) -> Next:
            async def run(ctx: SendContext, items: list[Item]) -> None:
                await step(ctx, items, nxt)

            return run

        chain = bind(step, chain)
    return chain


def idempotency_key(campaign_id: str, recipient_id: str, channel: str) -> str:
    digest = hashlib.blake2b(f"{campaign_id}\0{recipient_id}\0{channel}".encode(), digest_size=16)
    return digest.hexdigest()


async def render_step(ctx: SendContext, items: list[Item], nxt: Next) -> None:
    """Render each recipient's message (string.Template: names only, no code, no attributes).

    With ``ctx.substitution`` the body stays one template and each message carries its values
    instead: the provider renders, the same text for every recipient as ``safe_substitute``.
    """
    subject = ctx.manifest.subject
    own_subject = ctx.manifest.triggered  # each triggered message carries its own (SUBJECT_ATTRIBUTE)
    substitution = ctx.substitution
    if substitution is not None:
        body = substitution.body
        channel = ctx.channel.name
        for item in items:
            item.message = Message(
                ref=make_ref(ctx.campaign_id, ctx.batch, item.index),
                address=item.address,
                body=body,
                subject=(item.attrs or {}).get(SUBJECT_ATTRIBUTE) if own_subject else subject,
                idempotency_key=idempotency_key(ctx.campaign_id, item.recipient_id, channel),
                attributes=substitution.values(item.attrs),
            )
        await nxt(ctx, items)
        return
    for item in items:
        body = ctx.template.safe_substitute(item.attrs) if item.attrs else ctx.template.template
        item.message = Message(
            ref=make_ref(ctx.campaign_id, ctx.batch, item.index),
            address=item.address,
            body=body,
            subject=(item.attrs or {}).get(SUBJECT_ATTRIBUTE) if own_subject else subject,
            idempotency_key=idempotency_key(ctx.campaign_id, item.recipient_id, ctx.channel.name),
        )
    await nxt(ctx, items)


class RateLimitStep:
    """Acquire the chunk's cost from the provider account's limit and the campaign's cap.

    The campaign cap is read from the campaign's control hash (``dispatch rate``) and pushed to
    the shared limiter when it changes, so a re-rate reaches every worker within a second.

    A chunk goes on in slices of at most ``ACQUIRE_SLICE_S`` of the tightest limit's rate (and
    never more than its burst), each sent as soon as its tokens are granted; a message costing more
    than a slice is acquired in several. Between two acquisitions, and every ``CONTROL_TTL_S``
    while one waits, the campaign's state is read again: once it is paused or cancelled nothing
    more is sent and the rest of the chunk is handed back (``SendContext.hand_back``).
    """

    def __init__(
        self,
        limiter: RateLimiter,
        account_keys: dict[str, str],
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limiter = limiter
        self._account_keys = account_keys
        self._metrics = metrics
        self._clock = clock
        self._campaign_rates: dict[str, float | None] = {}
        #: Account key -> (when read, its limit or None when unlimited).
        self._account_limits: dict[str, tuple[float, Limit | None]] = {}

    def campaign_key(self, campaign_id: str) -> str:
        return f"campaign:{campaign_id}"

    async def set_campaign_rate(self, campaign_id: str, rate: float | None) -> None:
        if self._campaign_rates.get(campaign_id, -1.0) == rate:
            return
        key = self.campaign_key(campaign_id)
        if rate is None:
            await self._limiter.remove(key)
        else:
            await self._limiter.configure(Limit(key=key, rate=rate, burst=limiter_burst(rate)))
        self._campaign_rates[campaign_id] = rate

    async def penalize(self, ctx: SendContext, retry_after: float | None) -> None:
        key = self._account_keys.get(ctx.channel.name)
        if key is not None:
            await self._limiter.penalize(key, retry_after)

    async def slice_tokens(self, campaign_id: str, account: str | None) -> float:
        """Most tokens one acquisition takes: ``inf`` when no key of the chunk is limited."""
        limits: list[tuple[float, int]] = []
        rate = self._campaign_rates.get(campaign_id)
        if rate is not None:
            limits.append((rate, limiter_burst(rate)))
        if account is not None:
            limit = await self._account_limit(account)
            if limit is not None:
                limits.append((limit.rate, limit.burst))
        return min((max(1, min(most, int(per_s * ACQUIRE_SLICE_S))) for per_s, most in limits), default=math.inf)

    async def _account_limit(self, key: str) -> Limit | None:
        now = self._clock()
        cached = self._account_limits.get(key)
        if cached is not None and now - cached[0] < ACCOUNT_LIMIT_TTL_S:
            return cached[1]
        if cached is not None:
            # while one coroutine reads it again, the others keep the last known limit
            self._account_limits[key] = (now, cached[1])
        try:
            limit = await self._limiter.get_limit(key)
        except BaseException:
            self._account_limits.pop(key, None)
            raise
        self._account_limits[key] = (now, limit)
        return limit

    async def __call__(self, ctx: SendContext, items: list[Item], nxt: Next) -> None:
        pending = [item for item in items if item.outcome is None]
        if not pending:
            await nxt(ctx, items)
            return
        limit_keys = [self.campaign_key(ctx.campaign_id)]
        account = self._account_keys.get(ctx.channel.name)
        if account is not None:
            limit_keys.append(account)
        most = await self.slice_tokens(ctx.campaign_id, account)
        costs = [ctx.channel.cost(item.message) if item.message is not None else 0 for item in pending]
        for start, end, cost in _slices(costs, most):
            for piece in _pieces(max(1, cost), most):
                if not await self._acquire(ctx, limit_keys, piece):
                    break
            if not await ctx.running():
                ctx.hand_back(pending[start:])
                return
            await nxt(ctx, pending[start:end])

    async def _acquire(self, ctx: SendContext, limit_keys: list[str], cost: int) -> bool:
        """Wait for ``cost`` tokens; False (the request leaves the queue) once the campaign stops."""
        started = time.perf_counter()
        acquired = True
        if ctx.read_state is None:
            await self._limiter.acquire(limit_keys, cost)
        else:
            waiter = asyncio.ensure_future(self._limiter.acquire(limit_keys, cost))
            try:
                while not waiter.done():
                    await asyncio.wait((waiter,), timeout=CONTROL_TTL_S)
                    if not waiter.done() and not await ctx.running():
                        acquired = False
                        break
                if acquired:
                    waiter.result()
            finally:
                waiter.cancel()
        if self._metrics is not None:
            self._metrics.observe_ratelimit_wait(ctx.channel.provider, time.perf_counter() - started)
        return acquired


def _slices(costs: Sequence[int], most: float) -> list[tuple[int, int, int]]:
    """Consecutive runs ``(start, end, cost)`` of at most ``most`` tokens (a costlier message alone)."""
    runs: list[tuple[int, int, int]] = []
    start, total = 0, 0
    for index, cost in enumerate(costs):
        if index > start and total + cost > most:
            runs.append((start, index, total))
            start, total = index, 0
        total += cost
    runs.append((start, len(costs), total))
    return runs


def _pieces(cost: int, most: float) -> list[int]:
    """``cost`` tokens as acquisitions of at most ``most`` each."""
    if cost <= most:
        return [cost]
    step = int(most)
    return [min(step, cost - taken) for taken in range(0, cost, step)]


@dataclass(slots=True)
class _Round:
    """Messages still retryable after one send round, and the longest wait they asked for."""

    pending: list[Item]
    retry_after: float = 0.0


class SendStep:
    """Send with retries as ``retry`` (a :class:`RetryPolicy`) says; sets each item's outcome.

    With ``health`` (:class:`~dispatch.send.health.ProviderHealth`) every request first asks the
    provider's breaker: while it is open the messages go back to ``retry`` unsent, no attempt
    spent, and ``ctx.waiting`` says for whom (the batch goes back to the broker until the breaker
    lets a probe through). Answers feed the breaker. Provider trouble (:func:`is_trouble`) does
    not use up a message's ``max_attempts``: such a message is dead-lettered only once its retry
    horizon ``ctx.retry_until`` has passed (no horizon known: after ``max_attempts`` as before).
    A provider refusing the account (:class:`ProviderAccountError`: credentials, balance) leaves
    the messages ``retry`` and sets ``ctx.pause_reason``: the campaign pauses, nothing fails.

    With ``routers`` (:class:`~dispatch.send.routing.Router` by channel) a message goes to the
    first of its candidate providers whose breaker admits it, moves on after a ``reroutable``
    refusal, and stays with a provider where its fate is in doubt (:meth:`in_doubt`); see
    ``dispatch.send.routing``. Each item records the provider that carried it (``Item.provider``).
    """

    def __init__(
        self,
        retry: RetryPolicy,
        *,
        on_result: Callable[[SendContext, Item, Result, float], None] | None = None,
        on_rate_limited: Callable[[SendContext, float | None], Awaitable[None]] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: Metrics | None = None,
        health: ProviderHealth | None = None,
        routers: Mapping[str, Router] | None = None,
    ) -> None:
        self._metrics = metrics
        self._retry = retry
        self._on_result = on_result
        self._on_rate_limited = on_rate_limited
        self._sleep = sleep
        self._health = health
        self._routers = dict(routers or {})

    def in_doubt(self, ctx: SendContext, item: Item, provider: str) -> None:
        """The hook for a message whose fate at ``provider`` is in doubt (the request may have been
        accepted). It stays pinned to ``provider`` (``Item.pinned``): retried there only, with the
        same idempotency key, never failed over.

        TODO(reconciliation, issue 17): ask the provider (its lookup API) whether it took the
        message before the retry, and settle it as ``sent`` when it did.
        """
        item.pinned = provider

    async def _admit(self, provider: str) -> Admission:
        if self._health is None:
            return Admission(provider, "closed")
        return await self._health.admit(provider)

    async def _assign(self, ctx: SendContext, items: list[Item]) -> list[tuple[Channel, Admission, list[Item]]]:
        """Each item's provider for this round: its first candidate whose breaker admits it.

        Items no candidate admits go back to ``retry`` (no attempt spent) and ``ctx.waiting``
        names the breaker they wait for.
        """
        router = self._routers.get(ctx.channel.name)
        admissions: dict[str, Admission] = {}
        groups: dict[str, tuple[Channel, list[Item]]] = {}
        for item in items:
            if router is None:
                candidates: Sequence[Channel] = (ctx.channel,)
            else:
                candidates = router.candidates(item.address)
                if item.pinned:
                    pinned = router.adapter(item.pinned)
                    candidates = (pinned,) if pinned is not None else ()
                candidates = [c for c in candidates if c.provider not in item.excluded]
            chosen: Channel | None = None
            for candidate in candidates:
                admission = admissions.get(candidate.provider)
                if admission is None:
                    admission = admissions[candidate.provider] = await self._admit(candidate.provider)
                if admission.send:
                    chosen = candidate
                    break
            if chosen is None:
                first = admissions.get(candidates[0].provider) if candidates else None
                item.outcome = Outcome(item.index, "retry", item.attempts, "", "breaker_open")
                if first is not None:
                    ctx.waiting = first
                    ctx.long_wait = max(ctx.long_wait, first.wait_s(time.time()))
                continue
            groups.setdefault(chosen.provider, (chosen, []))[1].append(item)
        return [(adapter, admissions[name], group) for name, (adapter, group) in groups.items()]

    async def _request(self, ctx: SendContext, adapter: Channel, items: list[Item]) -> tuple[Sequence[Result], float]:
        """One call of ``adapter`` for ``items``: their results and how long it took."""
        messages = [item.message for item in items if item.message is not None]
        started = time.perf_counter()
        try:
            if self._metrics is not None:
                with self._metrics.inflight(adapter.provider, len(messages)):
                    results: Sequence[Result] = await adapter.send(messages)
            else:
                results = await adapter.send(messages)
        except RetryableProviderError as exc:
            results = [Retryable(m.ref, str(exc), exc.status, exc.retry_after) for m in messages]
        except ProviderAccountError:
            raise
        except PermanentProviderError as exc:
            code = exc.code or f"http_{exc.status}"
            results = [Permanent(m.ref, code, str(exc), exc.status) for m in messages]
        return results, time.perf_counter() - started

    async def __call__(self, ctx: SendContext, items: list[Item], nxt: Next) -> None:
        pending = [item for item in items if item.outcome is None]
        if not pending:
            await nxt(ctx, items)
            return
        first = True
        router = self._routers.get(ctx.channel.name)

        async def one_group(adapter: Channel, admission: Admission, current: list[Item], round_: _Round) -> bool:
            """Send ``current`` through ``adapter``; False when the provider refused the account."""
            try:
                results, elapsed = await self._request(ctx, adapter, current)
            except ProviderAccountError as exc:
                # the account is refused: no message is at fault, none is spent; pause the campaign
                ctx.pause_reason = f"provider {adapter.provider} refused the account: {exc}"
                ctx.pause_provider = adapter.provider
                ctx.hand_back_retry(current)
                return False
            ok = bad = 0
            trouble_reason = ""
            rate_limited = False
            for item, result in zip(current, results, strict=True):
                item.attempts += 1
                item.provider = adapter.provider
                if self._on_result is not None:
                    self._on_result(ctx, item, result, elapsed)
                if isinstance(result, Sent):
                    ok += 1
                    item.outcome = Outcome(item.index, "sent", item.attempts, result.provider_id)
                elif isinstance(result, Permanent):
                    ok += 1  # an answer about the message: the provider works
                    item.outcome = Outcome(item.index, "failed", item.attempts, "", result.code)
                    item.suppress = result.suppress
                    if result.reroutable and router is not None:
                        item.excluded = (*item.excluded, adapter.provider)
                        others = [c for c in router.candidates(item.address) if c.provider not in item.excluded]
                        if others:  # another provider may take it: next round, not a failure
                            item.outcome = Outcome(item.index, "retry", item.attempts, "", result.code)
                            round_.pending.append(item)
                else:
                    item.trouble = is_trouble(result)
                    if result.ambiguous and router is not None:
                        self.in_doubt(ctx, item, adapter.provider)
                    if item.trouble:
                        bad += 1
                        trouble_reason = result.reason
                    round_.pending.append(item)
                    round_.retry_after = max(round_.retry_after, result.retry_after or 0.0)
                    rate_limited = rate_limited or result.status == 429
                    item.outcome = Outcome(item.index, "retry", item.attempts, "", f"http_{result.status or 0}")
            if self._health is not None:
                await self._health.record(adapter.provider, ok, bad, trouble_reason, probe=admission.verdict == "probe")
            if rate_limited and self._on_rate_limited is not None:
                await self._on_rate_limited(ctx, round_.retry_after or None)
            return True

        async def one_round() -> _Round:
            nonlocal first
            current = list(pending)
            round_ = _Round([])
            pending[:] = []
            if ctx.pause_reason is not None:  # another chunk found the account refused: stop here too
                ctx.hand_back_retry(current)
                return round_
            groups = await self._assign(ctx, current)
            if not first:
                ctx.retries += sum(len(group) for _, _, group in groups)
            first = False
            # the one place a request's provider is chosen: each group goes to its adapter
            await asyncio.gather(
                *(one_group(adapter, admission, group, round_) for adapter, admission, group in groups)
            )
            if ctx.pause_reason is not None:
                for item in round_.pending:
                    item.outcome = Outcome(
                        item.index, "retry", item.attempts, "", item.outcome.code if item.outcome else ""
                    )
                round_.pending.clear()
            pending[:] = round_.pending
            return round_

        # The first round runs bare: most sends succeed, and a tenacity loop costs more CPU than
        # the request itself. Only messages that need a retry enter the policy.
        retry = self._retry
        last: _Round | None = await one_round()
        if last is not None and not retry.gives_up(last):
            await self._sleep(retry.first_retry_wait(last.retry_after))
            last = await retry.send_retrying(self._sleep)(one_round)
        if last is not None and last.pending:
            out_of_time = ctx.retry_until is None or time.time() >= ctx.retry_until
            for item in last.pending:
                if item.attempts >= retry.max_attempts and (out_of_time or not item.trouble):
                    code = item.outcome.code if item.outcome else "retry_exhausted"
                    item.outcome = Outcome(item.index, "dead", item.attempts, "", code)
            ctx.long_wait = max(ctx.long_wait, last.retry_after)
        await nxt(ctx, items)


class Engine:
    """Runs batches for one worker process. All collaborators are passed in."""

    def __init__(
        self,
        *,
        client: aredis.Redis,
        tracker: Tracker,
        channels: dict[str, Channel],
        steps: Sequence[Step],
        owner: str,
        concurrency: int,
        metrics: Metrics | None = None,
        rate_step: RateLimitStep | None = None,
        filters: Sequence[BatchFilter] = (),
        suppression: SuppressionFilter | None = None,
        resilience: Resilience | None = None,
    ) -> None:
        #: Retry horizons, waiting and paused campaigns, the batch log line (None: none of them).
        self._resilience = resilience
        self._filters = list(filters)
        self._suppression = suppression
        self._recorder: _Recorder = _MetricsRecorder(metrics) if metrics is not None else _NoMetrics()
        self._rate_step = rate_step
        #: Campaigns this process worked on recently (for progress gauges): id -> last seen.
        self.seen: dict[str, float] = {}
        self._client = client
        self._tracker = tracker
        self._channels = channels
        self._chain = build_chain(steps)
        self._owner = owner
        # one permit per chunk: at most ``concurrency`` provider requests in flight
        self._sem = asyncio.Semaphore(max(1, concurrency // PER_MESSAGE_CHUNK))
        self._manifests: dict[str, Manifest] = {}
        self._control: dict[str, tuple[float, str]] = {}
        #: Batches running in this process: a second run of one waits (see claim.lua).
        self._active: set[tuple[str, int]] = set()

    async def _manifest(self, campaign_id: str) -> Manifest:
        manifest = self._manifests.get(campaign_id)
        if manifest is None:
            raw = await self._client.get(keys.manifest(campaign_id))
            if raw is None:
                raise LookupError(f"campaign {campaign_id!r} has no manifest")
            manifest = Manifest.decode(raw, campaign_id=campaign_id)
            if len(self._manifests) > 256:
                self._manifests.clear()
            self._manifests[campaign_id] = manifest
        return manifest

    async def campaign_state(self, campaign_id: str) -> str:
        cached = self._control.get(campaign_id)
        now = time.monotonic()
        if cached is not None and now - cached[0] < CONTROL_TTL_S:
            return cached[1]
        if cached is not None:
            # while one coroutine refreshes, the others keep the last known state; with nothing
            # known yet, each reads for itself (never assume "running")
            self._control[campaign_id] = (now, cached[1])
        try:
            raw, rate = cast(list[bytes | None], await self._client.hmget(keys.control(campaign_id), ["state", "rate"]))
            if self._rate_step is not None:
                cached_manifest = self._manifests.get(campaign_id)
                manifest_rate = cached_manifest.rate if cached_manifest is not None else None
                await self._rate_step.set_campaign_rate(campaign_id, float(rate) if rate else manifest_rate)
        except BaseException:
            self._control.pop(campaign_id, None)
            raise
        state = raw.decode() if raw else "planned"
        self._control[campaign_id] = (now, state)
        return state

    async def send_batch(self, campaign_id: str, batch: int) -> BatchOutcome:
        run = (campaign_id, batch)
        if run in self._active:
            return BatchOutcome(state="busy", requeue_after=1.0)
        self._active.add(run)
        self.seen[campaign_id] = time.time()
        self._recorder.batch("started")
        try:
            outcome = await self._send_batch(campaign_id, batch)
        except BaseException:
            self._recorder.batch("failed")
            raise
        finally:
            self._active.discard(run)
        self._recorder.batch("retried" if outcome.requeue_after is not None else "completed")
        return outcome

    async def _send_batch(self, campaign_id: str, batch: int) -> BatchOutcome:
        """Claim the batch's messages, filter them, send them through the chain, confirm them.

        How messages are claimed and confirmed depends on the channel (:class:`SendMode`): one
        record per message, or one group record for a batch API's request.
        """
        manifest = await self._manifest(campaign_id)
        state = await self.campaign_state(campaign_id)
        if state != "running":
            return BatchOutcome(state=state, requeue_after=1.0 if state in {"paused", "planned"} else None)
        channel = self._channels[manifest.channel]
        raw_batch = cast(bytes | None, await self._client.get(keys.batch(campaign_id, batch)))
        snapshot = decode_batch(campaign_id, batch, raw_batch)
        if snapshot.not_before > time.time():
            return BatchOutcome(state="waiting", requeue_after=snapshot.not_before - time.time())
        mode_class = GroupedMode if channel.messages_per_request > 1 else PerMessageMode
        mode: SendMode = mode_class(self._tracker, self._owner, campaign_id, batch, channel)
        claimed = await mode.claim(snapshot.rows)
        if claimed is None:
            self._control.pop(campaign_id, None)
            state = await self.campaign_state(campaign_id)
            return BatchOutcome(state=state, requeue_after=1.0 if state == "paused" else None)
        self._recorder.dedup_hits(channel, claimed.dedup_hits)
        await mode.lose(claimed.lost)
        ctx = SendContext(
            campaign_id=campaign_id,
            batch=batch,
            channel=channel,
            manifest=manifest,
            template=string.Template(manifest.body),
            read_state=lambda: self.campaign_state(campaign_id),
        )
        mode.prepare(ctx)
        if self._resilience is not None:
            await self._resilience.before(ctx, manifest.deadline, claimed.items)
        items = claimed.items
        filtered = await self._filter(ctx, items)
        mode.hold(filtered)
        self._recorder.sends(channel, filtered)
        await self._send_chunks(ctx, mode, [item for item in items if item.outcome is None])
        await mode.close(ctx, items)
        if self._suppression is not None:
            await self._suppression.feed(channel.name, [item.address for item in items if item.suppress])
        # -- provider trouble (dispatch.send.resilience): a refused account pauses the campaign
        if self._resilience is not None and await self._resilience.after(ctx, items):
            self._control.pop(campaign_id, None)
            return BatchOutcome(state="paused", requeue_after=1.0)
        if ctx.stopped == "paused" or claimed.busy:
            return BatchOutcome(state=ctx.stopped or "busy", requeue_after=1.0)
        if any(item.outcome is not None and item.outcome.state == "retry" for item in items):
            return BatchOutcome(state="retry", requeue_after=max(ctx.long_wait, 1.0))
        return BatchOutcome(state="done", requeue_after=None)

    async def _filter(self, ctx: SendContext, items: list[Item]) -> list[Outcome]:
        """Run the batch filters; the outcomes they set (a message stopped before any send)."""
        for batch_filter in self._filters:
            open_items = [item for item in items if item.outcome is None]
            if open_items:
                await batch_filter(ctx, open_items)
        return [item.outcome for item in items if item.outcome is not None]

    async def _send_chunks(self, ctx: SendContext, mode: SendMode, pending: list[Item]) -> None:
        """Send ``pending`` in chunks of the channel's request size, at most the semaphore's at once."""
        channel = ctx.channel
        size = chunk_size(channel)
        chunks = [pending[i : i + size] for i in range(0, len(pending), size)]

        async def run_chunk(chunk: list[Item]) -> None:
            async with self._sem:
                if await ctx.running():
                    await self._chain(ctx, chunk)
                else:
                    # pause: hand the message back untouched; cancel: it is not sent
                    ctx.hand_back(chunk)
            done: list[Outcome] = []
            for item in chunk:
                if item.outcome is None:  # a step dropped it without a verdict: try again later
                    item.outcome = Outcome(item.index, "retry", item.attempts)
                done.append(item.outcome)
            self._recorder.sends(channel, done)
            await mode.confirm(done)

        await asyncio.gather(*(run_chunk(chunk) for chunk in chunks))


class _Recorder(Protocol):
    """What the engine reports about batches and sends."""

    def batch(self, state: str) -> None: ...

    def dedup_hits(self, channel: Channel, n: int) -> None: ...

    def sends(self, channel: Channel, outcomes: Sequence[Outcome]) -> None: ...


class _MetricsRecorder:
    """Reports to a metrics registry."""

    __slots__ = ("_metrics",)

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def batch(self, state: str) -> None:
        self._metrics.record_batch(state)

    def dedup_hits(self, channel: Channel, n: int) -> None:
        if n:
            self._metrics.record_dedup_hit(channel.name, n)

    def sends(self, channel: Channel, outcomes: Sequence[Outcome]) -> None:
        """Final outcomes on the messages counter, one increment per outcome kind."""
        if not outcomes:
            return
        counts: dict[str, int] = {}
        for outcome in outcomes:
            counts[outcome.state] = counts.get(outcome.state, 0) + 1
        for state, n in counts.items():
            final = _FINAL_OUTCOMES.get(state)
            if final is not None:
                self._metrics.record_send(channel.name, channel.provider, final, n)


class _NoMetrics:
    """The recorder of an engine without a metrics registry: records nothing."""

    __slots__ = ()

    def batch(self, state: str) -> None:
        pass

    def dedup_hits(self, channel: Channel, n: int) -> None:
        pass

    def sends(self, channel: Channel, outcomes: Sequence[Outcome]) -> None:
        pass


class SendMode(Protocol):
    """How one run of a batch claims and confirms its messages (one object per run).

    The engine calls, in order: ``claim``; ``lose`` with the messages lost in flight; ``prepare``
    with the run's context; ``hold`` with the outcomes the filters set; ``confirm`` once per sent
    chunk; ``close`` once every chunk is done.
    """

    async def claim(self, rows: list[Any]) -> _Claimed | None:
        """Claim the batch's messages; None when the batch is owned by a live run elsewhere."""
        ...

    async def lose(self, lost: list[Outcome]) -> None: ...

    def prepare(self, ctx: SendContext) -> None: ...

    def hold(self, outcomes: list[Outcome]) -> None: ...

    async def confirm(self, outcomes: list[Outcome]) -> None: ...

    async def close(self, ctx: SendContext, items: list[Item]) -> None: ...


class _ModeBase:
    """What both send modes know of their run: the tracker, this worker, the batch and its channel."""

    def __init__(self, tracker: Tracker, owner: str, campaign_id: str, batch: int, channel: Channel) -> None:
        self._tracker = tracker
        self._owner = owner
        self._campaign_id = campaign_id
        self._batch = batch
        self._channel = channel


class PerMessageMode(_ModeBase):
    """Per-message channels: one record per message, claimed before the send; confirmations are
    buffered and written ``TRACK_FLUSH`` at a time."""

    def __init__(self, tracker: Tracker, owner: str, campaign_id: str, batch: int, channel: Channel) -> None:
        super().__init__(tracker, owner, campaign_id, batch, channel)
        self._buffer: list[Outcome] = []

    async def claim(self, rows: list[Any]) -> _Claimed | None:
        claims = await self._tracker.claim(self._campaign_id, self._batch, self._owner, list(range(len(rows))))
        if claims is None:
            return None
        claimed = _Claimed(self._channel.supports_idempotency, rows)
        for index, (code, attempts) in enumerate(claims):
            claimed.take(index, code, attempts, grouped=False)
        return claimed

    async def lose(self, lost: list[Outcome]) -> None:
        if lost:
            await self._tracker.finish(self._campaign_id, self._batch, self._owner, lost)

    def prepare(self, ctx: SendContext) -> None:
        pass

    def hold(self, outcomes: list[Outcome]) -> None:
        self._buffer.extend(outcomes)

    async def confirm(self, outcomes: list[Outcome]) -> None:
        self._buffer.extend(outcomes)
        if len(self._buffer) >= TRACK_FLUSH:
            await self._flush()

    async def close(self, ctx: SendContext, items: list[Item]) -> None:
        await self._flush()
        if ctx.retries:
            await self._tracker.finish(self._campaign_id, self._batch, self._owner, [], retries=ctx.retries)

    async def _flush(self) -> None:
        if self._buffer:
            taken = self._buffer[:]
            self._buffer.clear()
            await self._tracker.finish(self._campaign_id, self._batch, self._owner, taken)


class GroupedMode(_ModeBase):
    """Batch channels: one group record for the messages without a record of their own, confirmed
    once for the whole run (the group's outcome, and the exceptions)."""

    def __init__(self, tracker: Tracker, owner: str, campaign_id: str, batch: int, channel: Channel) -> None:
        super().__init__(tracker, owner, campaign_id, batch, channel)
        self._lost: list[Outcome] = []

    async def claim(self, rows: list[Any]) -> _Claimed | None:
        claim = await self._tracker.claim_group(self._campaign_id, self._batch, self._owner, len(rows))
        if claim is None:
            return None
        claimed = _Claimed(self._channel.supports_idempotency, rows)
        others = claim.others
        if not others and claim.code == CLAIM_FRESH and (claim.first, claim.last) == (0, len(rows) - 1):
            # the usual run: every message is a member of a group claimed just now
            attempts = claim.attempts
            claimed.items = [
                Item(i, row.recipient_id, row.address, row.attrs, attempts, grouped=True) for i, row in enumerate(rows)
            ]
            return claimed
        for index in range(len(rows)):
            other = others.get(index)
            if other is not None:
                claimed.take(index, other[0], other[1], grouped=False)
            elif claim.first <= index <= claim.last:
                claimed.take(index, claim.code, claim.attempts, grouped=True)
        return claimed

    async def lose(self, lost: list[Outcome]) -> None:
        self._lost = lost  # written with the group's confirmation

    def prepare(self, ctx: SendContext) -> None:
        if isinstance(self._channel, SubstitutingChannel):
            ctx.substitution = self._channel.substitution_template(ctx.manifest.body)

    def hold(self, outcomes: list[Outcome]) -> None:
        pass  # the items carry them: ``group_outcome`` reads them in ``close``

    async def confirm(self, outcomes: list[Outcome]) -> None:
        pass

    async def close(self, ctx: SendContext, items: list[Item]) -> None:
        group, singles = group_outcome(ctx, items)
        singles.extend(self._lost)
        if group is not None or singles or ctx.retries:
            await self._tracker.finish_group(
                self._campaign_id, self._batch, self._owner, singles, group, retries=ctx.retries
            )


class _Claimed:
    """What a claim gave: messages to send, messages lost in flight (a dead worker's claims on a
    channel without idempotency keys), and counts of busy and already-done ones."""

    __slots__ = ("busy", "dedup_hits", "items", "lost", "rows", "supports_idempotency")

    def __init__(self, supports_idempotency: bool, rows: list[SnapshotRow]) -> None:
        self.supports_idempotency = supports_idempotency
        self.rows = rows
        self.items: list[Item] = []
        self.lost: list[Outcome] = []
        self.busy = self.dedup_hits = 0

    def take(self, index: int, code: int, attempts: int, *, grouped: bool) -> None:
        if code == CLAIM_DONE:
            self.dedup_hits += 1
        elif code == CLAIM_BUSY:
            self.busy += 1
        elif code == CLAIM_RECLAIMED and not self.supports_idempotency:
            self.lost.append(Outcome(index, "dead", attempts, "", "inflight_unknown"))
        else:
            row = self.rows[index]
            self.items.append(Item(index, row.recipient_id, row.address, row.attrs, attempts, grouped=grouped))


def group_outcome(ctx: SendContext, items: Sequence[Item]) -> tuple[GroupOutcome | None, list[Outcome]]:
    """Split a run's outcomes into the one most group members share and everyone else's.

    A member joins the group's outcome when its state can be a group state and its provider id is
    empty or the group's prefix followed by its ref; any other outcome is written as a record of
    its own (and a message that is not a group member always is).
    """
    singles: list[Outcome] = []
    keyed: list[tuple[tuple[str, int, str, str], Outcome]] = []
    counts: dict[tuple[str, int, str, str], int] = {}
    for item in items:
        outcome = item.outcome
        if outcome is None:
            continue
        if not item.grouped or outcome.state not in GROUP_STATES:
            singles.append(outcome)
            continue
        pid = outcome.provider_id
        if pid:
            ref = item.message.ref if item.message is not None else make_ref(ctx.campaign_id, ctx.batch, item.index)
            if len(pid) <= len(ref) or not pid.endswith(ref) or "|" in pid:
                singles.append(outcome)
                continue
            prefix = pid[: -len(ref)]
        else:
            prefix = ""
        key = (outcome.state, outcome.attempts, prefix, outcome.code)
        counts[key] = counts.get(key, 0) + 1
        keyed.append((key, outcome))
    if not counts:
        return None, singles
    best = max(counts, key=lambda k: counts[k])
    singles.extend(outcome for key, outcome in keyed if key != best)
    return GroupOutcome(best[0], best[1], best[2], best[3]), singles


#: Record states that end a message's send, and their metric outcome ("sent" is counted here).
_FINAL_OUTCOMES: dict[str, Any] = {
    "sent": "sent",
    "failed": "failed",
    "dead": "dead_lettered",
    "suppressed": "suppressed",
    "skipped": "skipped",
}


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What the actor does next: nothing, or send the batch again after ``requeue_after`` s."""

    state: str
    requeue_after: float | None
