"""Reads: a shared read snapshot, and rows gathered straight out of LMDB's memory map.

A long-lived read transaction (a Snapshot) is shared by all lookups and replaced after
every committed write (Snapshots). A ChunkIndex turns every row id into an address
(chunk base + offset) and gathers all rows with one native call (or one vectorised
`np.take`) over a zero-copy view of the mapped region. Never one LMDB get per row.

Chunk values never move while they exist: pushed rows are written into their pages in
place (write_path.py). So a chunk index, once built, serves every later snapshot until
a structural change of its (table, version, layer) (a version created or dropped, chunks
imported or dropped by a shard move) replaces it. Each snapshot keeps the recently pushed
rows (row_delta.py) it started with, laid over the chunks, so a reader sees whole pushes
only; MVCC gives the rest: a reader never sees half a write, and a lookup reads the
active version and its rows from one snapshot, so a swap is atomic for readers too.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time

import numpy as np

from memory_service import native
from memory_service.errors import FailedPrecondition, NotFound, shown
from memory_service.row_delta import RowDelta, row_bytes
from memory_service.store.layout import PAGE_BYTES, ROWS, Databases, chunk_key
from memory_service.table_meta import TableMeta, meta_key

Key = tuple[int, int, int]  # (table id, version, layer)


def _address(buf) -> int:
    """Memory address of a buffer (a zero-copy LMDB value)."""
    return np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0]


class RowView:
    """An immutable picture of resolved chunks: addresses, absent chunks, and one row view over [lo, hi).

    Replaced as a whole (never mutated) when more chunks get resolved, so a gather that
    took a RowView computes addresses and reads rows from the same picture.
    """

    __slots__ = ("addr", "missing", "any_missing", "complete", "lo", "unit", "region", "chunk_base")

    def __init__(self, addr: np.ndarray, missing: np.ndarray, chunk_nbytes: int, row_nbytes: int):
        self.addr, self.missing = addr, missing
        self.any_missing = bool(missing.any())
        self.complete = bool(np.all((addr >= 0) | missing))  # nothing left to resolve
        self.lo, self.unit, self.region, self.chunk_base = 0, 0, None, None
        known = addr[addr >= 0]
        if known.size == 0:
            return
        lo, hi = int(known.min()), int(known.max()) + chunk_nbytes
        unit = math.gcd(row_nbytes, PAGE_BYTES)
        # chunk values start at a page boundary plus LMDB's page header: their distances are whole pages
        assert not np.any((known - lo) % unit), "chunk values are not page-congruent"
        raw = (ctypes.c_uint8 * (hi - lo)).from_address(lo)
        region = np.frombuffer(raw, dtype=np.uint8)
        region.flags.writeable = False
        self.lo, self.unit = lo, unit
        self.region = region[: (hi - lo) // unit * unit].reshape(-1, unit)
        rows_per_chunk = chunk_nbytes // row_nbytes
        units_per_row = row_nbytes // unit
        # item index of row r = chunk_base[r // rows_per_chunk] + r * units_per_row
        self.chunk_base = (addr - lo) // unit - np.arange(addr.size, dtype=np.int64) * rows_per_chunk * units_per_row


class ChunkIndex:
    """Row chunk addresses of one (table, version, layer), resolved lazily; shared by the snapshots of one structure."""

    def __init__(self, meta: TableMeta, version: int, layer: int):
        self.meta = meta
        self.version = version
        self.layer = layer
        self.chunk_rows = meta.chunk_rows
        self.row_nbytes = meta.row_nbytes
        self.chunk_nbytes = meta.chunk_rows * self.row_nbytes
        self.chunk_shift = meta.chunk_rows.bit_length() - 1 if meta.chunk_rows & (meta.chunk_rows - 1) == 0 else 0
        num_chunks = meta.num_chunks(layer)
        self._lock = threading.Lock()
        self.view = RowView(np.full(num_chunks, -1, dtype=np.int64), np.zeros(num_chunks, dtype=bool),
                            self.chunk_nbytes, self.row_nbytes)

    def resolve(self, chunks: np.ndarray, snapshot: "Snapshot") -> RowView:
        """A view in which every given chunk is resolved (one LMDB get per newly seen chunk, in the snapshot's txn)."""
        view = self.view
        if not np.any((view.addr[chunks] < 0) & ~view.missing[chunks]):
            return view
        with self._lock, snapshot.lock:
            view = self.view
            need = chunks[(view.addr[chunks] < 0) & ~view.missing[chunks]]
            if need.size == 0:
                return view
            addr, missing = view.addr.copy(), view.missing.copy()
            for chunk in need.tolist():
                buf = snapshot.txn.get(chunk_key(ROWS, self.meta.table_id, self.version, self.layer, chunk),
                                       db=snapshot.dbs.rows)
                if buf is None:
                    missing[chunk] = True
                    continue
                if len(buf) != self.chunk_nbytes:
                    raise FailedPrecondition(f"chunk {chunk} of {self.meta.name} v{self.version} layer {self.layer} is "
                                             f"{len(buf)} bytes, expected {self.chunk_nbytes}: the store is damaged",
                                             reason="STORE_DAMAGED")
                addr[chunk] = _address(buf)
            self.view = RowView(addr, missing, self.chunk_nbytes, self.row_nbytes)
            return self.view

    def addresses(self, ids: np.ndarray, snapshot: "Snapshot") -> np.ndarray:
        """int64 [N]: the map address of every row id (-1 where its chunk is absent)."""
        chunks = ids >> self.chunk_shift if self.chunk_shift else ids // self.chunk_rows
        view = self.resolve(np.unique(chunks), snapshot)
        base = view.addr[chunks]
        return np.where(base >= 0, base + (ids - chunks * self.chunk_rows) * self.row_nbytes, -1)

    def gather(self, ids: np.ndarray, out: np.ndarray, snapshot: "Snapshot") -> None:
        """out[i] = row ids[i]; ids int64 [N] in range, out [N, head_dim] in the table dtype, C-contiguous."""
        if ids.size == 0:
            return
        chunks = ids >> self.chunk_shift if self.chunk_shift else ids // self.chunk_rows
        view = self.view
        if not view.complete:
            touched = np.zeros(view.addr.shape[0], dtype=bool)
            touched[chunks] = True
            view = self.resolve(np.flatnonzero(touched), snapshot)
        out_bytes = row_bytes(out)  # [N, row bytes], a view of out
        if view.region is not None:
            units_per_row = self.row_nbytes // view.unit
            first = view.chunk_base[chunks]  # [N]; absent chunks give garbage indices (clipped, zeroed below)
            first += ids if units_per_row == 1 else ids * units_per_row
            if native.available():
                native.gather_rows(view.region, first, out_bytes)
            elif units_per_row == 1:
                np.take(view.region, first, axis=0, out=out_bytes, mode="clip")
            else:
                index = first[:, None] + np.arange(units_per_row)[None, :]  # [N, k]
                np.take(view.region, index.reshape(-1), axis=0, out=out_bytes.reshape(-1, view.unit), mode="clip")
        if view.any_missing or view.region is None:
            out_bytes[view.missing[chunks]] = 0


class Snapshot:
    """A read transaction plus the chunk indexes and recent rows of its time; shared by concurrent lookups."""

    def __init__(self, snapshots: "Snapshots", generation: int):
        self.dbs = snapshots.dbs
        self.txn = snapshots.dbs.env.begin(write=False, buffers=True)
        self.deltas = snapshots.deltas  # recent rows as of this snapshot (replaced, never mutated, by writers)
        self.generation = generation
        self.lock = threading.Lock()  # serialises LMDB calls on this txn
        self.refs = 0
        self.retired = False
        self.metas: dict[str, TableMeta] = {}  # tables found; misses are not kept (any number of names may be asked)
        self._snapshots = snapshots

    def meta(self, name: str) -> TableMeta:
        """Table metadata as of this snapshot (NotFound if absent)."""
        meta = self.metas.get(name)
        if meta is None:
            with self.lock:
                blob = self.txn.get(meta_key(name), db=self.dbs.meta)
                if blob is None:
                    raise NotFound(f"no table named {shown(name)}", reason="TABLE_NOT_FOUND")
                meta = self.metas[name] = TableMeta.from_json(blob)
        return meta

    def index(self, meta: TableMeta, version: int, layer: int) -> ChunkIndex:
        """The row chunk index of (table, version, layer) valid in this snapshot."""
        return self._snapshots.index_for(self, meta, version, layer)

    def gather(self, meta: TableMeta, version: int, layer: int, ids: np.ndarray, out: np.ndarray) -> None:
        """out[i] = current row of ids[i]: the chunks with the recent rows laid over them."""
        self.index(meta, version, layer).gather(ids, out, self)
        delta = self.deltas.get((meta.table_id, version, layer))
        if delta is not None:
            delta.overlay(ids, out)

    def close(self) -> None:
        """End the read transaction (only once no lookup uses it)."""
        self.txn.abort()


class Snapshots:
    """The current Snapshot, replaced after every commit; the recent rows and chunk indexes new snapshots see."""

    def __init__(self, dbs: Databases):
        self.dbs = dbs
        self.deltas: dict[Key, RowDelta] = {}  # (table id, version, layer) -> recent rows
        self._lock = threading.Condition()
        self._current: Snapshot | None = None
        self._generation = 0
        self._open: set[Snapshot] = set()  # snapshots not yet closed
        self._indexes: dict[Key, tuple[ChunkIndex, int]] = {}  # -> (index, first generation it is valid for)
        self._restructured: dict[Key, int] = {}  # generation of each key's last structural change

    def acquire(self) -> Snapshot:
        """The snapshot of the latest commit (opened if needed); release() it after use."""
        with self._lock:
            snap = self._current
            if snap is None or snap.generation != self._generation:
                if snap is not None:
                    self._retire(snap)
                snap = self._current = Snapshot(self, self._generation)
                self._open.add(snap)
            snap.refs += 1
            return snap

    def release(self, snap: Snapshot) -> None:
        """Done with a snapshot from acquire()."""
        with self._lock:
            snap.refs -= 1
            if snap.refs == 0:
                if snap.retired:
                    self._close(snap)
                self._lock.notify_all()

    def index_for(self, snap: Snapshot, meta: TableMeta, version: int, layer: int) -> ChunkIndex:
        """The shared chunk index of a key, if it is valid at the snapshot's generation; else a new one (shared when
        no structural change happened since the snapshot began)."""
        key = (meta.table_id, version, layer)
        with self._lock:
            entry = self._indexes.get(key)
            if entry is not None and entry[1] <= snap.generation:
                return entry[0]
            index = ChunkIndex(meta, version, layer)
            since = self._restructured.get(key, 0)
            if entry is None and since <= snap.generation:  # valid from the last structural change on
                self._indexes[key] = (index, since)
            return index

    def committed(self, restructured: set[Key] | None = None) -> None:
        """A write committed: lookups from now on take a new snapshot. `restructured`: keys whose chunks were created,
        replaced or deleted (their chunk indexes are rebuilt for the new snapshots)."""
        with self._lock:
            self._generation += 1
            for key in restructured or ():
                self._indexes.pop(key, None)
                self._restructured[key] = self._generation

    def publish(self, key: Key, delta: RowDelta | None, restructured: set[Key] | None = None) -> None:
        """Replace (or with None, forget) a layer's recent rows; snapshots taken from now on see them."""
        deltas = dict(self.deltas)
        if delta is None:
            deltas.pop(key, None)
        else:
            deltas[key] = delta
        with self._lock:
            self.deltas = deltas
        self.committed(restructured)

    def wait_for_readers_without(self, key: Key, delta: RowDelta, timeout_s: float) -> bool:
        """Wait until no snapshot in use lacks the rows of `delta` for `key` (it would see rows being written in place);
        False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                busy = [s for s in self._open if s.refs > 0 and not (s.deltas.get(key) and s.deltas[key].holds_all_of(delta))]
                if not busy:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)

    def close(self) -> None:
        """End the current snapshot (as soon as no lookup uses it)."""
        with self._lock:
            if self._current is not None:
                self._retire(self._current)
                self._current = None

    def _retire(self, snap: Snapshot) -> None:
        snap.retired = True
        if snap.refs == 0:
            self._close(snap)

    def _close(self, snap: Snapshot) -> None:
        self._open.discard(snap)
        snap.close()
