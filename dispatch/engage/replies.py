"""Inbound SMS replies: opt-out keywords, and which message a reply answers.

A reply names no message, only the number it came from. :class:`ReplyIndex` keeps, per number,
the ref of the last SMS sent to it: key ``dispatch:reply:<hex>`` where ``<hex>`` is the
suppression hasher's keyed hash of the E.164 number (the index holds no number in clear, and
only a process with the suppression key can look a number up), value the ref, TTL
``reply_window_s`` (a reply later than that is still an opt-out, but no message is credited).
It is written from the send path: :class:`ReplyIndexStep` runs after the send step and calls
:meth:`ReplyIndex.note_sent` with the messages the provider accepted (one pipelined round trip
per chunk). Cost: about 120 bytes of Redis per number sent to within the window.

Opt-out keywords (:data:`OPTOUT_KEYWORDS`), matched against the whole reply after NFKC folding
(full-width letters), trimming, dropping trailing punctuation and case folding, as carriers and
Twilio's Advanced Opt-Out do (a sentence that contains "stop" is a reply, not an opt-out):
Twilio's and the CTIA's ``STOP``, ``STOPALL``, ``UNSUBSCRIBE``, ``CANCEL``, ``END``, ``QUIT``,
plus ``OPTOUT`` and ``REVOKE`` (added to Twilio's list for the FCC's 2025 revocation rule); the
Chinese carriers' ``TD`` and ``T`` (回复TD/T退订), ``退订``, ``N`` and ``R``/``拒收`` (the
"拒收请回复R" footer most Chinese marketing SMS carry).
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

import redis.asyncio as aredis

from dispatch.rules.suppression import AddressHasher

if TYPE_CHECKING:
    from dispatch.send.engine import Item, Next, SendContext

__all__ = ["OPTOUT_KEYWORDS", "REPLY_CHANNELS", "ReplyIndex", "ReplyIndexStep", "is_optout"]

#: Whole-message replies that opt out (compared after :func:`_fold`).
OPTOUT_KEYWORDS: Final = frozenset(
    {"stop", "stopall", "unsubscribe", "cancel", "end", "quit", "optout", "revoke"}
    | {"td", "t", "退订", "n", "r", "拒收"}
)
#: Messages the reply index writes at once, and the longest an entry waits to be written.
INDEX_FLUSH: Final = 256
INDEX_FLUSH_S: Final = 0.5
#: Channels whose recipients can reply (their sends are indexed).
REPLY_CHANNELS: Final = frozenset({"sms"})
_PREFIX: Final = "dispatch:reply:"
log = logging.getLogger(__name__)
_TRAILING: Final = re.compile(r"[\s.!。,;]+$")  # after NFKC: full-width ! , ; are ASCII


def _fold(body: str) -> str:
    text = unicodedata.normalize("NFKC", body).strip()
    return _TRAILING.sub("", text).casefold()


def is_optout(body: str) -> bool:
    """Whether the reply ``body`` is an opt-out keyword."""
    return _fold(body) in OPTOUT_KEYWORDS


class ReplyIndex:
    """Number (keyed hash) -> ref of the last message sent to it, for ``ttl_s``."""

    def __init__(self, client: aredis.Redis, *, hasher: AddressHasher, ttl_s: int) -> None:
        self._client = client
        self._hasher = hasher
        self._ttl = ttl_s

    def _key(self, phone: str) -> str:
        return _PREFIX + self._hasher(phone).hex()

    async def note_sent(self, pairs: Iterable[tuple[str, str]]) -> int:
        """Remember ``(E.164 number, ref)`` of messages just sent; returns how many."""
        pipe = self._client.pipeline(transaction=False)
        n = 0
        for phone, ref in pairs:
            pipe.set(self._key(phone), ref, ex=self._ttl)
            n += 1
        if n:
            await pipe.execute()
        return n

    async def last_ref(self, phone: str) -> str | None:
        """The ref of the last message sent to ``phone`` within the window, if any."""
        raw = await self._client.get(self._key(phone))
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)


class ReplyIndexStep:
    """Send-chain step after the send step: index the accepted messages of reply channels.

    The index is written in groups (one pipeline per :data:`INDEX_FLUSH` messages, or
    :data:`INDEX_FLUSH_S` after the first one waiting), not per request: a round trip per chunk
    cost the send path more than the sends it indexed. A worker killed meanwhile loses at most
    that group's entries: a reply from one of those numbers is then recorded without a message
    (an opt-out still reaches the suppression list).
    """

    def __init__(self, index: ReplyIndex) -> None:
        self._index = index
        self._waiting: list[tuple[str, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[int]] = set()

    async def __call__(self, ctx: SendContext, items: list[Item], nxt: Next) -> None:
        if ctx.channel.name in REPLY_CHANNELS:
            sent = _sent(items)
            if sent:
                self._waiting.extend(sent)
                if len(self._waiting) >= INDEX_FLUSH:
                    await self.flush()
                elif self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(INDEX_FLUSH_S, self._flush_later)
        await nxt(ctx, items)

    async def flush(self) -> int:
        """Write every entry waiting; returns how many."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, []
        return await self._index.note_sent(waiting) if waiting else 0

    def _flush_later(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[int]) -> None:
        self._flushing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("reply index not written (%s)", type(task.exception()).__name__)


def _sent(items: Sequence[Item]) -> list[tuple[str, str]]:
    return [
        (item.address, item.message.ref)
        for item in items
        if item.message is not None and item.outcome is not None and item.outcome.state == "sent"
    ]
