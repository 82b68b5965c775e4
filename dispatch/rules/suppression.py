"""Suppression lists in Redis: per-channel opt-out sets and a global blocklist.

Only a hash of the normalized address is stored (GDPR Art. 17: suppression has to outlive the
erased profile, so it must not keep the address itself). The hash is BLAKE2b-128 of the UTF-8
address, keyed with the deployment's secret key (:func:`suppression_key`:
``DISPATCH_SUPPRESSION_KEY``, or else a key generated on first use in
``$DISPATCH_HOME/suppression.key``). The key stops anyone with read access from testing guessed
phone numbers against the list (unkeyed, every number of a country is tried in seconds); losing
it makes the list unusable, and a process hashing with another key does not see the list, so
every process of a deployment must use the same key and it is backed up with the Redis data.
Members are the 16 raw digest bytes; :meth:`SuppressionStore.export` yields them as hex.
**Export gives hashes, never addresses**: an exported list can be imported into another
deployment with the same key (``import_hashes``) but cannot be turned back into a contact list.

Addresses must be normalized the way the planner normalizes them (``dispatch.rules.validation``: E.164
phones, lowercased email domains), otherwise the same person hashes differently.

The planner uses the sync :class:`SuppressionStore` (pipelined ``SMISMEMBER`` in chunks); the
send path re-checks with :class:`AsyncSuppressionStore`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import redis
import redis.asyncio as aredis

from dispatch.config import Settings
from dispatch.credentials import Secret, home_secret
from dispatch.errors import ConfigError

__all__ = [
    "GLOBAL",
    "SUPPRESSION_KEY_FILE",
    "AddressHasher",
    "AsyncSuppressionStore",
    "ImportResult",
    "SuppressionKeyMismatch",
    "SuppressionStore",
    "check_suppression_key",
    "hasher_for",
    "suppression_key",
]

#: Pseudo-channel of the global blocklist (checked for every channel).
GLOBAL: Final = "global"
#: Addresses per SMISMEMBER / SADD command.
DEFAULT_CHUNK: Final = 1_000
_DIGEST_SIZE: Final = 16
#: The generated key's file in the deployment's home (back it up with the Redis data).
SUPPRESSION_KEY_FILE: Final = "suppression.key"


@dataclass(frozen=True, slots=True)
class AddressHasher:
    """BLAKE2b-128 of a normalized address, keyed when ``key`` is set."""

    key: bytes = b""

    def __call__(self, address: str) -> bytes:
        return hashlib.blake2b(address.encode("utf-8"), digest_size=_DIGEST_SIZE, key=self.key).digest()


def suppression_key(settings: Settings) -> Secret:
    """The deployment's suppression key: ``DISPATCH_SUPPRESSION_KEY`` when set, otherwise the
    key generated on first use in ``$DISPATCH_HOME/suppression.key`` (64 hex digits, mode 0600;
    processes starting at once agree on one). Never empty: an unkeyed hash of a phone number is
    reversed by trying every number."""
    if settings.suppression_key:
        return settings.suppression_key
    return home_secret(settings.home.resolve() / SUPPRESSION_KEY_FILE)


def hasher_for(settings: Settings) -> AddressHasher:
    """The deployment's address hasher: every process must hash with the same key."""
    return AddressHasher(key=suppression_key(settings).reveal().encode())


log = logging.getLogger(__name__)

#: Default key prefix of the lists (``{prefix}:{channel}``).
DEFAULT_PREFIX: Final = "dispatch:suppress"
#: What the key id is a hash of: it names the key without revealing it.
_KEY_ID_INPUT: Final = "\x00dispatch suppression key id"


class SuppressionKeyMismatch(ConfigError):
    """This process hashes addresses with another key than the one the list was written with:
    it would see none of the opt-outs, so it must not plan or send."""


def check_suppression_key(client: redis.Redis, hasher: AddressHasher, prefix: str = DEFAULT_PREFIX) -> None:
    """Refuse to work with a key other than the list's (:class:`SuppressionKeyMismatch`).

    The first process of a deployment records the key's id (a keyed hash of a constant) beside
    the lists; every later one compares. A process on another host given another key, or a lost
    ``suppression.key``, is refused with a message saying what to do, instead of silently
    messaging people who opted out. A list written before key ids existed has nothing to compare with: the first process
    records its key and logs a warning. Called once at start-up by the planner, the API, every
    worker and the suppress command."""
    key_id_key = f"{prefix}:key-id"
    own = hasher(_KEY_ID_INPUT).hex()
    recorded = client.get(key_id_key)
    if recorded is None:
        lists = [k for k in client.scan_iter(match=f"{prefix}:*", count=1000) if k != key_id_key.encode()]
        if lists:  # written before key ids existed: nothing to compare with, say so once
            log.warning(
                "the suppression list (%d list(s) under %r) has no recorded key: recording this process's; "
                "if the list was written with another key, set DISPATCH_SUPPRESSION_KEY to it",
                len(lists),
                prefix,
            )
        client.set(key_id_key, own, nx=True)
        recorded = client.get(key_id_key)
    if recorded != own.encode():
        raise SuppressionKeyMismatch(
            "DISPATCH_SUPPRESSION_KEY",
            "this process's suppression key differs from the one the suppression list was written with, "
            "so it would not see the opt-outs",
            "give every process of the deployment the same DISPATCH_SUPPRESSION_KEY (or the same "
            "$DISPATCH_HOME/suppression.key)",
        )


@dataclass(frozen=True, slots=True)
class ImportResult:
    added: int  # new members (already present ones are not counted)
    invalid: int  # lines the normalizer refused


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


#: How long an addition stays in the list of recent additions (``recent_key``), which workers
#: poll to stop messages already past their batch's suppression check (see :class:`RecentFence`).
RECENT_KEEP_S = 300.0


class _Keys:
    def __init__(self, prefix: str, hasher: AddressHasher, chunk: int) -> None:
        self.prefix, self.hasher, self.chunk = prefix, hasher, chunk

    def key(self, channel: str) -> str:
        return f"{self.prefix}:{channel}"

    def recent(self) -> str:
        """Sorted set of recent additions: ``<channel>:<hash hex>`` -> when added (epoch s)."""
        return f"{self.prefix}:recent"

    def recent_members(self, channel: str, hashes: Sequence[bytes], now: float) -> dict[str, float]:
        return {f"{channel}:{h.hex()}": now for h in hashes}


class SuppressionStore:
    """Sync suppression store (plan time, CLI). ``channel`` is a channel name or :data:`GLOBAL`.
    ``hasher`` has no default: a deployment's stores use :func:`hasher_for` (another key would
    silently see none of the list)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        hasher: AddressHasher,
        prefix: str = DEFAULT_PREFIX,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        self._client = client
        self._k = _Keys(prefix, hasher, chunk)

    def add(self, channel: str, addresses: Iterable[str]) -> int:
        """Suppress ``addresses`` (normalized); returns how many were new."""
        return self._add_hashes(channel, [self._k.hasher(a) for a in addresses])

    def remove(self, channel: str, addresses: Iterable[str]) -> int:
        hashes = [self._k.hasher(a) for a in addresses]
        removed = 0
        for part in _chunks(hashes, self._k.chunk):
            removed += int(self._client.srem(self._k.key(channel), *part))
        return removed

    @property
    def hasher(self) -> AddressHasher:
        return self._k.hasher

    def contains_many(self, channel: str, addresses: Sequence[str]) -> list[bool]:
        """For each address: suppressed on ``channel`` or globally. One round trip per chunk."""
        return self.contains_hashes(channel, [self._k.hasher(a) for a in addresses])

    def contains_hashes(self, channel: str, hashes: Sequence[bytes]) -> list[bool]:
        """:meth:`contains_many` for addresses already hashed with :attr:`hasher`."""
        out: list[bool] = []
        own, glob = self._k.key(channel), self._k.key(GLOBAL)
        for part in _chunks(hashes, self._k.chunk):
            pipe = self._client.pipeline(transaction=False)
            members = list(part)
            pipe.smismember(own, members)
            pipe.smismember(glob, members)
            mine, everywhere = pipe.execute()
            out.extend(bool(a) or bool(b) for a, b in zip(mine, everywhere, strict=True))
        return out

    def count(self, channel: str) -> int:
        return int(self._client.scard(self._k.key(channel)))

    def import_file(
        self, path: Path, channel: str, normalize: Callable[[str], str | None] | None = None
    ) -> ImportResult:
        """Add one address per line (blank lines and ``#`` comments skipped), streaming.

        ``normalize`` returns the normalized address or None to refuse the line.
        """
        added = invalid = 0
        batch: list[bytes] = []
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                raw = line.strip()
                if not raw or raw.startswith("#"):
                    continue
                address = normalize(raw) if normalize is not None else raw
                if address is None:
                    invalid += 1
                    continue
                batch.append(self._k.hasher(address))
                if len(batch) >= self._k.chunk:
                    added += self._add_hashes(channel, batch)
                    batch = []
        added += self._add_hashes(channel, batch)
        return ImportResult(added, invalid)

    def import_hashes(self, channel: str, hex_hashes: Iterable[str]) -> int:
        """Add hashes produced by :meth:`export` (same hasher key)."""
        return self._add_hashes(channel, [bytes.fromhex(h.strip()) for h in hex_hashes if h.strip()])

    def export(self, channel: str) -> Iterator[str]:
        """The suppressed **hashes** (hex), not addresses; streamed with SSCAN."""
        for member in self._client.sscan_iter(self._k.key(channel), count=self._k.chunk):
            yield bytes(member).hex()

    def _add_hashes(self, channel: str, hashes: Sequence[bytes]) -> int:
        added = 0
        now = time.time()
        for part in _chunks(hashes, self._k.chunk):
            pipe = self._client.pipeline(transaction=False)
            pipe.sadd(self._k.key(channel), *part)
            pipe.zadd(self._k.recent(), self._k.recent_members(channel, part, now))
            pipe.zremrangebyscore(self._k.recent(), "-inf", now - RECENT_KEEP_S)
            added += int(pipe.execute()[0])
        return added


class AsyncSuppressionStore:
    """The same store for the async send path (re-check just before sending)."""

    def __init__(
        self,
        client: aredis.Redis,
        *,
        hasher: AddressHasher,
        prefix: str = DEFAULT_PREFIX,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        self._client = client
        self._k = _Keys(prefix, hasher, chunk)

    async def add(self, channel: str, addresses: Iterable[str]) -> int:
        hashes = [self._k.hasher(a) for a in addresses]
        added = 0
        now = time.time()
        for part in _chunks(hashes, self._k.chunk):
            pipe = self._client.pipeline(transaction=False)
            pipe.sadd(self._k.key(channel), *part)
            pipe.zadd(self._k.recent(), self._k.recent_members(channel, part, now))
            pipe.zremrangebyscore(self._k.recent(), "-inf", now - RECENT_KEEP_S)
            added += int((await pipe.execute())[0])
        return added

    async def recent_since(self, since: float) -> list[tuple[str, bytes, float]]:
        """Additions after ``since`` (epoch s): (channel, address hash, when), oldest first."""
        raw = cast(
            list[tuple[bytes, float]],
            await self._client.zrangebyscore(self._k.recent(), f"({since}", "+inf", withscores=True),
        )
        out: list[tuple[str, bytes, float]] = []
        for member, score in raw:
            channel, _, digest = member.decode().rpartition(":")
            out.append((channel, bytes.fromhex(digest), float(score)))
        return out

    @property
    def hasher(self) -> AddressHasher:
        return self._k.hasher

    async def remove(self, channel: str, addresses: Iterable[str]) -> int:
        hashes = [self._k.hasher(a) for a in addresses]
        removed = 0
        for part in _chunks(hashes, self._k.chunk):
            removed += int(await self._client.srem(self._k.key(channel), *part))
        return removed

    async def contains_many(self, channel: str, addresses: Sequence[str]) -> list[bool]:
        out: list[bool] = []
        own, glob = self._k.key(channel), self._k.key(GLOBAL)
        for part in _chunks(addresses, self._k.chunk):
            hashes = [self._k.hasher(a) for a in part]
            pipe = self._client.pipeline(transaction=False)
            pipe.smismember(own, hashes)
            pipe.smismember(glob, hashes)
            mine, everywhere = await pipe.execute()
            out.extend(bool(a) or bool(b) for a, b in zip(mine, everywhere, strict=True))
        return out
