"""Audience input: CSV / JSONL files (optionally gzip), Python iterables and PostgreSQL queries,
streamed in bounded memory into :class:`Recipient` objects.

Every source row becomes exactly one :class:`Recipient` or one :class:`RowRejected`: malformed
lines, undecodable bytes (invalid UTF-8), missing columns, wrong field counts and oversized fields
are per-row rejections, never exceptions and never silently lost. Only a source that cannot be
read at all (missing file, unknown format, unusable CSV header, failing SQL) raises
:class:`dispatch.errors.AudienceError`.

Conventions, documented once here:

- ``row`` is the 1-based number of the data row (CSV records after the header, JSONL lines,
  iterable items, SQL rows). Blank lines are not rows.
- CSV: RFC 4180 (``,`` and ``"`` by default), UTF-8 (a BOM is ignored); a quoted field may span
  lines, and a file has exactly the records Python's ``csv`` module reads in it. A record still
  open after ``max_record_lines`` lines or ``max_line_bytes`` bytes that opens a quoted field
  (the text so far is valid CSV up to an open quoted field) is rejected whole
  (``field_too_large``): the reader skips, without holding them, to the line where that quoted
  field really ends, so nothing inside a field is ever read as a row. Otherwise (a stray quote
  in an unquoted field, or a quote still open at the end of the input) the record is rejected as
  its first line alone (``malformed_row``) and the following lines are read again as rows of
  their own, so one stray quote costs one row, not the file; a quoted field still open at the end
  of the input after the limit is one ``malformed_row``.
- Memory is bounded by ``max_line_bytes`` (default 1 MiB; a longer line is skipped without being
  held in memory and rejected as ``field_too_large``, with the rest of its quoted field if it
  leaves one open) times ``max_record_lines``.
- A gzip stream may expand to ``max_decompressed_bytes`` and to ``max_gzip_ratio`` times its
  compressed size (plus 1 MiB); past either the read fails with AudienceError.
- ``region``: the recipient's own region for reading a national phone number (ISO 3166 alpha-2,
  e.g. ``GB``; it wins over the campaign's ``region``): the first of the columns
  ``ColumnMap.region`` (default ``region``, then ``country``) that has a value in the row. Those
  columns stay attributes too (``$country`` still renders).
- ``updated_at``: ISO 8601 (``Z`` allowed) or, in JSONL/SQL, epoch seconds; a value without an
  offset is taken as UTC. Consent values: ``1/0``, ``true/false``, ``yes/no``, ``y/n``, ``t/f``
  (any case) or JSON booleans; an empty value means "not stated".
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any, Final, Literal, NamedTuple

import orjson

from channels import default_registry
from dispatch.errors import AudienceError
from dispatch.rules.checks import Reason

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "ADDRESS_FIELDS",
    "CONSENT_WORDS",
    "AudienceFormat",
    "BadValue",
    "ColumnMap",
    "CsvBuilder",
    "CsvRecords",
    "Lines",
    "ReadLimits",
    "Recipient",
    "RowRejected",
    "csv_records",
    "from_postgres",
    "from_records",
    "maybe_gunzip",
    "parse_time",
    "read_audience",
    "read_header",
    "recipients_only",
    "take_header",
]

AudienceFormat = Literal["csv", "jsonl"]

_EMPTY: Final[Mapping[str, Any]] = MappingProxyType({})
_TRUE: Final = frozenset({"1", "true", "yes", "y", "t"})
_FALSE: Final = frozenset({"0", "false", "no", "n", "f"})
_GZIP_MAGIC: Final = b"\x1f\x8b"
#: Exact spellings looked up before the general (lowercasing) parse.
CONSENT_WORDS: Final = {w: True for w in _TRUE} | {w: False for w in _FALSE}
#: Recipient fields that hold an address, one per registered channel (``ChannelSpec.address_field``;
#: a test keeps the two equal), then the other plain string fields.
ADDRESS_FIELDS: Final = ("phone", "email", "push_token", "webhook_url", "openid")
_STRING_FIELDS: Final = (*ADDRESS_FIELDS, "timezone", "locale")


@dataclass(frozen=True, slots=True)
class Recipient:
    """One audience member. Addresses are raw (validation normalizes them)."""

    row: int
    id: str
    phone: str | None = None
    email: str | None = None
    push_token: str | None = None
    webhook_url: str | None = None
    openid: str | None = None
    timezone: str | None = None
    locale: str | None = None
    consent: Mapping[str, bool] = field(default_factory=lambda: _EMPTY)
    updated_at: datetime | None = None
    attributes: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    #: The recipient's own region value as given (``dispatch.rules.validation.parse_region``).
    region: str | None = None

    def address(self, field_name: str) -> str | None:
        """The raw address in ``field_name`` (see ``dispatch.rules.validation.ADDRESS_FIELD``)."""
        value: str | None = getattr(self, field_name)
        return value


@dataclass(frozen=True, slots=True)
class RowRejected:
    """A source row that could not become a recipient. ``detail`` never holds address values."""

    row: int
    reason: Reason
    field: str | None
    detail: str


@dataclass(frozen=True, kw_only=True)
class ColumnMap:
    """Which source column feeds which recipient field (None: the source has no such column).

    ``consent`` maps a channel name to its consent column. ``attributes``: the columns kept as
    templating fields; None keeps every column not mapped to a field above.
    """

    id: str = "id"
    phone: str | None = "phone"
    email: str | None = "email"
    push_token: str | None = "push_token"
    webhook_url: str | None = "webhook_url"
    openid: str | None = "openid"
    timezone: str | None = "timezone"
    locale: str | None = "locale"
    updated_at: str | None = "updated_at"
    #: The recipient's region columns, in order of preference (not taken from the attributes).
    region: tuple[str, ...] = ("region", "country")
    consent: Mapping[str, str] = field(
        default_factory=lambda: {spec.name: spec.consent_column for spec in default_registry().channels()}
    )
    attributes: tuple[str, ...] | None = None

    def mapped(self) -> dict[str, str]:
        """Recipient field -> source column, for the plain string fields (not consent)."""
        out = {"id": self.id}
        for name in _STRING_FIELDS:
            column = getattr(self, name)
            if column is not None:
                out[name] = column
        return out

    def attribute_columns(self, available: Iterable[str]) -> tuple[str, ...]:
        if self.attributes is not None:
            return self.attributes
        taken = set(self.mapped().values()) | set(self.consent.values())
        if self.updated_at is not None:
            taken.add(self.updated_at)
        return tuple(c for c in available if c not in taken)


@dataclass(frozen=True, kw_only=True)
class ReadLimits:
    """Per-row size limits (bytes) that keep memory bounded whatever the input."""

    max_field_bytes: int = 64 * 1024
    max_line_bytes: int = 1024 * 1024
    max_record_lines: int = 64
    #: Most bytes a gzip stream may expand to (the ``plan_max_decompressed_bytes`` setting).
    max_decompressed_bytes: int = 32 * 1024**3
    #: Most bytes a gzip stream may expand to per compressed byte, plus 1 MiB (``plan_max_gzip_ratio``).
    max_gzip_ratio: int = 100


# --- value parsing -----------------------------------------------------------------------------


class BadValue(Exception):
    def __init__(self, field_name: str, detail: str) -> None:
        super().__init__(detail)
        self.field_name = field_name
        self.detail = detail


def parse_time(value: Any, column: str) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise BadValue(column, "epoch seconds out of range") from None
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise BadValue(column, "not an ISO 8601 timestamp") from None
    else:
        raise BadValue(column, f"timestamp of type {type(value).__name__}")
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def _parse_consent(value: Any, column: str) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BadValue(column, "consent is not yes/no")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return str(value)


def _too_large(value: str, limit: int) -> bool:
    return len(value) > limit or (len(value) * 4 > limit and len(value.encode("utf-8", "replace")) > limit)


class _Builder:
    """Turns one mapping-like row into a Recipient or a RowRejected (shared by every source)."""

    def __init__(self, columns: ColumnMap, limits: ReadLimits) -> None:
        self.columns = columns
        self.limit = limits.max_field_bytes
        self.mapped = tuple(columns.mapped().items())
        self.consent = tuple(columns.consent.items())
        self.region = columns.region

    def build(
        self, row_no: int, get: Callable[[str], Any], attr_items: Iterable[tuple[str, Any]]
    ) -> Recipient | RowRejected:
        c = self.columns
        try:
            values: dict[str, Any] = {}
            for name, column in self.mapped:
                raw = get(column)
                value = _text(raw)
                if value is not None and _too_large(value, self.limit):
                    return RowRejected(row_no, Reason.FIELD_TOO_LARGE, column, f"over {self.limit} bytes")
                values[name] = value
            rid = values.pop("id")
            if rid is None or not rid.strip():
                return RowRejected(row_no, Reason.MISSING_COLUMN, c.id, "no recipient id")
            region = None
            for column in self.region:
                region = _text(get(column))
                if region is not None:
                    if _too_large(region, self.limit):
                        return RowRejected(row_no, Reason.FIELD_TOO_LARGE, column, f"over {self.limit} bytes")
                    break
            consent: dict[str, bool] = {}
            for channel, column in self.consent:
                given = _parse_consent(get(column), column)
                if given is not None:
                    consent[channel] = given
            updated = parse_time(get(c.updated_at), c.updated_at) if c.updated_at else None
            attributes: dict[str, str] = {}
            for key, raw in attr_items:
                value = _text(raw)
                if value is None:
                    continue
                if _too_large(value, self.limit):
                    return RowRejected(row_no, Reason.FIELD_TOO_LARGE, key, f"over {self.limit} bytes")
                attributes[key] = value
        except BadValue as exc:
            return RowRejected(row_no, Reason.MALFORMED_ROW, exc.field_name, exc.detail)
        return Recipient(
            row_no,
            rid,
            consent=consent or _EMPTY,
            updated_at=updated,
            attributes=attributes or _EMPTY,
            region=region,
            **values,
        )


# --- opening -----------------------------------------------------------------------------------


def _detect_format(name: str) -> AudienceFormat:
    lowered = name.lower().removesuffix(".gz")
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise AudienceError(f"cannot tell the audience format of {Path(name).name!r}: pass format='csv' or 'jsonl'")


class CappedGzip(gzip.GzipFile):
    """A gzip stream that refuses to expand past ``cap`` bytes (AudienceError)."""

    def __init__(self, fileobj: IO[bytes], cap: int) -> None:
        super().__init__(fileobj=fileobj, mode="rb")
        self._cap = cap
        self._expanded = 0

    def _count(self, data: bytes) -> bytes:
        self._expanded += len(data)
        if self._expanded > self._cap:
            raise AudienceError(
                f"the gzip audience expands to more than {self._cap:,} bytes (settings plan_max_decompressed_bytes "
                "and plan_max_gzip_ratio): refused"
            )
        return data

    def read(self, size: int | None = -1) -> bytes:
        return self._count(super().read(size))

    def read1(self, size: int = -1) -> bytes:
        return self._count(super().read1(size))

    def readline(self, size: int | None = -1) -> bytes:
        return self._count(super().readline(size))


def maybe_gunzip(handle: IO[bytes], limits: ReadLimits | None = None) -> IO[bytes]:
    buffered = handle if isinstance(handle, io.BufferedReader) else io.BufferedReader(handle)  # type: ignore[type-var]
    if buffered.peek(2)[:2] == _GZIP_MAGIC:
        lim = limits or ReadLimits()
        cap = lim.max_decompressed_bytes
        try:
            compressed = os.fstat(buffered.fileno()).st_size
        except (OSError, AttributeError, io.UnsupportedOperation):
            compressed = None
        if compressed is not None:
            cap = min(cap, compressed * lim.max_gzip_ratio + 2**20)
        return CappedGzip(buffered, cap)  # type: ignore[return-value]
    return buffered


class Lines:
    """Physical lines as bytes, each at most ``limit`` bytes; longer ones yield None (skipped).

    ``consumed``: bytes read so far (skipped lines included); ``dropped_quotes``: how many
    ``quote`` bytes the last skipped line held (a CSV reader needs it to know whether that line
    closed or opened a quoted field)."""

    def __init__(self, handle: IO[bytes], limit: int, quote: bytes = b"") -> None:
        self.handle, self.limit, self.quote = handle, limit, quote
        self.consumed = 0
        self.dropped_quotes = 0
        try:
            self.origin: int | None = handle.tell() if handle.seekable() else None
        except (OSError, ValueError, AttributeError):
            self.origin = None

    def rewind(self, consumed: int) -> bool:
        """Go back to ``consumed`` bytes after the start (False: the stream cannot seek)."""
        if self.origin is None:
            return False
        try:
            self.handle.seek(self.origin + consumed)
        except (OSError, ValueError) as exc:
            raise AudienceError(f"audience stream cannot be read: {exc}") from None
        self.consumed = consumed
        return True

    def __iter__(self) -> Iterator[bytes | None]:
        readline, limit, quote = self.handle.readline, self.limit, self.quote
        while True:
            try:
                line = readline(limit)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise AudienceError(f"audience stream cannot be read: {exc}") from None
            if not line:
                return
            self.consumed += len(line)
            if len(line) >= limit and not line.endswith(b"\n"):
                quotes = line.count(quote) if quote else 0
                while True:  # drop the rest of this line without holding it
                    try:
                        rest = readline(limit)
                    except (OSError, EOFError, gzip.BadGzipFile) as exc:
                        raise AudienceError(f"audience stream cannot be read: {exc}") from None
                    self.consumed += len(rest)
                    if quote:
                        quotes += rest.count(quote)
                    if not rest or rest.endswith(b"\n"):
                        break
                self.dropped_quotes = quotes
                yield None
                continue
            yield line


# --- CSV ---------------------------------------------------------------------------------------


def _decode(line: bytes) -> str | None:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return None


CsvRecord = tuple[list[str] | None, Reason | None, str]


class CsvRecords:
    """The records of CSV lines: parsed fields, or (None, reason, detail) for a record rejected
    whole (the rules in the module docstring). :attr:`idle` is True between records (nothing
    pending, nothing to read again, not inside a skipped field): a reader started fresh at
    ``lines.consumed`` would then read exactly what this one reads next
    (``dispatch.plan.csv_scan.find_cuts`` relies on it)."""

    def __init__(self, lines: Lines, limits: ReadLimits, delimiter: str, quote: str) -> None:
        self.lines, self.limits, self.delimiter, self.quote = lines, limits, delimiter, quote
        self._pending: list[bytes] = []
        self._replay: list[bytes] = []  # lines to read again, last first
        self._skipping = False
        self._first_end: int | None = None  # bytes consumed at the end of the pending record's first line
        self._resume: int | None = None

    @property
    def idle(self) -> bool:
        return not (self._pending or self._replay or self._skipping)

    def __iter__(self) -> Iterator[CsvRecord]:
        limits, delimiter, quote = self.limits, self.delimiter, self.quote
        qb = quote.encode()
        source = iter(self.lines)
        pending, replay = self._pending, self._replay
        quotes = 0
        size = 0
        too_large = f"a quoted field runs over {limits.max_record_lines} lines or {limits.max_line_bytes} bytes"
        while True:
            from_replay = bool(replay)
            line = replay.pop() if from_replay else next(source, b"")
            if self._skipping:  # inside an over-long quoted field: find where it really ends
                if line == b"":
                    # never closed: not a field but a stray quote; read again after its first line
                    self._skipping, quotes = False, 0
                    resume, self._resume = self._resume, None
                    if resume is None or not self.lines.rewind(resume):
                        yield None, Reason.MALFORMED_ROW, "unterminated quoted field (over the size limits)"
                        return
                    source = iter(self.lines)
                    yield None, Reason.MALFORMED_ROW, "unterminated quoted field"
                    continue
                quotes += self.lines.dropped_quotes if line is None else line.count(qb)
                if quotes % 2 == 0:
                    self._skipping, quotes = False, 0
                    yield None, Reason.FIELD_TOO_LARGE, too_large
                continue
            if line == b"":
                if not pending:
                    return
                # unterminated quote at end of input: reject the first line, re-read the others
                replay.extend(reversed(pending[1:]))
                pending.clear()
                quotes, size = 0, 0
                yield None, Reason.MALFORMED_ROW, "unterminated quoted field"
                continue
            if line is None:
                quotes += self.lines.dropped_quotes
                pending.clear()
                size = 0
                if quotes % 2:  # the long line leaves a quoted field open: skip the rest of it
                    self._skipping = True
                    continue
                quotes = 0
                yield None, Reason.FIELD_TOO_LARGE, f"line over {limits.max_line_bytes} bytes"
                continue
            if not pending and not line.strip(b"\r\n"):
                continue  # blank line: not a row
            if not pending:  # where to read again if this record turns out to be a stray quote
                self._first_end = None if from_replay else self.lines.consumed
            pending.append(line)
            quotes += line.count(qb)
            size += len(line)
            if quotes % 2 == 0:
                record = pending[0] if len(pending) == 1 else b"".join(pending)
                several = len(pending) > 1
                quotes, size = 0, 0
                text = _decode(record)
                if text is None:
                    pending.clear()
                    yield None, Reason.BAD_ENCODING, "not valid UTF-8"
                    continue
                fields = _split_csv(text, delimiter, quote)
                if fields is None and several:
                    # a stray quote glued lines together: reject the first line, re-read the others
                    replay.extend(reversed(pending[1:]))
                    pending.clear()
                    yield None, Reason.MALFORMED_ROW, "not valid CSV"
                    continue
                pending.clear()
                if fields is None:
                    yield None, Reason.MALFORMED_ROW, "not valid CSV"
                else:
                    yield fields, None, ""
            elif len(pending) >= limits.max_record_lines or size > limits.max_line_bytes:
                opens = _opens_quoted_field(b"".join(pending), delimiter, quote)
                size = 0
                if opens:  # a real quoted field, too long: skip to its end, reject it whole
                    pending.clear()
                    self._skipping = True
                    self._resume = self._first_end
                    continue
                replay.extend(reversed(pending[1:]))
                pending.clear()
                quotes = 0
                yield None, Reason.MALFORMED_ROW, "unterminated quoted field"


def _opens_quoted_field(data: bytes, delimiter: str, quote: str) -> bool:
    """True when ``data`` is valid CSV up to a quoted field still open at its end (closing that
    field makes it exactly one strict record), as opposed to a stray quote."""
    text = data.decode("utf-8", "surrogateescape") + quote
    try:
        return len(list(csv.reader((text,), delimiter=delimiter, quotechar=quote, strict=True))) == 1
    except csv.Error:
        return False


def csv_records(lines: Lines, limits: ReadLimits, delimiter: str, quote: str) -> Iterator[CsvRecord]:
    """Parsed records, or (None, reason, detail) for a record that is rejected whole."""
    return iter(CsvRecords(lines, limits, delimiter, quote))


def _split_csv(text: str, delimiter: str, quote: str) -> list[str] | None:
    body = text.rstrip("\r\n")
    if quote not in body and "\r" not in body and "\n" not in body and "\x00" not in body:
        return body.split(delimiter)
    try:
        return next(csv.reader((body,), delimiter=delimiter, quotechar=quote, strict=True), [])
    except csv.Error:
        return None


def take_header(records: Iterator[tuple[list[str] | None, Any, str]]) -> list[str] | None:
    """The header record of a CSV record stream (consumed from ``records``), as every reader sees
    it: names stripped, a UTF-8 byte-order mark dropped; None for an empty stream. Raises
    AudienceError when it cannot be read or names a column twice. The one place a header is read
    (the general reader, :func:`read_header` and the fast scan all use it)."""
    for fields, _reason, detail in records:
        if fields is None:
            raise AudienceError(f"the CSV header cannot be read ({detail})")
        header = [h.strip() for h in fields]
        header[0] = header[0].removeprefix("\ufeff")
        if len(set(header)) != len(header):
            raise AudienceError("the CSV header names a column twice")
        return header
    return None


def _read_csv(
    lines: Lines, columns: ColumnMap, limits: ReadLimits, delimiter: str, quote: str
) -> Iterator[Recipient | RowRejected]:
    records = csv_records(lines, limits, delimiter, quote)
    header = take_header(records)
    if header is None:
        return
    width = len(header)
    build = CsvBuilder(columns, limits, header).build
    for row_no, (fields, reason, detail) in enumerate(records, start=1):
        if fields is None:
            yield RowRejected(row_no, reason or Reason.MALFORMED_ROW, None, detail)
        elif len(fields) != width:
            yield RowRejected(row_no, Reason.MALFORMED_ROW, None, f"{len(fields)} fields, header has {width}")
        else:
            yield build(row_no, fields)


class CsvBuilder:
    """The CSV twin of :class:`_Builder`, by column index (the hot path of a 10M-row plan)."""

    def __init__(self, columns: ColumnMap, limits: ReadLimits, header: list[str]) -> None:
        index = {name: i for i, name in enumerate(header)}
        self.header = header
        self.id_col = columns.id
        self.id_i = index.get(columns.id)
        self.addr_i = tuple(index.get(c) if (c := getattr(columns, n)) is not None else None for n in _STRING_FIELDS)
        self.consent_i = tuple((ch, index[col], col) for ch, col in columns.consent.items() if col in index)
        self.updated_col = columns.updated_at
        self.updated_i = index.get(columns.updated_at) if columns.updated_at is not None else None
        self.attr_i = tuple((n, index[n]) for n in columns.attribute_columns(header) if n in index)
        #: The header's region columns, in order of preference.
        self.region_i = tuple(index[c] for c in columns.region if c in index)
        self.limit = limits.max_field_bytes
        self._last_time: tuple[str, datetime | None] = ("", None)

    def build(self, row_no: int, fields: list[str]) -> Recipient | RowRejected:
        limit = self.limit
        if max(map(len, fields)) * 4 > limit:
            for i, value in enumerate(fields):
                if _too_large(value, limit):
                    return RowRejected(row_no, Reason.FIELD_TOO_LARGE, self.header[i], f"over {limit} bytes")
        if self.id_i is None:
            return RowRejected(row_no, Reason.MISSING_COLUMN, self.id_col, "no such column")
        rid = fields[self.id_i]
        if not rid.strip():
            return RowRejected(row_no, Reason.MISSING_COLUMN, self.id_col, "no recipient id")
        pi, ei, ti, ui, oi, zi, li = self.addr_i
        phone = (fields[pi] or None) if pi is not None else None
        email = (fields[ei] or None) if ei is not None else None
        push = (fields[ti] or None) if ti is not None else None
        url = (fields[ui] or None) if ui is not None else None
        openid = (fields[oi] or None) if oi is not None else None
        tz = (fields[zi] or None) if zi is not None else None
        locale = (fields[li] or None) if li is not None else None
        consent: dict[str, bool] = {}
        updated: datetime | None = None
        try:
            for channel, i, column in self.consent_i:
                value = fields[i]
                if value:
                    given = CONSENT_WORDS.get(value)
                    if given is None:
                        given = _parse_consent(value, column)
                    if given is not None:
                        consent[channel] = given
            if self.updated_i is not None:
                text = fields[self.updated_i]
                last_text, last_value = self._last_time
                if text == last_text and text:
                    updated = last_value
                else:
                    updated = parse_time(text, self.updated_col or "")
                    self._last_time = (text, updated)
        except BadValue as exc:
            return RowRejected(row_no, Reason.MALFORMED_ROW, exc.field_name, exc.detail)
        attributes = {name: fields[i] for name, i in self.attr_i if fields[i]}
        region = None
        for i in self.region_i:
            if fields[i]:
                region = fields[i]
                break
        return Recipient(
            row_no,
            rid,
            phone,
            email,
            push,
            url,
            openid,
            tz,
            locale,
            consent or _EMPTY,
            updated,
            attributes or _EMPTY,
            region,
        )


# --- JSONL and iterables -----------------------------------------------------------------------


def _read_jsonl(
    lines: Iterator[bytes | None], columns: ColumnMap, limits: ReadLimits
) -> Iterator[Recipient | RowRejected]:
    builder = _Builder(columns, limits)
    row_no = 0
    for line in lines:
        if line is not None and not line.strip():
            continue
        row_no += 1
        if line is None:
            yield RowRejected(row_no, Reason.FIELD_TOO_LARGE, None, f"line over {limits.max_line_bytes} bytes")
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad = _decode(line) is None
            reason = Reason.BAD_ENCODING if bad else Reason.MALFORMED_ROW
            yield RowRejected(row_no, reason, None, "not valid UTF-8" if bad else "not valid JSON")
            continue
        yield _from_mapping(builder, row_no, obj, columns)


def _from_mapping(builder: _Builder, row_no: int, obj: Any, columns: ColumnMap) -> Recipient | RowRejected:
    if not isinstance(obj, Mapping):
        return RowRejected(row_no, Reason.MALFORMED_ROW, None, "row is not an object")
    if columns.id not in obj:
        return RowRejected(row_no, Reason.MISSING_COLUMN, columns.id, "no such column")
    attrs = columns.attribute_columns(obj.keys())
    return builder.build(row_no, obj.get, ((k, obj.get(k)) for k in attrs))


def from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    columns: ColumnMap | None = None,
    limits: ReadLimits | None = None,
) -> Iterator[Recipient | RowRejected]:
    """Recipients from an iterable of mappings (e.g. ``csv.DictReader`` rows or API objects)."""
    cols = columns or ColumnMap()
    builder = _Builder(cols, limits or ReadLimits())
    for row_no, obj in enumerate(records, start=1):
        yield _from_mapping(builder, row_no, obj, cols)


# --- files -------------------------------------------------------------------------------------


def read_audience(
    source: str | os.PathLike[str] | IO[bytes],
    *,
    format: AudienceFormat | None = None,
    columns: ColumnMap | None = None,
    limits: ReadLimits | None = None,
    delimiter: str = ",",
    quotechar: str = '"',
) -> Iterator[Recipient | RowRejected]:
    """Stream a CSV or JSONL audience (gzip detected by its magic bytes) from a path or a binary
    file object. A path is opened when iteration starts and closed when it ends; a file object
    is left open. Raises AudienceError only when the source as a whole cannot be read."""
    cols = columns or ColumnMap()
    lim = limits or ReadLimits()
    if isinstance(source, (str, os.PathLike)):
        fmt = format or _detect_format(os.fspath(source))
        path = Path(source)
        try:
            path.stat()
        except OSError as exc:
            raise AudienceError(f"cannot open audience {path.name!r}: {exc.strerror}") from None
        return _read_path(path, fmt, _Opts(cols, lim, delimiter, quotechar))
    if format is None:
        name = getattr(source, "name", None)
        if not isinstance(name, str):
            raise AudienceError("cannot tell the format of a file object: pass format='csv' or 'jsonl'")
        format = _detect_format(name)
    return _read_handle(source, format, _Opts(cols, lim, delimiter, quotechar))


def read_header(
    path: str | os.PathLike[str],
    *,
    format: AudienceFormat | None = None,
    delimiter: str = ",",
    quotechar: str = '"',
    limits: ReadLimits | None = None,
) -> list[str] | None:
    """The column names of a CSV file (None for JSONL or an empty file), as the reader sees
    them. Raises AudienceError when the file or its header cannot be read."""
    fmt = format or _detect_format(os.fspath(path))
    if fmt != "csv":
        return None
    lim = limits or ReadLimits()
    try:
        handle = Path(path).open("rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise AudienceError(f"cannot open audience {Path(path).name!r}: {exc.strerror}") from None
    with handle:
        try:
            stream = maybe_gunzip(handle, lim)
        except (OSError, ValueError) as exc:
            raise AudienceError(f"audience stream cannot be read: {exc}") from None
        return take_header(
            csv_records(Lines(stream, lim.max_line_bytes, quotechar.encode()), lim, delimiter, quotechar)
        )


class _Opts(NamedTuple):
    columns: ColumnMap
    limits: ReadLimits
    delimiter: str
    quote: str


def _read_path(path: Path, fmt: AudienceFormat, opts: _Opts) -> Iterator[Recipient | RowRejected]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise AudienceError(f"cannot open audience {path.name!r}: {exc.strerror}") from None
    with handle:
        yield from _read_handle(handle, fmt, opts)


def _read_handle(handle: IO[bytes], fmt: AudienceFormat, opts: _Opts) -> Iterator[Recipient | RowRejected]:
    try:
        stream = maybe_gunzip(handle, opts.limits)
    except (OSError, ValueError) as exc:
        raise AudienceError(f"audience stream cannot be read: {exc}") from None
    if fmt == "csv":
        lines = Lines(stream, opts.limits.max_line_bytes, opts.quote.encode())
        yield from _read_csv(lines, opts.columns, opts.limits, opts.delimiter, opts.quote)
    else:
        yield from _read_jsonl(iter(Lines(stream, opts.limits.max_line_bytes)), opts.columns, opts.limits)


def recipients_only(
    rows: Iterable[Recipient | RowRejected], on_reject: Callable[[RowRejected], None]
) -> Iterator[Recipient]:
    """Split a row stream: recipients are yielded, rejections go to ``on_reject``."""
    for item in rows:
        if isinstance(item, Recipient):
            yield item
        else:
            on_reject(item)


# --- PostgreSQL --------------------------------------------------------------------------------


def from_postgres(
    conn: psycopg.Connection[Any],
    query: Any,
    params: Mapping[str, Any] | tuple[Any, ...] | None = None,
    *,
    columns: ColumnMap | None = None,
    limits: ReadLimits | None = None,
    itersize: int = 2_000,
    cursor_name: str = "dispatch_audience",
) -> Iterator[Recipient | RowRejected]:
    """Stream a query's rows through a server-side (named) cursor, ``itersize`` rows per fetch.

    Runs inside a transaction on ``conn`` (named cursors need one); the caller owns the
    connection. A failing query or a connection lost mid-stream raises AudienceError.
    """
    import psycopg
    from psycopg.rows import dict_row

    cols = columns or ColumnMap()
    builder = _Builder(cols, limits or ReadLimits())
    try:
        with conn.transaction(), conn.cursor(name=cursor_name, row_factory=dict_row) as cur:
            cur.itersize = itersize
            cur.execute(query, params)
            for row_no, row in enumerate(cur, start=1):
                yield _from_mapping(builder, row_no, row, cols)
    except psycopg.Error as exc:
        raise AudienceError(f"audience query failed: {type(exc).__name__}: {exc}".strip()) from None
