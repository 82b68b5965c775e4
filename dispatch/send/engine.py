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

import redis
import redis.asyncio as aredis

from channels.base import Channel, InFlight, Message, Permanent, Result, Retryable, Sent
from channels.email import Substitution
from channels.errors import PermanentProviderError, ProviderAccountError, RetryableProviderError
from dispatch.plan.manifest import Manifest
from dispatch.plan.snapshot import SnapshotRow, decode_batch
from dispatch.rules.frequency import AsyncFrequencyStore
from dispatch.rules.suppression import AsyncSuppressionStore
from dispatch.send.control import CONTROL_TTL_S
from dispatch.send.fence import RecentFence
from dispatch.send.health import Admission, ProviderHealth, is_trouble
from dispatch.send.journal import Journal
from dispatch.send.reconcile import Reconciler, Verdict
from dispatch.send.resilience import Resilience
from dispatch.send.retry import RetryPolicy
from dispatch.send.routing import Router
from dispatch.send.tracking import (
    BATCH_BUSY,
    CLAIM_BUSY,
    CLAIM_DONE,
    CLAIM_FRESH,
    CLAIM_IN_DOUBT,
    GROUP_FIELD,
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
    "render",
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
#: How often the engine reads Redis's run id to notice a restart (``Engine.check_redis``).
RUN_ID_CHECK_S = 0.5
#: How long new requests wait after a Redis restart is noticed, while every live worker writes
#: again what it knows (its journal and its requests on the wire): several heartbeats.
SETTLE_S = 2.0
#: Rounds of "reconcile what a lost answer left in doubt, send again what never arrived" per run.
SETTLE_ROUNDS = 2
#: Seconds between a lost answer and asking the provider about it (its list may trail by a moment).
LOOKUP_DELAY_S = 0.5
#: When messages stay in doubt (the evidence may still come), the batch comes back this much later.
IN_DOUBT_RECHECK_S = 5.0


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
    #: Its request may have reached the provider and no answer says what became of it: it is
    #: reconciled (``dispatch.send.reconcile``) before anything is sent again.
    doubt: bool = False
    #: When its request in doubt was issued (epoch s) and to which provider.
    issued_at: float | None = None
    #: Another run issued it first (or it is final already): this run leaves it alone.
    foreign: bool = False
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
    #: Marks items ``sending`` as their request is issued and answers those that may go to the provider named (the
    #: others have ``foreign`` set, or an outcome such as a late opt-out); None: all may go.
    issue: Callable[[list[Item], str], Awaitable[list[Item]]] | None = None
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
    render(ctx, items)
    await nxt(ctx, items)


def render(ctx: SendContext, items: Sequence[Item]) -> None:
    """Set each item's ``message`` (``render_step`` without the chain)."""
    subject = ctx.manifest.subject
    own_subject = ctx.manifest.triggered  # each triggered message carries its own (SUBJECT_ATTRIBUTE)
    substitution = ctx.substitution
    channel = ctx.channel.name
    if substitution is not None:
        body = substitution.body
        for item in items:
            item.message = Message(
                ref=make_ref(ctx.campaign_id, ctx.batch, item.index),
                address=item.address,
                body=body,
                subject=(item.attrs or {}).get(SUBJECT_ATTRIBUTE) if own_subject else subject,
                idempotency_key=idempotency_key(ctx.campaign_id, item.recipient_id, channel),
                attributes=substitution.values(item.attrs),
            )
        return
    template = ctx.template
    for item in items:
        item.message = Message(
            ref=make_ref(ctx.campaign_id, ctx.batch, item.index),
            address=item.address,
            body=template.safe_substitute(item.attrs) if item.attrs else template.template,
            subject=(item.attrs or {}).get(SUBJECT_ATTRIBUTE) if own_subject else subject,
            idempotency_key=idempotency_key(ctx.campaign_id, item.recipient_id, channel),
        )


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
        """A message whose fate at ``provider`` is in doubt (the request may have been accepted)
        stays pinned to ``provider`` (``Item.pinned``), never failed over: a provider honouring our
        idempotency key gets it again with the same key; any other is asked first (the engine
        reconciles it, ``dispatch.send.reconcile``) and gets it again only if it never had it."""
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
            if ctx.issue is not None:
                # the moment the requests are issued: only now do they become 'sending'
                current = await ctx.issue(current, adapter.provider)
                if not current:
                    return True
            try:
                results, elapsed = await self._request(ctx, adapter, current)
            except ProviderAccountError as exc:
                # the account is refused: no message is at fault, none is spent; pause the campaign
                ctx.pause_reason = f"provider {adapter.provider} refused the account: {exc}"
                ctx.pause_provider = adapter.provider
                ctx.hand_back_retry(current)
                return False
            issued_at = time.time() - elapsed
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
                    if item.trouble:
                        bad += 1
                        trouble_reason = result.reason
                    if result.ambiguous:
                        self.in_doubt(ctx, item, adapter.provider)
                        if not adapter.supports_idempotency:
                            # the request may have been accepted: a blind resend could duplicate
                            # it; the engine reconciles it after the chunks (dispatch.send.reconcile)
                            item.doubt = True
                            item.issued_at = issued_at
                            item.outcome = None
                            continue
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
        reconciler: Reconciler | None = None,
        journal: Journal | None = None,
        fence: RecentFence | None = None,
        adapters: Mapping[str, Channel] | None = None,
        resilience: Resilience | None = None,
    ) -> None:
        #: Retry horizons, waiting and paused campaigns, the batch log line (None: none of them).
        self._resilience = resilience
        self._filters = list(filters)
        self._suppression = suppression
        self._metrics = metrics
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
        #: The send mode of every running batch (its requests on the wire, for ``reassert``).
        self._modes: dict[tuple[str, int], SendMode] = {}
        self._reconciler = reconciler if reconciler is not None else Reconciler(policies={"*": "hold"}, wait_s=0.0)
        self.journal = journal if journal is not None else Journal()
        self._fence = fence
        #: Every provider's adapter by provider name (a message in doubt is asked where it went).
        self._adapters: dict[str, Channel] = {c.provider: c for c in channels.values()}
        self._adapters.update(adapters or {})
        #: The Redis server's run id as last seen, when it was read, and until when issuing waits
        #: after a restart (every worker re-asserts what it knows first: ``reassert``).
        self._run_id: str | None = None
        self._run_id_read = -math.inf
        self._settle_until = 0.0

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

    def active_runs(self) -> list[tuple[str, int]]:
        """The batches this process is sending now (read from other threads: a copy)."""
        for _ in range(3):
            try:
                return list(self._active)
            except RuntimeError:  # changed size while copied: try again
                continue
        return []

    # -- Redis restarts -------------------------------------------------------------------------

    async def check_redis(self, *, every_s: float = RUN_ID_CHECK_S) -> bool:
        """Read the server's run id (at most every ``every_s``); when it changed, Redis restarted
        and may have lost its last writes: write again what this process knows (``reassert``)
        and hold new requests for ``SETTLE_S``, so every live worker re-asserts its own first.
        Returns True when a restart was seen now."""
        now = time.monotonic()
        if now - self._run_id_read < every_s:
            return False
        self._run_id_read = now
        info = await self._client.info("server")
        run_id = str(info.get("run_id", ""))
        previous, self._run_id = self._run_id, run_id
        if previous is None or previous == run_id:
            if previous is not None:
                # the same server since the last look: what was written before is on its disk
                self.journal.durable(self._journal_clock_at(now))
            return False
        self._settle_until = time.monotonic() + SETTLE_S
        outcomes, inflight = await self.reassert()
        log.warning(
            "redis restarted (run id changed): re-asserted %d recent outcomes and %d requests in flight; "
            "new requests wait %.1f s",
            outcomes,
            inflight,
            SETTLE_S,
        )
        if self._metrics is not None:
            self._metrics.record_redis_restart()
        return True

    def _journal_clock_at(self, monotonic_now: float) -> float:
        """``monotonic_now`` less the time since the previous check: only what was written before
        the previous look at the same server is surely durable now."""
        return monotonic_now - RUN_ID_CHECK_S

    async def reassert(self) -> tuple[int, int]:
        """Write again every outcome the journal remembers and every request this process has on
        the wire (a restarted Redis may have lost them); idempotent. Returns both counts."""
        outcomes = 0
        for campaign_id, batch, known in self.journal.batches():
            entries = [(str(o.index), o.attempts, "") for o in known]
            await self._tracker.issue(campaign_id, batch, self._owner, entries)
            await self._tracker.finish(campaign_id, batch, self._owner, known)
            outcomes += len(known)
        inflight = 0
        for mode in list(self._modes.values()):
            inflight += await mode.reassert()
        return outcomes, inflight

    async def _settled(self) -> None:
        """Wait out the settle window after a Redis restart (see ``check_redis``)."""
        await self.check_redis()
        wait = self._settle_until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    # -- batches --------------------------------------------------------------------------------

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
            self._modes.pop(run, None)
        self._recorder.batch("retried" if outcome.requeue_after is not None else "completed")
        return outcome

    async def _send_batch(self, campaign_id: str, batch: int) -> BatchOutcome:
        """Take the batch's lease, settle messages in doubt, filter the rest, send them through
        the chain (each becomes ``sending`` as its request is issued), confirm them.

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
            await self._tracker.batch_waiting(campaign_id, batch, snapshot.not_before)
            return BatchOutcome(state="waiting", requeue_after=snapshot.not_before - time.time())
        await self._settled()
        mode_class = GroupedMode if channel.messages_per_request > 1 else PerMessageMode
        mode: SendMode = mode_class(self._tracker, self._owner, campaign_id, batch, channel, self.journal)
        claimed = await mode.claim(snapshot.rows)
        if claimed is None:
            self._control.pop(campaign_id, None)
            state = await self.campaign_state(campaign_id)
            return BatchOutcome(state=state, requeue_after=1.0 if state == "paused" else None)
        if claimed.batch_busy:
            return BatchOutcome(state="busy", requeue_after=1.0)
        self._modes[(campaign_id, batch)] = mode
        try:
            return await self._run(
                campaign_id=campaign_id, batch=batch, manifest=manifest, channel=channel, mode=mode, claimed=claimed
            )
        finally:
            await mode.release()

    async def _run(
        self,
        *,
        campaign_id: str,
        batch: int,
        manifest: Manifest,
        channel: Channel,
        mode: SendMode,
        claimed: _Claimed,
    ) -> BatchOutcome:
        self._recorder.dedup_hits(channel, claimed.dedup_hits)
        ctx = SendContext(
            campaign_id=campaign_id,
            batch=batch,
            channel=channel,
            manifest=manifest,
            template=string.Template(manifest.body),
            read_state=lambda: self.campaign_state(campaign_id),
        )
        mode.prepare(ctx)
        ctx.issue = self._issuer(ctx, mode)
        if self._resilience is not None:
            await self._resilience.before(ctx, manifest.deadline, claimed.items)
        items = claimed.items
        doubt = [item for item in items if item.doubt]
        if doubt:
            await self._settle(ctx, mode, doubt)
        filtered = await self._filter(ctx, [item for item in items if not item.doubt])
        mode.hold(filtered)
        self._recorder.sends(channel, filtered)
        await self._send_chunks(ctx, mode, [item for item in items if item.outcome is None and not item.doubt])
        for _ in range(SETTLE_ROUNDS):
            # answers lost on the wire (timeouts after the request left): reconcile, then send
            # again what the provider never got
            doubt = [item for item in items if item.doubt and item.outcome is None and not item.foreign]
            if not doubt or not await ctx.running():
                break
            await asyncio.sleep(LOOKUP_DELAY_S)
            resend = await self._settle(ctx, mode, doubt)
            if resend:
                await self._send_chunks(ctx, mode, resend)
        await mode.close(ctx, items)
        if self._suppression is not None:
            await self._suppression.feed(channel.name, [item.address for item in items if item.suppress])
        # -- provider trouble (dispatch.send.resilience): a refused account pauses the campaign
        if self._resilience is not None and await self._resilience.after(ctx, items):
            self._control.pop(campaign_id, None)
            return BatchOutcome(state="paused", requeue_after=1.0)
        if ctx.stopped == "paused" or claimed.busy or any(item.foreign for item in items):
            return BatchOutcome(state=ctx.stopped or "busy", requeue_after=1.0)
        if any(item.doubt and item.outcome is None for item in items):
            return BatchOutcome(state="in_doubt", requeue_after=IN_DOUBT_RECHECK_S)
        if any(item.outcome is not None and item.outcome.state == "retry" for item in items):
            return BatchOutcome(state="retry", requeue_after=max(ctx.long_wait, 1.0))
        await self._tracker.batch_done(campaign_id, batch)
        return BatchOutcome(state="done", requeue_after=None)

    def _issuer(self, ctx: SendContext, mode: SendMode) -> Callable[[list[Item], str], Awaitable[list[Item]]]:
        """``ctx.issue``: late opt-outs stop here, then the requests are marked in Redis."""
        fence = self._fence

        async def issue(items: list[Item], provider: str) -> list[Item]:
            await self._settled()
            if fence is not None:
                stopped = await fence.stopped(ctx.channel.name, [item.address for item in items])
                if any(stopped):
                    # an opt-out since the batch's check: the message never leaves
                    kept: list[Item] = []
                    for item, hit in zip(items, stopped, strict=True):
                        if hit:
                            item.outcome = Outcome(item.index, "suppressed", item.attempts, "", "suppressed")
                        else:
                            kept.append(item)
                    items = kept
                    if not items:
                        return []
            return await mode.issue(items, provider)

        return issue

    async def _settle(self, ctx: SendContext, mode: SendMode, items: list[Item]) -> list[Item]:
        """Decide messages in doubt (``dispatch.send.reconcile``): sets the outcome of those
        decided, clears ``doubt`` on those to send again (returned), leaves the rest in doubt."""
        channel = ctx.channel
        known = self.journal.known(ctx.campaign_id, ctx.batch)
        undecided: list[Item] = []
        resolutions: dict[str, int] = {}
        for item in items:
            remembered = known.get(item.index)
            if remembered is not None:
                item.outcome = Outcome(
                    item.index, remembered.state, remembered.attempts, remembered.provider_id, remembered.code
                )
                item.doubt = False
                resolutions["journal"] = resolutions.get("journal", 0) + 1
            else:
                undecided.append(item)
        resend: list[Item] = []
        if undecided:
            for item in undecided:
                if item.message is None:
                    render(ctx, [item])
            receipts = await self._receipt_evidence(ctx, undecided)
            flights = [
                InFlight(
                    ref=item.message.ref,
                    address=item.address,
                    body=item.message.body,
                    subject=item.message.subject,
                    idempotency_key=item.message.idempotency_key,
                    issued_at=item.issued_at if item.issued_at is not None else time.time(),
                )
                for item in undecided
                if item.message is not None
            ]
            verdicts: list[Verdict] = [Verdict("wait", "waiting")] * len(undecided)
            by_provider: dict[str, list[int]] = {}
            for position, item in enumerate(undecided):
                by_provider.setdefault(item.provider or channel.provider, []).append(position)
            for provider, positions in by_provider.items():
                adapter = self._adapters.get(provider, channel)
                answers = await self._reconciler.decide(
                    adapter, [flights[i] for i in positions], [receipts[i] for i in positions]
                )
                for position, verdict in zip(positions, answers, strict=True):
                    verdicts[position] = verdict
            for item, verdict in zip(undecided, verdicts, strict=True):
                resolutions[verdict.resolution] = resolutions.get(verdict.resolution, 0) + 1
                if verdict.decision == "sent":
                    item.outcome = Outcome(item.index, "sent", item.attempts, verdict.provider_id)
                    item.doubt = False
                elif verdict.decision == "send":
                    item.doubt = False
                    resend.append(item)
                elif verdict.decision == "fail":
                    state = "dead" if verdict.code == "in_doubt" else "failed"
                    item.outcome = Outcome(item.index, state, item.attempts, "", verdict.code)
                    item.doubt = False
        decided = [item.outcome for item in items if item.outcome is not None]
        if decided:
            self._recorder.sends(channel, decided)
            await mode.confirm(decided)
        for resolution, n in resolutions.items():
            if resolution != "waiting":
                log.info(
                    "campaign %s batch %d: %d message(s) in doubt at %s resolved: %s",
                    ctx.campaign_id,
                    ctx.batch,
                    n,
                    channel.provider,
                    resolution,
                )
            if self._metrics is not None:
                self._metrics.record_in_doubt(channel.provider, resolution, n)
        return resend

    async def _receipt_evidence(self, ctx: SendContext, items: list[Item]) -> list[bool]:
        """Whether a delivery receipt arrived for each message (kept until its send is confirmed)."""
        fields = [f"r{item.index}" for item in items]
        raw = cast(list[bytes | None], await self._client.hmget(keys.records(ctx.campaign_id, ctx.batch), fields))
        return [value is not None for value in raw]

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
            try:
                async with self._sem:
                    if await ctx.running():
                        await self._chain(ctx, chunk)
                    else:
                        # pause: hand the message back untouched; cancel: it is not sent
                        ctx.hand_back(chunk)
            except BaseException:
                # a step after the provider's answer failed (Redis went away): the answers are
                # still this process's knowledge (the journal), never lost to a resend
                answered = [
                    item.outcome for item in chunk if item.outcome is not None and not item.foreign and not item.doubt
                ]
                await mode.confirm([o for o in answered if o.state != "retry"])
                raise
            done: list[Outcome] = []
            for item in chunk:
                if item.foreign or item.doubt:
                    continue  # another run's, or reconciled after the chunks
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
    """How one run of a batch claims, issues and confirms its messages (one object per run).

    The engine calls, in order: ``claim``; ``prepare`` with the run's context; ``hold`` with the
    outcomes the filters set; ``issue`` right before each provider request; ``confirm`` once per
    sent chunk (and for messages in doubt it decided); ``close`` once every chunk is done;
    ``release`` at the end, whatever happened. ``reassert`` writes the run's requests on the
    wire again after a Redis restart.
    """

    async def claim(self, rows: list[Any]) -> _Claimed | None:
        """Take the batch's lease and read its messages; None when the campaign is not running."""
        ...

    def prepare(self, ctx: SendContext) -> None: ...

    def hold(self, outcomes: list[Outcome]) -> None: ...

    async def issue(self, items: list[Item], provider: str) -> list[Item]: ...

    async def confirm(self, outcomes: list[Outcome]) -> None: ...

    async def close(self, ctx: SendContext, items: list[Item]) -> None: ...

    async def release(self) -> None: ...

    async def reassert(self) -> int: ...


class _Writer:
    """A run's writes to its batch's records, coalesced: the issues of every chunk that is about
    to send and the confirmations waiting go out in one round trip (``Tracker.advance``), so a
    busy run costs about one round trip per chunk and a confirmation is written with the next
    issue (or at ``TRACK_FLUSH``, or at the end of the run)."""

    def __init__(self, tracker: Tracker, owner: str, campaign_id: str, batch: int, journal: Journal) -> None:
        self._tracker = tracker
        self._owner = owner
        self._campaign_id = campaign_id
        self._batch = batch
        self._journal = journal
        self._issues: list[tuple[list[tuple[str, int, str]], asyncio.Future[list[bool]]]] = []
        self._outcomes: list[Outcome] = []
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        #: Issued and not answered: field -> (attempts, provider), for ``reassert``.
        self.inflight: dict[str, tuple[int, str]] = {}

    async def issue(self, entries: list[tuple[str, int, str]]) -> list[bool]:
        future: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        self._issues.append((entries, future))
        self._kick()
        return await future

    def confirm(self, outcomes: Sequence[Outcome]) -> None:
        if not outcomes:
            return
        self._journal.remember(self._campaign_id, self._batch, outcomes)
        self._outcomes.extend(outcomes)
        if len(self._outcomes) >= TRACK_FLUSH:
            self._kick()

    async def flush(self) -> None:
        """Write everything given so far; raises what the last failed write raised."""
        while True:
            task = self._task
            if task is not None and not task.done():
                await task
                continue
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if not self._outcomes and not self._issues:
                return
            self._kick()

    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while self._issues or self._outcomes:
            issues, self._issues = self._issues, []
            outcomes, self._outcomes = self._outcomes, []
            entries = [entry for part, _ in issues for entry in part]
            try:
                answers = await self._tracker.advance(self._campaign_id, self._batch, self._owner, outcomes, entries)
            except BaseException as exc:  # Redis unreachable: the journal keeps the answers
                self._outcomes[:0] = outcomes
                for _, future in issues:
                    if not future.done():
                        future.set_exception(exc)
                self._error = exc
                return
            self._journal.written(self._campaign_id, self._batch, outcomes)
            for outcome in outcomes:
                self.inflight.pop(str(outcome.index), None)
            position = 0
            for part, future in issues:
                oks = answers[position : position + len(part)]
                position += len(part)
                for (field, attempts, provider), ok in zip(part, oks, strict=True):
                    if ok:
                        self.inflight[field] = (attempts, provider)
                if not future.done():
                    future.set_result(oks)

    async def reassert(self) -> int:
        entries = [(field, attempts, provider) for field, (attempts, provider) in self.inflight.items()]
        if entries:
            await self._tracker.issue(self._campaign_id, self._batch, self._owner, entries)
        return len(entries)


class _ModeBase:
    """What both send modes know of their run: the tracker, this worker, the batch, its channel
    and the run's writer."""

    def __init__(  # noqa: PLR0917 - the run's identity, in one order everywhere
        self, tracker: Tracker, owner: str, campaign_id: str, batch: int, channel: Channel, journal: Journal
    ) -> None:
        self._tracker = tracker
        self._owner = owner
        self._campaign_id = campaign_id
        self._batch = batch
        self._channel = channel
        self._journal = journal
        self._writer = _Writer(tracker, owner, campaign_id, batch, journal)

    async def confirm(self, outcomes: list[Outcome]) -> None:
        self._writer.confirm(outcomes)

    async def release(self) -> None:
        try:
            await self._tracker.release(self._campaign_id, self._batch, self._owner)
        except (redis.RedisError, OSError) as exc:  # our next run of it takes the lease again
            log.warning("batch %s/%d: lease not released (%s)", self._campaign_id, self._batch, type(exc).__name__)

    async def reassert(self) -> int:
        return await self._writer.reassert()

    def _known(self, claimed: _Claimed, *, retry: set[int] | frozenset[int] = frozenset()) -> None:
        """Messages this process answered whose records do not show it (a write that failed, or a
        Redis restart that lost it): settled from the journal, never sent again. A ``retry``
        record was written after the answer (an operator's ``retry-failed``): it is not one."""
        known = self._journal.known(self._campaign_id, self._batch)
        if known:
            for item in claimed.items:
                if item.index in known and item.index not in retry:
                    item.doubt = True

    async def _close_writer(self, ctx: SendContext) -> None:
        await self._writer.flush()
        if ctx.retries:
            await self._tracker.finish(self._campaign_id, self._batch, self._owner, [], retries=ctx.retries)


class PerMessageMode(_ModeBase):
    """Per-message channels: one record per message, written as its request is issued; answers
    are written with the next issue (``_Writer``)."""

    async def claim(self, rows: list[Any]) -> _Claimed | None:
        claims = await self._tracker.claim(self._campaign_id, self._batch, self._owner, list(range(len(rows))))
        if claims is None:
            return None
        claimed = _Claimed(rows)
        if claims is BATCH_BUSY:
            claimed.batch_busy = True
            return claimed
        for index, claim in enumerate(claims):
            claimed.take(
                index, claim.code, claim.attempts, grouped=False, issued_at=claim.issued_at, provider=claim.provider
            )
        self._known(claimed, retry={index for index, claim in enumerate(claims) if claim.retry})
        return claimed

    def prepare(self, ctx: SendContext) -> None:
        pass

    def hold(self, outcomes: list[Outcome]) -> None:
        self._writer.confirm(outcomes)

    async def issue(self, items: list[Item], provider: str) -> list[Item]:
        oks = await self._writer.issue([(str(item.index), item.attempts, provider) for item in items])
        allowed: list[Item] = []
        for item, ok in zip(items, oks, strict=True):
            if ok:
                allowed.append(item)
            else:
                item.foreign = True
        return allowed

    async def close(self, ctx: SendContext, items: list[Item]) -> None:
        await self._close_writer(ctx)


class GroupedMode(_ModeBase):
    """Batch channels: one group record for the messages without a record of their own, issued
    with the first request of the run and confirmed once for the whole run (the group's outcome,
    and the exceptions)."""

    async def claim(self, rows: list[Any]) -> _Claimed | None:
        claim = await self._tracker.claim_group(self._campaign_id, self._batch, self._owner, len(rows))
        if claim is None:
            return None
        claimed = _Claimed(rows)
        if claim.busy:
            claimed.batch_busy = True
            return claimed
        others = claim.others
        if not others and claim.code == CLAIM_FRESH and (claim.first, claim.last) == (0, len(rows) - 1):
            # the usual run: every message is a member of a group claimed just now
            attempts = claim.attempts
            claimed.items = [
                Item(i, row.recipient_id, row.address, row.attrs, attempts, grouped=True) for i, row in enumerate(rows)
            ]
        else:
            for index in range(len(rows)):
                other = others.get(index)
                if other is not None:
                    claimed.take(index, other[0], other[1], grouped=False, issued_at=claim.others_issued.get(index))
                elif claim.first <= index <= claim.last:
                    claimed.take(index, claim.code, claim.attempts, grouped=True, issued_at=claim.issued_at)
        self._known(claimed)
        return claimed

    def prepare(self, ctx: SendContext) -> None:
        if isinstance(self._channel, SubstitutingChannel):
            ctx.substitution = self._channel.substitution_template(ctx.manifest.body)

    def hold(self, outcomes: list[Outcome]) -> None:
        pass  # the items carry them: ``group_outcome`` reads them in ``close``

    async def issue(self, items: list[Item], provider: str) -> list[Item]:
        members = [item for item in items if item.grouped]
        singles = [item for item in items if not item.grouped]
        entries = [(str(item.index), item.attempts, provider) for item in singles]
        if members:
            entries.append((GROUP_FIELD, max(item.attempts for item in members), provider))
        oks = await self._writer.issue(entries)
        group_ok = bool(members) and oks[-1]
        allowed: list[Item] = []
        for item, ok in zip(singles, oks, strict=False):
            if ok:
                allowed.append(item)
            else:
                item.foreign = True
        for item in members:
            if group_ok:
                allowed.append(item)
            else:
                item.foreign = True
        return allowed

    async def confirm(self, outcomes: list[Outcome]) -> None:
        # the items carry them (``group_outcome`` reads them in ``close``); the journal keeps them
        # in case the run ends before it closes
        self._journal.remember(self._campaign_id, self._batch, outcomes)

    async def close(self, ctx: SendContext, items: list[Item]) -> None:
        group, singles = group_outcome(ctx, items)
        if group is not None:
            # members whose request's answer was lost leave the group, still in doubt
            singles.extend(
                Outcome(item.index, "doubt", item.attempts, "", f"{item.issued_at or time.time():.3f}")
                for item in items
                if item.grouped and item.doubt and item.outcome is None and not item.foreign
            )
        await self._writer.flush()
        self._journal.remember(self._campaign_id, self._batch, singles)
        if group is not None or singles or ctx.retries:
            await self._tracker.finish_group(
                self._campaign_id, self._batch, self._owner, singles, group, retries=ctx.retries
            )
        self._journal.written(
            self._campaign_id, self._batch, [item.outcome for item in items if item.outcome is not None] + singles
        )


class _Claimed:
    """What a claim gave: messages to send or to settle (``doubt``), counts of busy and
    already-done ones, and whether a live worker holds the whole batch."""

    __slots__ = ("batch_busy", "busy", "dedup_hits", "items", "rows")

    def __init__(self, rows: list[SnapshotRow]) -> None:
        self.rows = rows
        self.items: list[Item] = []
        self.busy = self.dedup_hits = 0
        self.batch_busy = False

    def take(
        self,
        index: int,
        code: int,
        attempts: int,
        *,
        grouped: bool,
        issued_at: float | None = None,
        provider: str = "",
    ) -> None:
        if code == CLAIM_DONE:
            self.dedup_hits += 1
        elif code == CLAIM_BUSY:
            self.busy += 1
        else:
            row = self.rows[index]
            item = Item(index, row.recipient_id, row.address, row.attrs, attempts, grouped=grouped)
            if code == CLAIM_IN_DOUBT:
                item.doubt = True
                item.issued_at = issued_at
                if provider:  # its fate is at that provider: asked there, resent there only
                    item.provider = item.pinned = provider
            self.items.append(item)


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
