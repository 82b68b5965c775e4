"""Exact first-occurrence dedup of 64-bit address fingerprints in bounded memory.

:class:`FingerprintSet` is a compact in-memory set (~16 bytes per member). :class:`Dedup` keeps
one until it holds ``memory_bytes``; past that it *spills*: the set's members are written to
:data:`PARTITIONS` files (partition = the fingerprint's top 7 bits), the set is dropped, and
every later candidate row is appended, in row order, to its partition's file instead of being
decided at once. :meth:`Dedup.partitions` then hands back one partition at a
time: a set preloaded with that partition's earlier fingerprints and that partition's deferred
rows in row order, so "first occurrence wins" still holds and memory is one partition's set
(1/128 of all distinct addresses) plus one read block.

The cost of the spill is a write and a read of the deferred rows' encoded form (page cache, not
process memory), and a second pass over them; an audience under the budget never spills.

The same mechanism dedups any 64-bit key: the planner runs a second :class:`Dedup` over
recipient-id fingerprints (:func:`id_fingerprints`), deferring only (row, fingerprint) pairs with
:meth:`Dedup.defer_columns` and reading them back with :meth:`Dedup.partition_columns`.
"""

from __future__ import annotations

import hashlib
import operator
import pickle
import sys
import tempfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final, NamedTuple

__all__ = ["DEDUP_MEMORY_BYTES", "PARTITIONS", "Candidates", "Dedup", "FingerprintSet", "id_fingerprints"]

#: Default memory for fingerprints before the dedup spills to disk.
DEDUP_MEMORY_BYTES: Final = 64 * 1024 * 1024
#: Partitions of a spilled dedup (a power of two; the top bits of the fingerprint choose one).
PARTITIONS: Final = 128
_PARTITION_SHIFT: Final = 64 - (PARTITIONS.bit_length() - 1)
#: Deferred rows handed back per block by :meth:`Dedup.partitions`.
_READ_ROWS: Final = 50_000


class FingerprintSet:
    """An exact set of 64-bit fingerprints in open-addressed ``array('Q')`` shards.

    About 11-21 bytes per member (load factor 0.375-0.75), against ~70 for a Python ``set`` of
    8-byte ``bytes``. Shards grow one at a time, so a resize never needs more than 1/64 of the
    memory on top. Two addresses share a fingerprint with probability ~n^2/2^64 (a few in a
    million for 10 million): the cost of such a collision is one recipient wrongly counted as a
    duplicate.
    """

    #: The top bits of a fingerprint that choose its shard.
    SHARD_BITS: Final = 6

    def __init__(self) -> None:
        shards = 1 << self.SHARD_BITS
        self._tables = [array("Q", [0]) * 1024 for _ in range(shards)]
        self._counts = [0] * shards
        self.size = 0

    def add(self, fingerprint: int) -> bool:
        """Add a 64-bit value; False when it was already there."""
        return bool(self.add_all((fingerprint,))[0])

    def add_all(self, values: Iterable[int]) -> bytearray:
        """:meth:`add` for each value in order; a flag per value (1: new, 0: already there)."""
        out = bytearray()
        flag = out.append
        tables, counts, bits = self._tables, self._counts, 64 - self.SHARD_BITS
        added = 0
        for value in values:
            fp = value | 1  # 0 marks an empty slot
            shard = fp >> bits
            table = tables[shard]
            mask = len(table) - 1
            i = (fp >> 1) & mask
            while True:
                slot = table[i]
                if slot == 0:
                    break
                if slot == fp:
                    break
                i = (i + 1) & mask
            if slot == fp:
                flag(0)
                continue
            table[i] = fp
            flag(1)
            added += 1
            count = counts[shard] + 1
            counts[shard] = count
            if count * 4 > len(table) * 3:
                self._grow(shard)
        self.size += added
        return out

    def _grow(self, shard: int) -> None:
        old = self._tables[shard]
        table = array("Q", [0]) * (len(old) * 2)
        mask = len(table) - 1
        for fp in old:
            if fp:
                i = (fp >> 1) & mask
                while table[i]:
                    i = (i + 1) & mask
                table[i] = fp
        self._tables[shard] = table

    def drain(self) -> Iterator[array[int]]:
        """Empty the set shard by shard (shard = the top 6 bits), yielding each shard's members
        (as stored: lowest bit set) after freeing its table, so memory never holds two copies."""
        empty = array("Q")
        for shard, table in enumerate(self._tables):
            self._tables[shard] = empty
            members = array("Q", filter(None, table))
            del table
            yield members
        self._counts = [0] * len(self._counts)
        self.size = 0

    @property
    def nbytes(self) -> int:
        return sum(t.itemsize * len(t) for t in self._tables)


def id_fingerprints(ids: Iterable[str], key: bytes) -> array[int]:
    """64-bit fingerprints of recipient ids (keyed, so ids cannot be crafted to collide), as the
    dedup of repeated ids keys them; the same in every process for the same ``key``."""
    keyed = hashlib.blake2b(digest_size=8, key=key, person=b"dispatch-rid")
    copy = keyed.copy
    out = bytearray()
    for rid in ids:
        hasher = copy()
        hasher.update(rid.encode("utf-8", "surrogatepass"))
        out += hasher.digest()
    values = array("Q", bytes(out))
    if sys.byteorder != "little":
        values.byteswap()
    return values


class Candidates(NamedTuple):
    """Rows that passed the per-row checks, in row order (absolute row numbers): the part of a
    ``dispatch.plan.csv_scan.Chunk`` the dedup and the later steps need."""

    rows: Sequence[int]
    ids: Sequence[str]
    encoded: Sequence[bytes]
    hashes: bytes
    fingerprints: Sequence[int]
    not_before: Sequence[float]
    cost: Sequence[int]


class Dedup:
    """First-occurrence dedup that spills to ``spill_dir`` past ``memory_bytes`` (see the module
    docstring). Use: :meth:`add_all` per chunk while not :attr:`spilled`, then
    :meth:`check_budget`; once spilled, :meth:`defer` each chunk's candidates, and finally walk
    :meth:`partitions`. :meth:`close` removes the files."""

    def __init__(self, spill_dir: Path, *, memory_bytes: int = DEDUP_MEMORY_BYTES) -> None:
        self._spill_dir = spill_dir
        self._budget = memory_bytes
        self._set: FingerprintSet | None = FingerprintSet()
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._files: list[IO[bytes]] = []
        self.deferred = 0

    @property
    def spilled(self) -> bool:
        return self._set is None

    def add_all(self, fingerprints: Iterable[int]) -> bytearray:
        """Flags (1: first occurrence) for the fingerprints, in order; only before the spill."""
        if self._set is None:
            raise RuntimeError("the dedup has spilled: defer() the candidates instead")
        return self._set.add_all(fingerprints)

    def check_budget(self) -> bool:
        """Spill when the in-memory set has outgrown the budget; True once spilled."""
        if self._set is not None and self._set.nbytes > self._budget:
            self._spill(self._set)
        return self._set is None

    def _spill(self, members: FingerprintSet) -> None:
        self._dir = tempfile.TemporaryDirectory(dir=self._spill_dir, prefix="plan-dedup-")
        root = Path(self._dir.name)
        self._files = [(root / f"{p}.rows").open("w+b") for p in range(PARTITIONS)]
        per_shard = PARTITIONS >> FingerprintSet.SHARD_BITS  # partitions refine shards
        for shard, shard_members in enumerate(members.drain()):
            parts: list[array[int]] = [array("Q") for _ in range(per_shard)]
            for fp in shard_members:
                parts[(fp >> _PARTITION_SHIFT) - shard * per_shard].append(fp)
            for k, part in enumerate(parts):
                pickle.dump(part, self._files[shard * per_shard + k], protocol=pickle.HIGHEST_PROTOCOL)
        self._set = None

    def spill(self) -> None:
        """Spill now, whatever the memory (the planner spills its two dedups together)."""
        if self._set is not None:
            self._spill(self._set)

    @property
    def nbytes(self) -> int:
        """Memory of the in-memory set (0 once spilled)."""
        return self._set.nbytes if self._set is not None else 0

    def defer(self, candidates: Candidates, tags: bytes | bytearray) -> None:
        """Append candidates (after the spill) to their partitions' files, in row order, each
        with its tag byte (opaque here: the planner's suppression and frequency-cap verdict).
        The hashes are not kept: deferred candidates come back with ``hashes == b""``."""
        c = candidates
        self.defer_columns(c.fingerprints, (c.rows, c.ids, c.encoded, c.fingerprints, c.not_before, c.cost, tags))

    def defer_columns(self, fingerprints: Sequence[int], columns: Sequence[Sequence[Any]]) -> None:
        """Append rows (after the spill) to their fingerprints' partitions, in row order: row
        ``i`` is ``column[i]`` of each column (one of them should be the fingerprints, which
        :meth:`partition_columns` hands back for the partition's set)."""
        fps = fingerprints
        n = len(fps)
        if not n:
            return
        self.deferred += n
        shift = _PARTITION_SHIFT
        part_of = [fp >> shift for fp in fps]
        order = sorted(range(n), key=part_of.__getitem__)  # stable: row order within a partition
        sizes = Counter(part_of)
        start = 0
        for p in sorted(sizes):
            end = start + sizes[p]
            index = order[start:end]
            pick = operator.itemgetter(*index) if len(index) > 1 else _single(index[0])
            pickle.dump(tuple(pick(column) for column in columns), self._files[p], protocol=pickle.HIGHEST_PROTOCOL)
            start = end

    def partitions(self) -> Iterator[tuple[FingerprintSet, Iterator[tuple[Candidates, bytes]]]]:
        """Per partition: a set of its fingerprints seen before the spill, and its deferred
        candidates with their tags, in row order, in blocks of about ``_READ_ROWS``. Consume each
        block iterator before asking for the next partition."""
        for seen, blocks in self.partition_columns():
            yield seen, (_as_candidates(block) for block in blocks)

    def partition_columns(self) -> Iterator[tuple[FingerprintSet, Iterator[list[Sequence[Any]]]]]:
        """:meth:`partitions` for rows deferred with :meth:`defer_columns`: blocks of columns."""
        for handle in self._files:
            handle.flush()
            handle.seek(0)
            seen = FingerprintSet()
            seen.add_all(pickle.load(handle))
            yield seen, _blocks(handle)

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        self._files.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _single(i: int) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """Like ``itemgetter(i, j, ...)`` for one index: a 1-tuple (``itemgetter(i)`` answers the item)."""

    def pick(seq: Sequence[Any]) -> tuple[Any, ...]:
        return (seq[i],)

    return pick


def _blocks(handle: IO[bytes]) -> Iterator[list[Sequence[Any]]]:
    parts: list[tuple[Sequence[Any], ...]] = []
    held = 0
    while True:
        try:
            block = pickle.load(handle)
        except EOFError:
            break
        parts.append(block)
        held += len(block[0])
        if held >= _READ_ROWS:
            yield _join(parts)
            parts, held = [], 0
    if parts:
        yield _join(parts)


def _join(parts: list[tuple[Sequence[Any], ...]]) -> list[Sequence[Any]]:
    if len(parts) == 1:
        return list(parts[0])
    return [[value for part in parts for value in part[k]] for k in range(len(parts[0]))]


def _as_candidates(block: list[Sequence[Any]]) -> tuple[Candidates, bytes]:
    rows, ids, encoded, fps, not_before, cost, tags = block
    return Candidates(rows, ids, encoded, b"", fps, not_before, cost), bytes(tags)
