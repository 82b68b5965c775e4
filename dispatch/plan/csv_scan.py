"""The planner's per-row work, shared by every source, and the fast, parallel CSV file path.

:class:`RowScanner` applies the row-level checks of ``dispatch.plan.planner`` (steps 1-5 there: the
row itself, the address, consent, freshness, the recipient's local time) and prepares what the
rest of the plan needs from an accepted row: the normalized address, its 16-byte hash (dedup,
suppression and frequency keys), its not-before instant, its SMS cost and its snapshot row
already encoded as JSON. Dedup, suppression and the frequency cap (steps 6-8) need the whole
audience in row order and stay in the planner process (``Planner._merge``).

Results come in :class:`Chunk` objects (consecutive rows, compact arrays, cheap to pickle), so
the same merge serves an in-process scan and worker processes.

CSV files (not gzip) take a fast path:

- rows are read as lists by column index (``str.split`` on a decoded block when the block has no
  quote, CR or NUL character and no over-long line; otherwise the exact record splitter of
  ``dispatch.plan.audience``), and no ``Recipient`` is built unless a row needs the general path
  (an unusual consent spelling, an unparsable timestamp, an oversized field, no id, ...);
- the file is cut into byte ranges that worker processes (``forkserver``) scan in parallel; the
  planner merges their chunks in row order, so counts, reasons, row numbers and the snapshot are
  those of a single sequential read.

**Where a file may be cut** (the rule that keeps quoted newlines exact): only at a line start
where the sequential reader is between records. :func:`find_cuts` finds them from the header on:
a run of lines without any quote character leaves the reader as it was (between records: each
such line is a record of its own), so it jumps from quote to quote with ``bytes.find``; at a
line holding a quote it runs the record reader itself (``dispatch.plan.audience.CsvRecords``) until
that reader is between records again (an over-long quoted field is followed to its real end).
When such exact reading would cover a good part of the file (quoted fields on most lines), the
rest of the file is read in the planner process, exactly, without workers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import multiprocessing
import os
import string
import sys
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from itertools import repeat
from pathlib import Path
from typing import Any, Final, NamedTuple

import orjson

from dispatch.errors import AudienceError
from dispatch.plan.audience import (
    CONSENT_WORDS,
    BadValue,
    ColumnMap,
    CsvBuilder,
    CsvRecords,
    Lines,
    ReadLimits,
    Recipient,
    RowRejected,
    csv_records,
    maybe_gunzip,
    parse_time,
    take_header,
)
from dispatch.plan.dedup import id_fingerprints
from dispatch.rules.checks import (
    FreshnessPolicy,
    QuietHours,
    QuietHoursPlanner,
    Reason,
    check_freshness,
    resolve_timezone,
)
from dispatch.rules.validation import ADDRESS_FIELD, AddressValidator

__all__ = ["Chunk", "RowScanner", "ScanConfig", "find_cuts", "scan_csv_file"]

#: Rows per chunk when a stream is scanned in the planner process.
CHUNK_ROWS: Final = 50_000
#: Bytes per range handed to a worker process.
CHUNK_BYTES: Final = 4 * 2**20
#: Ranges in flight per worker process (bounds the planner's memory).
IN_FLIGHT: Final = 2
#: A file smaller than this is scanned in the planner process (workers take ~0.5 s to start).
PARALLEL_MIN_BYTES: Final = 32 * 2**20
#: Distinct timestamps / timezone names / rendered bodies remembered per process.
_CACHE: Final = 4_096

_MISSING_ADDRESS: Final = str(Reason.MISSING_ADDRESS)
_INVALID_PHONE: Final = str(Reason.INVALID_PHONE)
_NOT_SMS: Final = str(Reason.NOT_SMS_CAPABLE)
_NO_CONSENT: Final = str(Reason.NO_CONSENT)
_NO_ZONE: Final = str(Reason.UNKNOWN_TIMEZONE)
_TOO_LONG: Final = str(Reason.BODY_TOO_LONG)
_MALFORMED: Final = str(Reason.MALFORMED_ROW)


@dataclass(frozen=True, kw_only=True)
class ScanConfig:
    """Everything a process needs to scan rows for one plan (picklable)."""

    channel: str
    region: str | None
    hash_key: bytes
    started: datetime
    as_of: datetime
    freshness: FreshnessPolicy | None
    quiet_hours: QuietHours | None
    default_timezone: str | None
    require_timezone: bool
    require_consent: bool
    template_fields: tuple[str, ...]
    body: str
    columns: ColumnMap
    limits: ReadLimits
    delimiter: str = ","
    quote: str = '"'


class Chunk(NamedTuple):
    """The scan of consecutive rows. Row numbers are relative to the chunk (1 = its first row).

    ``rejects``: (row, recipient id, field, reason) for rows refused by steps 1-5; candidates
    (rows that passed them), in row order: ``rows``, ``ids``, ``encoded`` (the snapshot row
    ``[id, address, attrs]`` as JSON without its closing bracket: the slice is an exact-size copy,
    where orjson's own result keeps a ~4 KiB allocation), ``hashes`` (16 bytes each, concatenated), ``fingerprints``
    (the first 8 bytes of each hash as an integer), ``not_before``, ``cost`` (SMS segments,
    else 1) and ``id_fingerprints`` (``dispatch.plan.dedup.id_fingerprints`` of ``ids``: computed here,
    in the worker processes, for the planner's dedup of repeated ids). ``national``: how many of
    the ``invalid_phone`` rejections are numbers without ``+`` that no region was there to read
    (neither the recipient's nor the campaign's): the plan report's hint to set a region.
    """

    total: int
    rejects: list[tuple[int, str, str, str]]
    rows: array[int]
    ids: list[str]
    encoded: list[bytes]
    hashes: bytes
    fingerprints: array[int]
    not_before: array[float]
    cost: array[int]
    id_fingerprints: array[int]
    national: int = 0


class RowScanner:
    """Steps 1-5 of the plan for one process (keeps its caches across chunks)."""

    def __init__(
        self, config: ScanConfig, header: list[str] | None = None, *, validator: AddressValidator | None = None
    ) -> None:
        self.config = config
        c = config
        self.channel = c.channel
        self.field_name = ADDRESS_FIELD[c.channel]
        self.validator = validator if validator is not None else AddressValidator(c.region)
        self.hash_key = c.hash_key
        self.started = c.started.timestamp()
        self.quiet = (
            QuietHoursPlanner(c.started, c.quiet_hours, resolve_timezone(c.default_timezone))
            if c.quiet_hours is not None
            else None
        )
        self.no_zone_ok = c.default_timezone is None and not c.require_timezone
        self.template = string.Template(c.body)
        spec = self.validator.registry.channel(c.channel)
        #: Rate-limit units of one message (SMS: segments); a body that depends on the recipient
        #: (template fields) is costed per recipient.
        self.cost_of_body = spec.cost
        #: The channel's body limits (SMS: 1,600 characters, Twilio's 21617; push: 4,096 bytes):
        #: a personalized body over them is the row's ``body_too_long`` (cost -1 below); a body
        #: without fields is checked once, before the plan starts (``check_body``).
        self.max_chars = spec.limits.max_chars
        self.max_bytes = spec.limits.max_bytes
        limited = self.max_chars is not None or self.max_bytes is not None
        self.static_cost: int | None = 1
        if c.template_fields and (spec.cost_per_body or limited):
            self.static_cost = None  # costed (and measured) per recipient
        elif spec.cost_per_body:
            self.static_cost = spec.cost(c.body)
        #: Addresses are phone numbers that must receive SMS: the scan's fast path looks them up.
        self.sms_numbers = spec.address_kind == "sms_number"
        self._costs: dict[Any, int] = {}
        self._zones: dict[str | None, float | None] = {}
        self._times: dict[str, str | None] = {}
        if c.freshness is not None:
            self.oldest = c.as_of - c.freshness.max_staleness
            self.newest = c.as_of + c.freshness.future_skew
        self.header = header
        if header is not None:
            self._index_columns(header)

    # --- columns of a CSV header ---------------------------------------------------------------

    def _index_columns(self, header: list[str]) -> None:
        c = self.config.columns
        index = {name: i for i, name in enumerate(header)}
        self.width = len(header)
        self.builder = CsvBuilder(c, self.config.limits, header)
        self.id_i = index.get(c.id)
        column = getattr(c, self.field_name)
        self.addr_i = index.get(column) if column is not None else None
        zone = c.timezone
        self.zone_i = index.get(zone) if zone is not None else None
        self.region_i = self.builder.region_i  # the same columns, in the same order, as the general path
        self.updated_i = index.get(c.updated_at) if c.updated_at is not None else None
        self.consent_i = tuple(index[col] for col in c.consent.values() if col in index)
        own = c.consent.get(self.channel)
        self.own_consent_i = index.get(own) if own is not None else None
        attrs = {n: index[n] for n in c.attribute_columns(header) if n in index}
        self.attr_i = tuple(attrs.get(f) for f in self.config.template_fields)

    # --- the general path (any Recipient) ------------------------------------------------------

    def check(self, r: Recipient) -> tuple[str, str] | tuple[str, float, dict[str, str] | None]:
        """(field, reason) for a refused recipient, else (normalized address, not-before, attrs)."""
        reason, address = self.validator.check(self.channel, r.address(self.field_name), r.region)
        if reason is not None:
            return self.field_name, str(reason)
        given = r.consent.get(self.channel)
        if given is not True and (given is not None or self.config.require_consent):
            return "consent", _NO_CONSENT
        if self.config.freshness is not None:
            stale = check_freshness(r.updated_at, self.config.as_of, self.config.freshness)
            if stale is not None:
                return "updated_at", str(stale)
        not_before = self.started
        if self.quiet is not None and not (r.timezone is None and self.no_zone_ok):
            found = self.quiet.not_before(r.timezone)
            if isinstance(found, Reason):
                return "timezone", _NO_ZONE
            not_before = found.timestamp()
        fields = self.config.template_fields
        attrs = {f: r.attributes.get(f) or "" for f in fields} if fields else None
        return address, not_before, attrs

    def _unread(self, raw: str, region: str | None) -> bool:
        """An invalid number is a national one no region was there to read (see ``Chunk.national``)."""
        return self.validator.phones_for(region).default_region is None and not raw.lstrip().startswith("+")

    def cost(self, attrs: dict[str, str] | None) -> int:
        if self.static_cost is not None:
            return self.static_cost
        key = tuple(attrs.values()) if attrs else None
        found = self._costs.get(key)
        if found is None:
            body = self.template.safe_substitute(attrs) if attrs else self.config.body
            found = -1 if self._too_long(body) else self.cost_of_body(body)
            if len(self._costs) >= _CACHE:
                self._costs.clear()
            self._costs[key] = found
        return found

    def _too_long(self, body: str) -> bool:
        return (self.max_chars is not None and len(body) > self.max_chars) or (
            self.max_bytes is not None and len(body.encode()) > self.max_bytes
        )

    def scan_items(self, items: Iterable[Recipient | RowRejected]) -> Chunk:
        """A chunk from already-built rows (the iterable API); rows keep their own numbers."""
        out = _ChunkBuilder()
        count = 0
        for item in items:
            count += 1
            self._add_item(out, item.row, item)
        return out.chunk(count, self.hash_key)

    def _add_item(self, out: _ChunkBuilder, n: int, item: Recipient | RowRejected) -> None:
        if isinstance(item, RowRejected):
            out.rejects.append((n, "", item.field or "", str(item.reason)))
            return
        found = self.check(item)
        if len(found) == 2:
            out.rejects.append((n, item.id, found[0], found[1]))
            if found[1] == _INVALID_PHONE and self._unread(item.address(self.field_name) or "", item.region):
                out.national += 1
            return
        address, not_before, attrs = found
        cost = self.cost(attrs)
        if cost < 0:
            out.rejects.append((n, item.id, "body", _TOO_LONG))
            return
        digest = hashlib.blake2b(address.encode(), digest_size=16, key=self.hash_key).digest()
        out.add(n, item.id, orjson.dumps((item.id, address, attrs))[:-1], digest, not_before, cost)

    # --- CSV records ---------------------------------------------------------------------------

    def scan_records(
        self, records: Iterable[list[str] | tuple[None, Reason | None, str]], *, long_fields: bool = True
    ) -> Chunk:
        """Scan parsed CSV records (field lists, or ``(None, reason, detail)`` for a record the
        splitter refused) in order; the fast path of the module docstring. ``long_fields=False``
        promises that no field can exceed ``max_field_bytes`` (no line is that long)."""
        out = _ChunkBuilder()
        rejects = out.rejects
        width = self.width
        id_i, addr_i, zone_i, updated_i = self.id_i, self.addr_i, self.zone_i, self.updated_i
        consent_i, own_i, attr_i = self.consent_i, self.own_consent_i, self.attr_i
        words = CONSENT_WORDS
        large = self.config.limits.max_field_bytes
        require_consent = self.config.require_consent
        channel, field_name = self.channel, self.field_name
        sms = self.sms_numbers
        lookup = self.validator.phones.lookup
        region_i, phones_for = self.region_i, self.validator.phones_for
        check_address = self.validator.check
        times, check_time = self._times, self._time
        zones, zone_of = self._zones, self._zone
        quiet = self.quiet is not None
        no_zone_ok = self.no_zone_ok
        started = self.started
        keyed = hashlib.blake2b(digest_size=16, key=self.hash_key)
        copy = keyed.copy
        dumps = orjson.dumps
        static_cost = self.static_cost
        cost_of = self.cost
        one_attr = attr_i[0] if len(attr_i) == 1 and attr_i[0] is not None else -1
        template_fields = self.config.template_fields
        add = out.add
        n = 0
        for n, fields in enumerate(records, start=1):
            if len(fields) != width or fields[0] is None or id_i is None:
                if fields[0] is None:
                    rejects.append((n, "", "", str(fields[1] or _MALFORMED)))
                else:
                    self._add_item(out, n, self._build(n, fields))
                continue
            rid = fields[id_i]
            if not rid or rid.isspace() or (long_fields and max(map(len, fields)) * 4 > large):
                self._add_item(out, n, self._build(n, fields))
                continue
            slow = False
            for i in consent_i:
                value = fields[i]
                if value and value not in words:
                    slow = True
            time_text = fields[updated_i] if updated_i is not None else ""
            if time_text:
                stale = times.get(time_text, "?")
                if stale == "?":
                    stale = check_time(time_text)
                if stale == _MALFORMED:
                    slow = True
            else:
                stale = self._missing_time
            if slow:
                self._add_item(out, n, self._build(n, fields))
                continue
            raw = fields[addr_i] if addr_i is not None else ""
            if not raw or raw.isspace():
                rejects.append((n, rid, field_name, _MISSING_ADDRESS))
                continue
            if sms:
                region = None
                for i in region_i:  # the recipient's own region, as CsvBuilder reads it
                    if fields[i]:
                        region = fields[i]
                        break
                address, capable = (lookup if region is None else phones_for(region).lookup)(raw)
                if address is None:
                    rejects.append((n, rid, field_name, _INVALID_PHONE))
                    if self._unread(raw, region):
                        out.national += 1
                    continue
                if not capable:
                    rejects.append((n, rid, field_name, _NOT_SMS))
                    continue
            else:
                reason, address = check_address(channel, raw)
                if reason is not None:
                    rejects.append((n, rid, field_name, str(reason)))
                    continue
            given = words.get(fields[own_i]) if own_i is not None else None
            if given is not True and (given is not None or require_consent):
                rejects.append((n, rid, "consent", _NO_CONSENT))
                continue
            if stale is not None:
                rejects.append((n, rid, "updated_at", stale))
                continue
            not_before = started
            if quiet:
                zone = (fields[zone_i] or None) if zone_i is not None else None
                if not (zone is None and no_zone_ok):
                    found = zones.get(zone, -1.0)
                    if found == -1.0:
                        found = zone_of(zone)
                    if found is None:
                        rejects.append((n, rid, "timezone", _NO_ZONE))
                        continue
                    not_before = found
            if one_attr >= 0:
                attrs: dict[str, str] | None = {template_fields[0]: fields[one_attr]}
            elif template_fields:
                attrs = {f: fields[i] if i is not None else "" for f, i in zip(template_fields, attr_i, strict=True)}
            else:
                attrs = None
            cost = static_cost if static_cost is not None else cost_of(attrs)
            if cost < 0:
                rejects.append((n, rid, "body", _TOO_LONG))
                continue
            hasher = copy()  # the keyed state copied: cheaper than keying a new one
            hasher.update(address.encode())
            add(n, rid, dumps((rid, address, attrs))[:-1], hasher.digest(), not_before, cost)
        return out.chunk(n, self.hash_key)

    def _build(self, n: int, fields: list[str]) -> Recipient | RowRejected:
        if len(fields) != self.width:
            return RowRejected(n, Reason.MALFORMED_ROW, None, f"{len(fields)} fields, header has {self.width}")
        return self.builder.build(n, fields)

    @property
    def _missing_time(self) -> str | None:
        """The freshness verdict for a row without ``updated_at``."""
        return str(Reason.STALE_MISSING) if self.config.freshness is not None else None

    def _time(self, text: str) -> str | None:
        """The freshness verdict for an ``updated_at`` text (``malformed_row``: take the general path)."""
        try:
            value = parse_time(text, "updated_at")
        except BadValue:
            verdict: str | None = _MALFORMED
        else:
            freshness = self.config.freshness
            stale = check_freshness(value, self.config.as_of, freshness) if freshness is not None else None
            verdict = str(stale) if stale is not None else None
        if len(self._times) >= _CACHE:
            self._times.clear()
        self._times[text] = verdict
        return verdict

    def _zone(self, name: str | None) -> float | None:
        assert self.quiet is not None
        found = self.quiet.not_before(name)
        value = None if isinstance(found, Reason) else found.timestamp()
        if len(self._zones) >= _CACHE:
            self._zones.clear()
        self._zones[name] = value
        return value

    # --- byte ranges of a CSV file ---------------------------------------------------------------

    def scan_block(self, data: bytes) -> Chunk:
        """Scan the rows of ``data``: whole lines of the file that start between records."""
        c = self.config
        lines = _plain_lines(data, c.limits, c.quote)
        if lines is not None:
            longest = max(map(len, lines), default=0)
            records = map(str.split, filter(None, lines), repeat(c.delimiter))
            return self.scan_records(records, long_fields=longest * 4 > c.limits.max_field_bytes)
        source = Lines(io.BytesIO(data), c.limits.max_line_bytes, c.quote.encode())
        return self.scan_records(_exact(csv_records(source, c.limits, c.delimiter, c.quote)))


def _exact(
    records: Iterator[tuple[list[str] | None, Reason | None, str]],
) -> Iterator[list[str] | tuple[None, Reason | None, str]]:
    for record in records:
        fields = record[0]
        yield fields if fields is not None else (None, record[1], record[2])


def _plain_lines(data: bytes, limits: ReadLimits, quote: str) -> list[str] | None:
    """The lines of ``data`` when ``str.split`` reads them exactly as the record splitter would:
    no quote and no NUL anywhere, CR only in CRLF line ends, valid UTF-8, no line near the
    length limit."""
    if quote.encode() in data or b"\x00" in data:
        return None
    crlf = b"\r" in data
    if crlf and data.count(b"\r") != data.count(b"\r\n"):
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if crlf:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    if lines and not lines[-1]:
        lines.pop()
    if len(data) >= limits.max_line_bytes - 1 and max(map(len, lines)) * 4 >= limits.max_line_bytes - 1:
        return None
    return lines


class _ChunkBuilder:
    __slots__ = ("cost", "encoded", "fingerprints", "hashes", "ids", "national", "not_before", "rejects", "rows")

    def __init__(self) -> None:
        self.national = 0
        self.rejects: list[tuple[int, str, str, str]] = []
        self.rows: array[int] = array("q")
        self.ids: list[str] = []
        self.encoded: list[bytes] = []
        self.hashes: list[bytes] = []
        self.fingerprints: array[int] = array("Q")
        self.not_before: array[float] = array("d")
        self.cost: array[int] = array("q")

    def add(self, n: int, rid: str, encoded: bytes, digest: bytes, not_before: float, cost: int) -> None:  # noqa: PLR0917
        self.rows.append(n)
        self.ids.append(rid)
        self.encoded.append(encoded)
        self.hashes.append(digest)
        self.not_before.append(not_before)
        self.cost.append(cost)

    def chunk(self, count: int, key: bytes) -> Chunk:
        hashes = b"".join(self.hashes)
        fingerprints = _fingerprints(hashes)
        ids = self.ids
        return Chunk(
            count,
            self.rejects,
            self.rows,
            ids,
            self.encoded,
            hashes,
            fingerprints,
            self.not_before,
            self.cost,
            id_fingerprints(ids, key),
            self.national,
        )


def _fingerprints(hashes: bytes) -> array[int]:
    """The first 8 bytes of each 16-byte hash as a little-endian integer, in one array."""
    both = array("Q", hashes)  # two machine words per hash
    if sys.byteorder != "little":
        both.byteswap()
    return both[::2]


# --- cutting a CSV file and scanning it in worker processes -------------------------------------


def find_cuts(
    path: Path, start: int, limits: ReadLimits, quote: str, chunk: int = CHUNK_BYTES, *, delimiter: str = ","
) -> Iterator[int]:
    """Offsets after ``start`` (where the reader is between records) where the file may be cut
    (see the module docstring), ending with the file size, or with -1 when the rest must be read
    in one piece from the previous offset."""
    size = path.stat().st_size
    qb = quote.encode()
    with path.open("rb") as handle:
        last = pos = start  # the last cut; a line start where the reader is between records
        exact = 0  # bytes read with the record reader since the last cut
        while True:
            q = _next_quote(handle, pos, qb)
            end = size if q < 0 else _line_start(handle, pos, q)
            # the lines in [pos, end) hold no quote: every line start there is between records
            while end - last > chunk:
                handle.seek(max(last + chunk, pos))
                handle.readline()
                cut = handle.tell()
                if cut <= last or cut > end or cut >= size:
                    break
                yield cut
                last, exact = cut, 0
            if q < 0:
                yield size
                return
            handle.seek(end)  # read the quoted part exactly, up to the next point between records
            lines = Lines(handle, limits.max_line_bytes, qb)
            records = CsvRecords(lines, limits, delimiter, quote)
            for _record in records:
                if records.idle:
                    break
            pos = end + lines.consumed
            exact += pos - end
            if exact > 4 * chunk:  # quoted fields on most lines: the rest is read in one piece
                yield -1
                return
            if pos >= size:
                yield size
                return


def _next_quote(handle: Any, pos: int, qb: bytes) -> int:
    """Offset of the first quote byte at or after ``pos``, -1 when there is none."""
    handle.seek(pos)
    offset = pos
    while True:
        block = handle.read(CHUNK_BYTES)
        if not block:
            return -1
        found = block.find(qb)
        if found >= 0:
            return int(offset + found)
        offset += len(block)


def _line_start(handle: Any, pos: int, q: int) -> int:
    """Start of the line holding offset ``q``, not before ``pos`` (itself a line start)."""
    end = q
    while end > pos:
        begin = max(pos, end - 64 * 1024)
        handle.seek(begin)
        found = handle.read(end - begin).rfind(b"\n")
        if found >= 0:
            return int(begin + found + 1)
        end = begin
    return pos


_worker: RowScanner | None = None
_worker_path: str = ""


def _init_worker(config: ScanConfig, header: list[str], path: str) -> None:
    global _worker, _worker_path  # noqa: PLW0603 - one scanner per worker process
    _worker = RowScanner(config, header)
    _worker_path = path


def _scan_range(start: int, end: int) -> Chunk:
    assert _worker is not None
    with open(_worker_path, "rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    return _worker.scan_block(data)


def _header(handle: io.BufferedReader | Any, config: ScanConfig) -> list[str] | None:
    lines = Lines(handle, config.limits.max_line_bytes, config.quote.encode())
    return take_header(csv_records(lines, config.limits, config.delimiter, config.quote))


def _chunks_of(records: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while True:
        part = []
        for record in records:
            part.append(record)
            if len(part) >= size:
                break
        if not part:
            return
        yield part


def scan_csv_file(
    config: ScanConfig,
    path: Path,
    *,
    processes: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    parallel_min_bytes: int = PARALLEL_MIN_BYTES,
) -> Iterator[Chunk]:
    """Chunks of a CSV audience file (optionally gzip), in row order; parallel when the file is
    at least ``parallel_min_bytes``, plain (not gzip) and ``processes`` > 1 (default: the CPU
    count), in ranges of about ``chunk_bytes``."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise AudienceError(f"cannot open audience {path.name!r}: {exc.strerror}") from None
    with handle:
        try:
            stream = maybe_gunzip(handle, config.limits)
        except (OSError, ValueError) as exc:
            raise AudienceError(f"audience stream cannot be read: {exc}") from None
        header = _header(stream, config)
        if header is None:
            return
        scanner = RowScanner(config, header)
        workers = processes if processes is not None else (os.cpu_count() or 1)
        plain = not isinstance(stream, gzip.GzipFile)
        # a daemonic process (a multiprocessing pool worker) may not start processes of its own
        daemon = multiprocessing.current_process().daemon
        if plain and workers > 1 and not daemon and path.stat().st_size >= parallel_min_bytes:
            start = stream.tell()
            yield from _parallel(scanner, path, start, workers, chunk_bytes)
            return
        if not plain:
            lines = Lines(stream, config.limits.max_line_bytes, config.quote.encode())
            records = csv_records(lines, config.limits, config.delimiter, config.quote)
            for part in _chunks_of(_exact(records), CHUNK_ROWS):
                yield scanner.scan_records(part)
            return
        start = stream.tell()
    yield from _sequential(scanner, path, start, chunk_bytes)


def _sequential(scanner: RowScanner, path: Path, start: int, chunk_bytes: int) -> Iterator[Chunk]:
    """Scan from ``start`` to the end of the file in the planner process."""
    config = scanner.config
    last = start
    for cut in find_cuts(path, start, config.limits, config.quote, chunk_bytes, delimiter=config.delimiter):
        if cut < 0:
            with path.open("rb") as handle:
                handle.seek(last)
                lines = Lines(handle, config.limits.max_line_bytes, config.quote.encode())
                records = csv_records(lines, config.limits, config.delimiter, config.quote)
                for part in _chunks_of(_exact(records), CHUNK_ROWS):
                    yield scanner.scan_records(part)
            return
        with path.open("rb") as handle:
            handle.seek(last)
            data = handle.read(cut - last)
        yield scanner.scan_block(data)
        last = cut


def _parallel(scanner: RowScanner, path: Path, start: int, workers: int, chunk_bytes: int) -> Iterator[Chunk]:
    config = scanner.config
    assert scanner.header is not None
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(config, scanner.header, str(path))
    ) as pool:
        pending: deque[Future[Chunk]] = deque()
        try:
            last = start
            for cut in find_cuts(path, start, config.limits, config.quote, chunk_bytes, delimiter=config.delimiter):
                if cut < 0:
                    while pending:
                        yield pending.popleft().result()
                    yield from _sequential(scanner, path, last, chunk_bytes)
                    return
                pending.append(pool.submit(_scan_range, last, cut))
                last = cut
                while len(pending) >= workers * IN_FLIGHT:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
