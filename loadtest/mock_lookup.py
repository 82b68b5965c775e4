"""What the provider twins' lookup APIs answer from: accepted SMS and emails, newest first.

``SmsStore`` backs Twilio's Messages list (``GET .../Messages.json?To=...``) and fetch
(``.../Messages/{Sid}.json``); ``EmailStore`` backs SendGrid's Email Activity API
(``GET /v3/messages?query=...``). Both keep the newest ``limit`` messages (a provider keeps
months; a load test of millions must not hold them all in memory), indexed by address (and email
by our ``ref`` custom arg) so a reconciliation of thousands of messages does not scan them all.
They are rebuilt from the ledger's journal when the mock restarts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EmailRecord", "EmailStore", "SmsRecord", "SmsStore"]


@dataclass(slots=True)
class SmsRecord:
    """One accepted Twilio message (its resource is rendered from this at read time)."""

    seq: int
    sid: str
    to: str
    from_: str | None
    messaging_service_sid: str | None
    body: str
    created: float


class SmsStore:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seq = 0
        self._all: deque[SmsRecord] = deque()
        # lists, not deques, per number: most numbers hold one message (an empty deque is ~600 bytes)
        self._by_to: dict[str, list[SmsRecord]] = {}
        self._by_sid: dict[str, SmsRecord] = {}

    def add(
        self, *, sid: str, to: str, from_: str | None, messaging_service_sid: str | None, body: str, created: float
    ) -> SmsRecord:
        self._seq += 1
        record = SmsRecord(self._seq, sid, to, from_, messaging_service_sid, body, created)
        self._all.append(record)
        self._by_to.setdefault(to, []).append(record)
        self._by_sid[sid] = record
        while len(self._all) > self.limit:
            self._forget(self._all.popleft())
        return record

    def _forget(self, old: SmsRecord) -> None:
        del self._by_sid[old.sid]
        _drop_oldest(self._by_to, old.to)

    def get(self, sid: str) -> SmsRecord | None:
        return self._by_sid.get(sid)

    def newest_first(self, to: str | None = None, *, before_seq: int | None = None) -> Iterator[SmsRecord]:
        """Records (to ``to`` if given), newest first, from just below ``before_seq`` if given."""
        records: Sequence[SmsRecord] = self._all if to is None else self._by_to.get(to, [])
        for record in reversed(records):
            if before_seq is None or record.seq < before_seq:
                yield record

    def __len__(self) -> int:
        return len(self._all)


@dataclass(slots=True)
class EmailRecord:
    """One accepted recipient of a SendGrid request, as the activity feed lists it."""

    msg_id: str
    to_email: str
    from_email: str
    subject: str
    created: float
    unique_args: Mapping[str, str] = field(default_factory=dict)

    def field_value(self, name: str) -> str | None:
        if name == "to_email":
            return self.to_email
        if name == "from_email":
            return self.from_email
        if name == "subject":
            return self.subject
        if name == "msg_id":
            return self.msg_id
        return None


class EmailStore:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._all: deque[EmailRecord] = deque()
        self._by_to: dict[str, list[EmailRecord]] = {}
        self._by_ref: dict[str, list[EmailRecord]] = {}

    def add(self, record: EmailRecord) -> None:
        self._all.append(record)
        self._by_to.setdefault(record.to_email, []).append(record)
        ref = record.unique_args.get("ref")
        if ref is not None:
            self._by_ref.setdefault(ref, []).append(record)
        while len(self._all) > self.limit:
            old = self._all.popleft()
            _drop_oldest(self._by_to, old.to_email)
            old_ref = old.unique_args.get("ref")
            if old_ref is not None:
                _drop_oldest(self._by_ref, old_ref)

    def candidates(self, *, to_email: str | None = None, ref: str | None = None) -> Iterator[EmailRecord]:
        """Newest first, narrowed by the most selective index the query allows."""
        records: Sequence[EmailRecord]
        if ref is not None:
            records = self._by_ref.get(ref, [])
        elif to_email is not None:
            records = self._by_to.get(to_email, [])
        else:
            records = self._all
        return reversed(records)

    def __len__(self) -> int:
        return len(self._all)


def _drop_oldest(index: dict[str, list[Any]], key: str) -> None:
    """Forget the oldest record under ``key`` (records are appended in order: it is the first)."""
    same = index[key]
    del same[0]
    if not same:
        del index[key]
