"""The mock provider's ledger: what it accepted, counted, and (optionally) journaled to a file.

A journal makes duplicate counts true across a restart of the mock: every accepted message is
one JSON line appended to ``MockConfig.ledger_path`` and written with one ``write`` per request
(the file is unbuffered), so a SIGKILL of the mock loses at most the request being written. At
start-up the lines are replayed into the counters and into the lookup stores
(``loadtest.mock_lookup``).

A line (orjson, keys kept short: load tests write millions)::

    {"ch": "sms", "to": "+1555...", "digest": "<blake2b of channel, address, content>",
     "key": "<Idempotency-Key or null>", "id": "<provider id>", "ts": 1764800000.123, ...}

plus what the channel's lookup API needs (``body``/``from`` for SMS, ``ref``/``subject``/``from``
for email). It is the mock's own file: addresses are fine in it.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import orjson

__all__ = ["Journal", "JournalError", "Ledger", "content_digest"]


class JournalError(Exception):
    """The journal file cannot be read back (names the file and the line)."""


def content_digest(channel: str, address: str, content: str) -> bytes:
    """What makes two accepted messages "the same message" for the duplicate count."""
    return hashlib.blake2b(f"{channel}\x00{address}\x00{content}".encode(), digest_size=16).digest()


class Journal:
    """An append-only file of JSON lines; ``append`` writes each group with one system call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: Opened on the first write (a journal that fails to read back leaves nothing open).
        self._file: BinaryIO | None = None

    def _writer(self) -> BinaryIO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # unbuffered: a line is in the kernel's page cache once append returns, so a SIGKILL
            # of the mock does not lose it (an OS crash may: the mock does not fsync)
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        return self._file

    def read(self) -> Iterator[dict[str, Any]]:
        """The lines written so far. A torn last line (the mock was killed mid-write: that request
        never got its answer) is cut off the file, so the next line written starts clean."""
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(complete)
        for number, line in enumerate(data[:complete].split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise JournalError(f"{self.path}: line {number} is not JSON") from None
            if not isinstance(entry, dict):
                raise JournalError(f"{self.path}: line {number} is not a JSON object")
            yield entry

    def append(self, entries: list[dict[str, Any]]) -> None:
        if entries:
            data = b"".join(orjson.dumps(entry) + b"\n" for entry in entries)
            view = memoryview(data)
            writer = self._writer()
            while view:  # a raw write may be partial
                written = writer.write(view)
                view = view[written or 0 :]

    def truncate(self) -> None:
        self._writer().truncate(0)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Ledger:
    """Every message the mock accepted: to count losses and real double sends."""

    def __init__(self, journal: Journal | None = None) -> None:
        self.accepted = 0
        #: Accepted messages whose (channel, address, content) was accepted before.
        self.duplicates = 0
        #: Requests answered from the idempotency store (not accepted again).
        self.replays = 0
        #: Requests refused by validation (bad address, missing field, ...), not by faults.
        self.rejected = 0
        self.per_second: dict[int, int] = {}
        self.by_channel: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        #: Most provider requests being handled at once (shows the client's concurrency).
        self.max_in_flight = 0
        #: Receipt callbacks the mock sent: "sent" (2xx answer) and "failed".
        self.callbacks: Counter[str] = Counter()
        #: Accepted messages read back from the journal at start-up (included in ``accepted``).
        self.restored = 0
        self._seen: set[bytes] = set()
        self._journal = journal
        self._pending: list[dict[str, Any]] | None = None

    def record(
        self,
        channel: str,
        address: str,
        content: str,
        *,
        now: float | None = None,
        key: str | None = None,
        provider_id: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> bool:
        """Count one accepted message (and journal it); True when it duplicates an earlier one."""
        ts = time.time() if now is None else now
        digest = content_digest(channel, address, content)
        if self._journal is not None:
            entry = {"ch": channel, "to": address, "digest": digest.hex(), "key": key, "id": provider_id, "ts": ts}
            if detail:
                entry.update(detail)
            if self._pending is not None:
                self._pending.append(entry)
            else:
                self._journal.append([entry])
        return self._count(channel, digest, ts)

    @contextmanager
    def group(self) -> Iterator[None]:
        """Journal the messages recorded inside with one write (one request's recipients)."""
        self._pending = []
        try:
            yield
        finally:
            pending, self._pending = self._pending, None
            if self._journal is not None:
                self._journal.append(pending)

    def restore(self, entry: Mapping[str, Any]) -> None:
        """Count a journaled message again (start-up): nothing is written."""
        try:
            channel, digest, ts = str(entry["ch"]), bytes.fromhex(str(entry["digest"])), float(entry["ts"])
        except (KeyError, TypeError, ValueError) as exc:
            raise JournalError(f"journal entry lacks ch, digest or ts ({exc})") from None
        self.restored += 1
        self._count(channel, digest, ts)

    def _count(self, channel: str, digest: bytes, ts: float) -> bool:
        second = int(ts)
        self.accepted += 1
        self.by_channel[channel] += 1
        self.per_second[second] = self.per_second.get(second, 0) + 1
        if digest in self._seen:
            self.duplicates += 1
            return True
        self._seen.add(digest)
        return False

    def stats(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "replays": self.replays,
            "rejected": self.rejected,
            "restored": self.restored,
            "per_second": {str(second): n for second, n in sorted(self.per_second.items())},
            "by_channel": dict(self.by_channel),
            "faults": dict(self.faults),
            "callbacks": dict(self.callbacks),
            "max_in_flight": self.max_in_flight,
        }
