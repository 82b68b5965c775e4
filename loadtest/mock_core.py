"""Shared state of the mock provider: configuration, fault mix, ledger, idempotency store.

Each provider twin (``mock_twilio``, ``mock_sendgrid``, ``mock_fcm``, ``mock_webhook``) runs the
same steps: authenticate, ``MockState.inject_faults``, answer an idempotent replay, validate the
request the way the real provider does, ``MockState.admit`` (server-side rate limit), then
record it in the ledger (``loadtest.mock_ledger``) and the lookup stores (``loadtest.mock_lookup``).

By default the twins behave like the providers they imitate: Twilio, SendGrid and FCM ignore
``Idempotency-Key`` (a replayed request is a new message, counted as a duplicate).
``MockConfig.honour_idempotency`` makes them answer a replay with the original answer instead
(an idempotent proxy in front of the provider). The webhook twin imitates a receiver built to our
webhook contract, which honours the key, and always does.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal

from aiohttp import web

from loadtest.mock_ledger import Journal, Ledger
from loadtest.mock_lookup import EmailRecord, EmailStore, SmsStore

__all__ = [
    "DEFAULT_ACCOUNT_SID",
    "DEFAULT_AUTH_TOKEN",
    "ErrorFactory",
    "FaultMix",
    "Ledger",
    "MockConfig",
    "MockState",
    "ReceiptConfig",
]

#: An answer kept for replays: status, body (None: none), content type, headers worth repeating.
_Answer = tuple[int, bytes | None, str, tuple[tuple[str, str], ...]]
#: Response headers a replay repeats (SendGrid's message id travels in one).
_REPLAYED_HEADERS: tuple[str, ...] = ("X-Message-Id",)

#: Credentials the mock accepts unless configured otherwise.
DEFAULT_ACCOUNT_SID: Final = "AC" + "0" * 32
DEFAULT_AUTH_TOKEN: Final = "mock-auth-token"

Jitter = Literal["none", "exponential", "lognormal"]
OutageMode = Literal["reset", "503"]

#: Builds a provider-shaped error response: (HTTP status, message, Retry-After seconds or None).
ErrorFactory = Callable[[int, str, float | None], web.Response]


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultMix:
    """What goes wrong, and how slowly things go right. Probabilities are per request.

    ``p_timeout`` hangs *before* accepting (a clean timeout); ``p_timeout_after_accept`` accepts
    and then hangs, the ambiguous case where a resend without idempotency duplicates.
    ``p_reset`` closes the connection without an answer before accepting.
    """

    latency_ms: float = 0.0
    jitter: Jitter = "none"
    #: Mean of the exponential jitter, median of the lognormal one.
    jitter_ms: float = 0.0
    #: Shape (sigma) of the lognormal jitter.
    jitter_sigma: float = 1.0
    p_429: float = 0.0
    retry_after_s: float = 1.0
    p_500: float = 0.0
    p_503: float = 0.0
    p_timeout: float = 0.0
    p_timeout_after_accept: float = 0.0
    p_reset: float = 0.0
    #: How long a "timeout" hangs: make it longer than the client's timeout.
    hang_s: float = 30.0
    #: Server-side limit: requests above this many accepted messages per second get 429.
    rate_limit_per_s: int | None = None
    #: An outage: for this many seconds after the mix is set, every request fails as
    #: ``outage_mode`` says ("reset": the connection drops unanswered; "503": Service Unavailable).
    outage_s: float = 0.0
    outage_mode: OutageMode = "503"
    #: For this many seconds after the mix is set, every request is refused with 401 (rotated
    #: credentials); the twin's own 401 shape.
    unauthorized_s: float = 0.0
    #: Destinations starting with one of these are refused for good (Twilio 21408: sending to
    #: the region is not enabled on the account), as a provider refuses a country.
    refuse_prefixes: tuple[str, ...] = ()
    #: The account's balance is used up (Aliyun ``isv.AMOUNT_NOT_ENOUGH``).
    balance_exhausted: bool = False

    def __post_init__(self) -> None:
        total = self.p_429 + self.p_500 + self.p_503 + self.p_timeout + self.p_reset
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"FaultMix.{item.name} must be within [0, 1], got {value}")
        if total > 1.0:
            raise ValueError("FaultMix: p_429 + p_500 + p_503 + p_timeout + p_reset must be <= 1")
        if self.jitter not in ("none", "exponential", "lognormal"):
            raise ValueError("FaultMix.jitter must be 'none', 'exponential' or 'lognormal'")
        if self.outage_mode not in ("reset", "503"):
            raise ValueError("FaultMix.outage_mode must be 'reset' or '503'")
        if self.outage_s < 0 or self.unauthorized_s < 0:
            raise ValueError("FaultMix.outage_s and unauthorized_s must not be negative")
        # JSON gives a list; a str would be a tuple of its characters
        if isinstance(self.refuse_prefixes, str) or not all(isinstance(p, str) for p in self.refuse_prefixes):
            raise ValueError("FaultMix.refuse_prefixes must be a list of strings")
        object.__setattr__(self, "refuse_prefixes", tuple(self.refuse_prefixes))

    def refuses(self, address: str) -> bool:
        """Whether ``address`` is refused by ``refuse_prefixes``."""
        return address.startswith(self.refuse_prefixes) if self.refuse_prefixes else False

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FaultMix:
        """Build from JSON (``POST /_mock/faults``); unknown keys are an error."""
        known = {item.name for item in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"FaultMix: unknown fields {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptConfig:
    """Delivery-receipt callbacks the mock sends after accepting a message."""

    #: Seconds between acceptance and the callback.
    delay_s: float = 0.2
    #: Share of messages reported failed/undelivered/bounced instead of delivered.
    fail_ratio: float = 0.0
    #: Where SendGrid-style event batches go (SendGrid's URL is account configuration).
    sendgrid_event_url: str | None = None
    #: Where our own signed webhook receipts go.
    webhook_receipt_url: str | None = None
    #: Twilio-style: also send an intermediate "sent" status before the final one.
    twilio_intermediate: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class MockConfig:
    """Credentials the mock accepts and the behaviour it starts with."""

    account_sid: str = DEFAULT_ACCOUNT_SID
    auth_token: str = DEFAULT_AUTH_TOKEN
    sendgrid_api_key: str = "SG.mock-api-key"
    fcm_access_token: str = "mock-fcm-access-token"
    aliyun_access_key_id: str = "LTAI-mock-access-key"
    aliyun_access_key_secret: str = "mock-aliyun-secret"
    webhook_secret: str = "mock-webhook-secret"
    host: str = "127.0.0.1"
    port: int = 0
    faults: FaultMix = field(default_factory=FaultMix)
    #: Numbers that sent STOP: Twilio answers 21610.
    unsubscribed: frozenset[str] = frozenset()
    #: Numbers that are landlines: Twilio answers 21614.
    not_mobile: frozenset[str] = frozenset()
    receipts: ReceiptConfig | None = None
    #: Idempotency keys remembered (oldest forgotten first), like a provider's key window.
    idempotency_keys: int = 200_000
    #: Seed for the fault and receipt dice (None: unpredictable).
    seed: int | None = None
    #: Largest request body accepted (SendGrid's limit is 30 MB; keep tests cheaper).
    max_body_bytes: int = 32 * 1024 * 1024
    #: Answer a repeated ``Idempotency-Key`` with the original answer (Twilio, SendGrid and FCM
    #: twins). False, like the real providers: a replay is accepted again as a new message.
    honour_idempotency: bool = False
    #: Append every accepted message to this file and replay it at start-up, so the ledger's
    #: counts (and the lookup APIs) survive a restart of the mock. None: in memory only.
    ledger_path: Path | None = None
    #: Messages the lookup APIs (Twilio's Messages list, SendGrid's activity feed) remember, the
    #: newest (a provider keeps months; ~0.5 KB each here). Reconciliation looks back minutes.
    lookup_messages: int = 200_000
    #: Seconds after acceptance a Twilio message leaves ``queued`` (gets ``date_sent``).
    twilio_sent_after_s: float = 1.0
    #: Serve SendGrid's Email Activity API (a paid add-on: off, it answers 403).
    email_activity: bool = True
    #: Seconds before an accepted email shows in the activity feed (SendGrid's lags).
    email_activity_lag_s: float = 0.0


class MockState:
    """What the provider twins share while the mock runs."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.faults = config.faults
        #: Receipt behaviour; like ``faults`` it can change while the mock runs.
        self.receipts = config.receipts
        self.journal = Journal(config.ledger_path) if config.ledger_path is not None else None
        self.ledger = Ledger(self.journal)
        self.sms = SmsStore(config.lookup_messages)
        self.email = EmailStore(config.lookup_messages)
        if self.journal is not None:
            for entry in self.journal.read():
                self._restore(entry)
        self.rng = random.Random(config.seed)
        #: (channel, idempotency key) -> (status, body, content type) of the original answer.
        self.idempotent: OrderedDict[tuple[str, str], _Answer] = OrderedDict()
        self.closing = asyncio.Event()
        self.in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.callback_sender: Callable[[str, bytes, Mapping[str, str]], Awaitable[None]] | None = None
        #: Called with (channel, ref, address, body) of each accepted message (``mock_engagement``).
        self.on_accept: Callable[[str, str | None, str, str], None] | None = None

    def _restore(self, entry: Mapping[str, Any]) -> None:
        """One journaled message back into the ledger and its lookup store."""
        self.ledger.restore(entry)
        channel, provider_id, created = entry.get("ch"), entry.get("id"), float(entry["ts"])
        if channel == "sms" and isinstance(provider_id, str) and "body" in entry:
            self.sms.add(
                sid=provider_id,
                to=str(entry["to"]),
                from_=entry.get("from"),
                messaging_service_sid=entry.get("msid"),
                body=str(entry["body"]),
                created=created,
            )
        elif channel == "email" and isinstance(provider_id, str):
            ref = entry.get("ref")
            self.email.add(
                EmailRecord(
                    msg_id=provider_id,
                    to_email=str(entry["to"]),
                    from_email=str(entry.get("from") or ""),
                    subject=str(entry.get("subject") or ""),
                    created=created,
                    unique_args={} if ref is None else {"ref": str(ref)},
                )
            )

    @property
    def faults(self) -> FaultMix:
        return self._faults

    @faults.setter
    def faults(self, mix: FaultMix) -> None:
        """A new mix; its timed faults (outage, 401s) start now."""
        self._faults = mix
        self._faults_since = time.monotonic()

    def timed_fault(self) -> str | None:
        """The timed fault in force now: "unauthorized", "outage", or None."""
        mix = self._faults
        if not (mix.unauthorized_s or mix.outage_s):
            return None
        elapsed = time.monotonic() - self._faults_since
        if elapsed < mix.unauthorized_s:
            return "unauthorized"
        if elapsed < mix.outage_s:
            return "outage"
        return None

    def reset(self) -> None:
        """Empty the ledger, the lookup stores, the idempotency store and the journal."""
        if self.journal is not None:
            self.journal.truncate()
        self.ledger = Ledger(self.journal)
        self.sms = SmsStore(self.config.lookup_messages)
        self.email = EmailStore(self.config.lookup_messages)
        self.idempotent.clear()

    def honours(self, channel: str) -> bool:
        """Whether the twin of ``channel`` answers a repeated Idempotency-Key from its store."""
        return channel == "webhook" or self.config.honour_idempotency

    # -- faults ---------------------------------------------------------------------------------

    def _latency_s(self) -> float:
        mix = self.faults
        delay = mix.latency_ms
        if mix.jitter == "exponential" and mix.jitter_ms > 0:
            delay += self.rng.expovariate(1.0 / mix.jitter_ms)
        elif mix.jitter == "lognormal" and mix.jitter_ms > 0:
            delay += self.rng.lognormvariate(math.log(mix.jitter_ms), mix.jitter_sigma)
        return delay / 1000.0

    async def hang(self) -> None:
        """Sleep ``hang_s`` or until the mock shuts down, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), self.faults.hang_s)

    async def inject_faults(self, request: web.Request, error: ErrorFactory) -> web.StreamResponse | None:
        """Apply latency and maybe a fault; a response to send instead of the real one, or None."""
        delay = self._latency_s()
        if delay > 0:
            await asyncio.sleep(delay)
        mix = self.faults
        timed = self.timed_fault()
        if timed is not None:
            self.ledger.faults[timed] += 1
            if timed == "unauthorized":
                return error(401, "Authenticate", None)
            if mix.outage_mode == "reset":
                return reset_connection(request)
            return error(503, "Service Unavailable", None)
        roll = self.rng.random()
        for kind, p in (
            ("429", mix.p_429),
            ("500", mix.p_500),
            ("503", mix.p_503),
            ("timeout", mix.p_timeout),
            ("reset", mix.p_reset),
        ):
            if roll < p:
                self.ledger.faults[kind] += 1
                return await self._fault(kind, request, error)
            roll -= p
        return None

    async def _fault(self, kind: str, request: web.Request, error: ErrorFactory) -> web.StreamResponse:
        if kind == "429":
            return error(429, "Too Many Requests", self.faults.retry_after_s)
        if kind == "500":
            return error(500, "Internal Server Error", None)
        if kind == "503":
            return error(503, "Service Unavailable", None)
        if kind == "timeout":
            await self.hang()
            return error(503, "Service Unavailable", None)
        return reset_connection(request)

    async def after_accept(self, request: web.Request) -> None:
        """The ambiguous fault: the message is in the ledger, the client never hears so."""
        if self.faults.p_timeout_after_accept and self.rng.random() < (self.faults.p_timeout_after_accept):
            self.ledger.faults["timeout_after_accept"] += 1
            await self.hang()

    def admit(self, count: int = 1, *, now: float | None = None) -> bool:
        """Whether ``count`` more messages fit under the server-side rate limit this second."""
        limit = self.faults.rate_limit_per_s
        if limit is None:
            return True
        second = int(time.time() if now is None else now)
        if self.ledger.per_second.get(second, 0) + count > limit:
            self.ledger.faults["rate_limit"] += 1
            return False
        return True

    # -- idempotency ----------------------------------------------------------------------------

    def replay(self, channel: str, request: web.Request) -> web.Response | None:
        key = request.headers.get("Idempotency-Key")
        if not key or not self.honours(channel):
            return None
        stored = self.idempotent.get((channel, key))
        if stored is None:
            return None
        self.ledger.replays += 1
        status, body, content_type, headers = stored
        if body is None:  # SendGrid: 202, no body, the message id in a header
            return web.Response(status=status, headers=dict(headers))
        return web.Response(status=status, body=body, content_type=content_type, headers=dict(headers))

    def remember(self, channel: str, request: web.Request, response: web.Response) -> None:
        key = request.headers.get("Idempotency-Key")
        if key and self.honours(channel) and (response.body is None or isinstance(response.body, bytes)):
            content_type = response.content_type or "application/json"
            # an exact-size copy: orjson's output keeps its whole (8 KiB) buffer allocated
            body = bytes(memoryview(response.body)) if response.body is not None else None
            headers = tuple((name, response.headers[name]) for name in _REPLAYED_HEADERS if name in response.headers)
            self.idempotent[(channel, key)] = (response.status, body, content_type, headers)
            # Providers keep keys for a window, not forever: bound memory on multi-million runs
            # (a resend after a crash arrives within seconds, far inside this window).
            # OrderedDict: dropping the oldest is O(1) (a plain dict's next(iter()) rescans the
            # deleted slots at its front on every call: quadratic, ~40% of the mock's CPU)
            while len(self.idempotent) > self.config.idempotency_keys:
                self.idempotent.popitem(last=False)

    # -- background callbacks -------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        self.closing.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.journal is not None:
            self.journal.close()


def reset_connection(request: web.Request) -> web.StreamResponse:
    """Drop the connection without an answer (the client sees a disconnect)."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    # aiohttp writes nothing to an aborted transport; the response only ends the handler.
    return web.Response(status=499)
