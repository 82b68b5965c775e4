"""Tracked links: ``$link(https://...)`` in a body becomes ``<base>/r/<token>`` per message.

At plan time (:func:`plan_links`) each ``$link(URL)`` of the body is checked (``http``/``https``,
no ``$``, whitespace or parentheses in it: a clear error names the link) and numbered in order of
first appearance; the manifest keeps that table (``Manifest.links``) and the body as written.
The planner sizes the body with every link at its rewritten length (:attr:`PlannedLinks.sized`),
so the channel's length check and the SMS segment count are those of the body that is sent.
Email keeps its URLs as they are (SendGrid's own click tracking reports its clicks, see
``channels.receipts``): its manifest body has the plain URLs and no table.

At send time :class:`LinkStep` (a send-chain step right after rendering) replaces each
``$link(URL)`` of the rendered body by the tracked URL, so the rate limit after it counts the
segments of the final body. The token (:class:`LinkSigner`) is
``base64url(campaign id, batch, index, link number, HMAC-SHA256 truncated to 96 bits)``: it names
the message and the link, carries no address, needs no per-message storage and cannot be forged
without the deployment's link key (``DISPATCH_LINK_KEY``, or else ``$DISPATCH_HOME/link.key``,
0600, created on first use: every process that renders or redirects must share it).

``GET /r/<token>`` (:func:`mount_links`) checks the MAC, answers 302 to the link and records the
first click of each message in the ledger (``click``, or ``bot_click`` for a ``HEAD`` request or
a User-Agent with one of :data:`BOT_USER_AGENT_WORDS`); a bad or unknown token is a bare 404.
The click is written after the answer, by :class:`ClickRecorder`: clicks of a few milliseconds
go in one pipelined round trip (a Redis call per click costs more CPU than the rest of the
request), and a Redis outage never stops a recipient from reaching the link. The time recorded
is the request's. What is still queued when the process stops is written at shutdown; a crash
loses at most the last ``flush_s`` of clicks.

Bot patterns and why: link previews fetch every URL they see before any human does (iMessage,
WhatsApp, Telegram, Slack, Discord, Teams, Skype, LinkedIn, Facebook/Messenger, Twitter/X; iMessage
sends ``facebookexternalhit ... Twitterbot``), mail and SMS security scanners follow links
(Microsoft Safe Links/``MicrosoftPreview``, Proofpoint, Mimecast, Barracuda), crawlers
(``Googlebot``, ``bingbot``, ``Applebot``, generic ``bot/``/``crawler``/``spider``), and
scripted clients (``curl``, ``Wget``, ``python-requests``, ``Go-http-client``, ``HeadlessChrome``).
A request without a User-Agent is a machine too (every browser sends one). WeChat's in-app
browser (``MicroMessenger``) is a human and is not matched; neither is a phone brand that ends in
"bot" (``CUBOT``): the generic rule needs ``bot`` followed by ``/``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import math
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

import redis
import redis.asyncio as aredis
from aiohttp import web

from dispatch.config import Settings
from dispatch.credentials import Secret, home_secret
from dispatch.engage.ledger import EngagementLedger
from dispatch.errors import ConfigError, PlanError
from dispatch.plan.manifest import Manifest
from dispatch.store import keys

if TYPE_CHECKING:  # the planner imports this module: it must not load the send engine
    from dispatch.send.engine import Item, Next, SendContext

__all__ = [
    "BOT_USER_AGENT_WORDS",
    "CLICKS",
    "LINK_KEY_FILE",
    "MAX_LINKS",
    "ClickRecorder",
    "LinkSigner",
    "LinkStep",
    "LinkToken",
    "PlannedLinks",
    "find_links",
    "is_bot",
    "link_key",
    "mount_links",
    "plan_links",
    "strip_links",
]

log = logging.getLogger(__name__)

#: The generated link key's file in the deployment's home.
LINK_KEY_FILE: Final = "link.key"
#: Most distinct links one body may track (the token has one byte for the link number).
MAX_LINKS: Final = 32
#: Path prefix of the redirect endpoint.
REDIRECT_PREFIX: Final = "/r/"
#: ``$link(...)``: anything up to the closing parenthesis (checked by :func:`plan_links`).
_HELPER: Final = re.compile(r"\$link\(([^)]*)\)")
_OPENED: Final = re.compile(r"\$link\(")
_URL: Final = re.compile(r"https?://[^\s()$<>\"]+", re.IGNORECASE)
_MAC_BYTES: Final = 12
_FIXED: Final = struct.Struct(">IIB")  # batch, index, link number
_MAC_CONTEXT: Final = b"dispatch link v1\x00"
#: Link-preview bots, security scanners, crawlers and scripted clients (see the module docstring),
#: as lower-case substrings of a User-Agent (a substring test is ten times cheaper than a regex).
BOT_USER_AGENT_WORDS: Final = (
    "facebookexternalhit", "facebot", "twitterbot", "slackbot", "discordbot", "whatsapp", "telegrambot",
    "linkedinbot", "skypeuripreview", "microsoftpreview", "bingpreview", "googlebot", "google-inspectiontool",
    "bingbot", "applebot", "baiduspider", "petalbot", "proofpoint", "mimecast", "barracuda", "safelinks",
    "crawler", "spider", "curl/", "wget/", "python-requests", "python-urllib", "aiohttp", "go-http-client",
    "headlesschrome", "phantomjs",
)  # fmt: skip
#: Any other "<name>bot/<version>" (not a phone brand ending in "bot": no slash follows it).
_GENERIC_BOT: Final = re.compile(r"[a-z]bot/")


def is_bot(method: str, user_agent: str | None) -> bool:
    """A prefetch or preview, not a person: a HEAD request, no User-Agent, or a known bot's."""
    if method == "HEAD" or not user_agent:
        return True
    lowered = user_agent.lower()
    if any(word in lowered for word in BOT_USER_AGENT_WORDS):
        return True
    return "bot/" in lowered and _GENERIC_BOT.search(lowered) is not None


def strip_links(body: str) -> str:
    """``body`` without its ``$link(...)`` helpers (for finding its template fields)."""
    return _HELPER.sub("", body)


@dataclass(frozen=True, slots=True)
class PlannedLinks:
    """What planning makes of a body's links."""

    #: The body to store in the manifest (email: the URLs written out, no helper left).
    body: str
    #: The link table (the manifest's ``links``); empty when nothing is tracked.
    links: tuple[str, ...]
    #: The body with each helper at its sent length (for length checks and SMS segments).
    sized: str


def find_links(body: str) -> list[str]:
    """The URLs of ``body``'s ``$link(...)`` helpers in order, checked (ValueError names the
    first bad one)."""
    found: list[str] = []
    for match in _OPENED.finditer(body):
        whole = _HELPER.match(body, match.start())
        if whole is None:
            raise ValueError(f"$link( at character {match.start() + 1} has no closing ')'")
        url = whole.group(1)
        if not _URL.fullmatch(url):
            shown = url if len(url) <= 60 else url[:57] + "..."
            raise ValueError(
                f"$link({shown}) is not a trackable link: give an http:// or https:// URL "
                "without spaces, '$', '(', ')' or quotes"
            )
        found.append(url)
    if len(set(found)) > MAX_LINKS:
        raise ValueError(f"the body tracks {len(set(found))} links; at most {MAX_LINKS}")
    return found


def plan_links(body: str, *, channel: str, campaign_id: str, base_url: str | None) -> PlannedLinks:
    """Check and number ``body``'s links for ``channel`` (see the module docstring)."""
    where = f"campaign {campaign_id}"
    try:
        urls = find_links(body)
    except ValueError as exc:
        raise PlanError(f"{where}: body: {exc}") from None
    if not urls:
        return PlannedLinks(body, (), body)
    if channel == "email":
        plain = _HELPER.sub(lambda m: m.group(1).replace("$", "$$"), body)
        return PlannedLinks(plain, (), plain)
    if not base_url:
        raise PlanError(
            f"{where}: the body has tracked links but no public base URL is set for them: "
            "set DISPATCH_LINK_BASE_URL (or DISPATCH_CALLBACK_BASE_URL) to where `dispatch serve` is reached"
        )
    table = tuple(dict.fromkeys(urls))
    length = tracked_length(base_url, campaign_id)
    return PlannedLinks(body, table, _HELPER.sub("x" * length, body))


def tracked_length(base_url: str, campaign_id: str) -> int:
    """Characters of every tracked URL of a campaign (the token's length is fixed per campaign)."""
    raw = len(campaign_id.encode()) + _FIXED.size + _MAC_BYTES
    return len(base_url.rstrip("/")) + len(REDIRECT_PREFIX) + len(base64.urlsafe_b64encode(b"\0" * raw).rstrip(b"="))


def link_key(settings: Settings) -> Secret:
    """The deployment's link key: ``DISPATCH_LINK_KEY`` when set, else ``$DISPATCH_HOME/link.key``
    (generated on first use, 0600). Every process rendering or redirecting links must share it."""
    if settings.link_key:
        return settings.link_key
    return home_secret(settings.home.resolve() / LINK_KEY_FILE)


@dataclass(frozen=True, slots=True)
class LinkToken:
    """What a valid token names."""

    campaign_id: str
    batch: int
    index: int
    link: int

    @property
    def ref(self) -> str:
        return f"{self.campaign_id}.{self.batch}.{self.index}"  # dispatch.send.tracking.make_ref


class LinkSigner:
    """Makes and checks tokens with the deployment's link key; ``base_url`` prefixes tracked URLs."""

    def __init__(self, key: bytes, base_url: str) -> None:
        if not key:
            raise ConfigError(
                "DISPATCH_LINK_KEY", "the link key is empty", "set it or remove it to use the generated one"
            )
        self._key = key
        self.base_url = base_url.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings) -> LinkSigner | None:
        """The deployment's signer, or None when no public base URL is configured."""
        base = settings.link_base_url or settings.callback_base_url
        return cls(link_key(settings).reveal().encode(), base) if base else None

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, _MAC_CONTEXT + payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def token(self, campaign_id: str, batch: int, index: int, link: int) -> str:
        payload = campaign_id.encode() + _FIXED.pack(batch, index, link)
        return base64.urlsafe_b64encode(payload + self._mac(payload)).rstrip(b"=").decode()

    def url(self, campaign_id: str, batch: int, index: int, link: int) -> str:
        return f"{self.base_url}{REDIRECT_PREFIX}{self.token(campaign_id, batch, index, link)}"

    def verify(self, token: str) -> LinkToken | None:
        """What ``token`` names, or None when it is malformed or its MAC is wrong."""
        if not token.isascii() or len(token) > 512:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) <= _FIXED.size + _MAC_BYTES:
            return None
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(self._mac(payload), mac):
            return None
        batch, index, link = _FIXED.unpack(payload[-_FIXED.size :])
        try:
            campaign_id = payload[: -_FIXED.size].decode()
        except UnicodeDecodeError:
            return None
        return LinkToken(campaign_id, batch, index, link)


def rewrite(body: str, table: Sequence[str], signer: LinkSigner, *, campaign_id: str, batch: int, index: int) -> str:
    """``body`` with each ``$link(URL)`` of ``table`` replaced by its tracked URL."""
    numbers = {url: n for n, url in enumerate(table)}

    def tracked(match: re.Match[str]) -> str:
        n = numbers.get(match.group(1))
        return match.group(0) if n is None else signer.url(campaign_id, batch, index, n)

    return _HELPER.sub(tracked, body)


class LinkStep:
    """Send-chain step after rendering: tracked URLs into every message of a campaign with links.

    Without a signer (no public base URL configured) the links are sent as their plain URLs,
    untracked, and a warning says so: a message is never sent with a ``$link(...)`` in it."""

    def __init__(self, signer: LinkSigner | None) -> None:
        self._signer = signer

    async def __call__(self, ctx: SendContext, items: list[Item], nxt: Next) -> None:
        table = ctx.manifest.links
        if table:
            signer = self._signer
            if signer is None:
                log.warning(
                    "campaign %s has tracked links but no link base URL is set: sent untracked", ctx.campaign_id
                )
            for item in items:
                message = item.message
                if message is None:
                    continue
                if signer is None:
                    body = _HELPER.sub(lambda m: m.group(1), message.body)
                else:
                    body = rewrite(
                        message.body, table, signer, campaign_id=ctx.campaign_id, batch=ctx.batch, index=item.index
                    )
                item.message = replace(message, body=body)
        await nxt(ctx, items)


class _LinkTables:
    """Link tables of campaigns (manifests do not change once committed), bounded. One read per
    campaign however many requests arrive at once (a burst of clicks on a new campaign would
    otherwise take a connection each); a campaign without a manifest is asked again after
    ``miss_s``."""

    def __init__(self, client: aredis.Redis, *, most: int = 1024, miss_s: float = 5.0) -> None:
        self._client = client
        self._most = most
        self._miss_s = miss_s
        self._tables: dict[str, tuple[tuple[str, ...], float]] = {}
        self._loading: dict[str, asyncio.Future[tuple[str, ...]]] = {}

    async def get(self, campaign_id: str) -> tuple[str, ...]:
        cached = self._tables.get(campaign_id)
        if cached is not None and cached[1] >= time.monotonic():
            return cached[0]
        loading = self._loading.get(campaign_id)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[tuple[str, ...]] = asyncio.get_running_loop().create_future()
        self._loading[campaign_id] = future
        try:
            raw = await self._client.get(keys.manifest(campaign_id))
            table = () if raw is None else tuple(Manifest.decode(raw, campaign_id=campaign_id).links or ())
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it, nobody is warned about it
            raise
        finally:
            del self._loading[campaign_id]
        future.set_result(table)
        if len(self._tables) >= self._most:
            self._tables.clear()
        self._tables[campaign_id] = (table, time.monotonic() + (self._miss_s if raw is None else math.inf))
        return table


class ClickRecorder:
    """Writes clicks to the ledger shortly after they are answered, many per round trip."""

    def __init__(
        self,
        ledger: EngagementLedger,
        *,
        flush_s: float = 0.01,
        most: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ledger = ledger
        self._flush_s = flush_s
        self._most = most
        self._clock = clock
        self._queue: list[tuple[str, str, float]] = []
        self._task: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()
        #: Clicks written / refused for a full queue / lost to a Redis error (logged).
        self.written = self.dropped = self.failed = 0

    def add(self, ref: str, event: str) -> None:
        """Queue one click (timed now); written within about ``flush_s``."""
        if len(self._queue) >= self._most:
            self.dropped += 1
            return
        self._queue.append((ref, event, self._clock()))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._queue:
                await asyncio.sleep(self._flush_s)
                await self.flush()
        finally:
            self._task = None

    async def flush(self) -> None:
        """Write everything queued until now (after any write already under way)."""
        async with self._writing:
            while self._queue:
                taken, self._queue = self._queue[:1000], self._queue[1000:]
                try:
                    await self._ledger.record_pipelined(taken)
                except redis.RedisError as exc:
                    self.failed += len(taken)
                    log.warning("%d clicks not recorded: %s", len(taken), type(exc).__name__)
                else:
                    self.written += len(taken)

    async def close(self) -> None:
        """Write what is queued and stop (the app's cleanup)."""
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()


#: The app's click recorder (``app[CLICKS].flush()`` in tests).
CLICKS: Final = web.AppKey("dispatch_link_clicks", ClickRecorder)


def mount_links(app: web.Application, signer: LinkSigner, ledger: EngagementLedger, client: aredis.Redis) -> None:
    """``GET``/``HEAD /r/{token}`` on ``app``: redirect, then record the click (first per message)."""
    tables = _LinkTables(client)
    recorder = ClickRecorder(ledger)
    app[CLICKS] = recorder

    async def redirect(request: web.Request) -> web.StreamResponse:
        found = signer.verify(request.match_info["token"])
        if found is None:
            return web.Response(status=404)
        table = await tables.get(found.campaign_id)
        if found.link >= len(table):
            return web.Response(status=404)
        recorder.add(found.ref, "bot_click" if is_bot(request.method, request.headers.get("User-Agent")) else "click")
        return web.Response(
            status=302,
            headers={"Location": table[found.link], "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
        )

    async def close(app: web.Application) -> None:
        await recorder.close()

    # aiohttp answers HEAD through a GET route; the handler tells them apart by request.method
    app.router.add_get(REDIRECT_PREFIX + "{token}", redirect)
    app.on_cleanup.append(close)
