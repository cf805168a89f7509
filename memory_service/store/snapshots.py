"""Reads: a shared read snapshot, and rows gathered straight out of LMDB's memory map.

A long-lived read transaction (a Snapshot) is shared by all lookups and replaced after
every committed write (Snapshots). Inside it, a ChunkIndex turns every row id into an
address (chunk base + offset) and gathers all rows with one native call (or one
vectorised `np.take`) over a zero-copy view of the mapped region. Never one LMDB get per
row. A snapshot also keeps the recently pushed rows (row_delta.py) it started with, laid
over the chunks, so a reader sees whole pushes only; MVCC gives the rest: a reader never
sees half a write, and a lookup reads the active version and its rows from one snapshot,
so a swap is atomic for readers too.
"""

from __future__ import annotations

import ctypes
import math
import threading

import numpy as np

from memory_service import native
from memory_service.errors import FailedPrecondition, NotFound, shown
from memory_service.row_delta import RowDelta, row_bytes
from memory_service.store.layout import OPT, PAGE_BYTES, ROWS, Databases, chunk_key, group_by_chunk, opt_dtype
from memory_service.table_meta import TableMeta, meta_key


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
        if np.any((known - lo) % unit):
            return  # not page-congruent: the gather goes chunk by chunk
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
    """Chunk addresses of one (table, version, layer) inside a snapshot, resolved lazily."""

    def __init__(self, snapshot: "Snapshot", meta: TableMeta, version: int, layer: int, kind: int = ROWS):
        self.snapshot = snapshot
        self.meta = meta
        self.version = version
        self.layer = layer
        self.kind = kind  # ROWS: rows; OPT: Adam records (absent chunks read as zeros)
        self.db = snapshot.dbs.db_of(kind)
        self.chunk_rows = meta.chunk_rows
        self.row_nbytes = meta.row_nbytes if kind == ROWS else opt_dtype(meta.head_dim).itemsize
        self.chunk_nbytes = meta.chunk_rows * self.row_nbytes
        self.chunk_shift = meta.chunk_rows.bit_length() - 1 if meta.chunk_rows & (meta.chunk_rows - 1) == 0 else 0
        num_chunks = meta.num_chunks(layer)
        self.buffers: dict[int, memoryview] = {}  # keeps the zero-copy values referenced
        self.view = RowView(np.full(num_chunks, -1, dtype=np.int64), np.zeros(num_chunks, dtype=bool),
                            self.chunk_nbytes, self.row_nbytes)

    def resolve(self, chunks: np.ndarray) -> RowView:
        """A view in which every given chunk is resolved (one LMDB get per newly seen chunk)."""
        view = self.view
        if not np.any((view.addr[chunks] < 0) & ~view.missing[chunks]):
            return view
        with self.snapshot.lock:
            view = self.view
            need = chunks[(view.addr[chunks] < 0) & ~view.missing[chunks]]
            if need.size == 0:
                return view
            addr, missing = view.addr.copy(), view.missing.copy()
            txn = self.snapshot.txn
            for chunk in need.tolist():
                buf = txn.get(chunk_key(self.kind, self.meta.table_id, self.version, self.layer, chunk), db=self.db)
                if buf is None:
                    missing[chunk] = True
                    continue
                if len(buf) != self.chunk_nbytes:
                    raise FailedPrecondition(f"chunk {chunk} of {self.meta.name} v{self.version} layer {self.layer} is "
                                             f"{len(buf)} bytes, expected {self.chunk_nbytes}: the store is damaged",
                                             reason="STORE_DAMAGED")
                self.buffers[chunk] = buf
                addr[chunk] = _address(buf)
            self.view = RowView(addr, missing, self.chunk_nbytes, self.row_nbytes)
            return self.view

    def gather(self, ids: np.ndarray, out: np.ndarray) -> None:
        """out[i] = row ids[i]; ids int64 [N] in range, out [N, head_dim] in the table dtype."""
        if ids.size == 0:
            return
        chunks = ids >> self.chunk_shift if self.chunk_shift else ids // self.chunk_rows
        view = self.view
        if not view.complete:
            touched = np.zeros(view.addr.shape[0], dtype=bool)
            touched[chunks] = True
            view = self.resolve(np.flatnonzero(touched))
        out_bytes = row_bytes(out)  # [N, row bytes], a view of out
        if view.region is not None:
            units_per_row = self.row_nbytes // view.unit
            first = view.chunk_base[chunks]  # [N]; absent chunks give garbage indices (clipped, zeroed below)
            first += ids if units_per_row == 1 else ids * units_per_row
            if native.available() and out_bytes.flags.c_contiguous:
                native.gather_rows(view.region, first, out_bytes)
            elif units_per_row == 1:
                np.take(view.region, first, axis=0, out=out_bytes, mode="clip")
            else:
                index = first[:, None] + np.arange(units_per_row)[None, :]  # [N, k]
                np.take(view.region, index.reshape(-1), axis=0, out=out_bytes.reshape(-1, view.unit), mode="clip")
        else:
            for chunk, pos, offsets in group_by_chunk(ids, self.chunk_rows):
                if not view.missing[chunk]:
                    rows = np.frombuffer(self.buffers[chunk], dtype=np.uint8).reshape(self.chunk_rows, self.row_nbytes)
                    out_bytes[pos] = rows[offsets]
        if view.any_missing:
            out_bytes[view.missing[chunks]] = 0


class Snapshot:
    """A read transaction plus lazily built chunk indexes and the recent rows of its time; shared by concurrent lookups."""

    def __init__(self, dbs: Databases, deltas: dict[tuple[int, int, int], RowDelta], generation: int):
        self.dbs = dbs
        self.txn = dbs.env.begin(write=False, buffers=True)
        self.deltas = deltas  # recent rows as of this snapshot (replaced, never mutated, by writers)
        self.generation = generation
        self.lock = threading.Lock()  # serialises LMDB calls on this txn
        self.refs = 0
        self.retired = False
        self.metas: dict[str, TableMeta] = {}  # tables found; misses are not kept (any number of names may be asked)
        self.indexes: dict[tuple, ChunkIndex] = {}

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

    def index(self, meta: TableMeta, version: int, layer: int, kind: int = ROWS) -> ChunkIndex:
        """The chunk index of (table, version, layer) rows (or Adam records), built on first use."""
        key = (meta.table_id, version, layer, kind)
        index = self.indexes.get(key)
        if index is None:
            with self.lock:
                index = self.indexes.setdefault(key, ChunkIndex(self, meta, version, layer, kind))
        return index

    def gather(self, meta: TableMeta, version: int, layer: int, ids: np.ndarray, out: np.ndarray, kind: int = ROWS) -> None:
        """out[i] = current row (or Adam record) of ids[i]: the chunks with the recent rows laid over them."""
        self.index(meta, version, layer, kind).gather(ids, out)
        delta = self.deltas.get((meta.table_id, version, layer))
        if delta is not None:
            delta.overlay(ids, out, opt=kind == OPT)

    def close(self) -> None:
        """End the read transaction (only once no lookup uses it)."""
        self.indexes.clear()
        self.txn.abort()


class Snapshots:
    """The current Snapshot, replaced after every commit, and the recent rows that new snapshots see."""

    def __init__(self, dbs: Databases):
        self.dbs = dbs
        self.deltas: dict[tuple[int, int, int], RowDelta] = {}  # (table id, version, layer) -> recent rows
        self._lock = threading.Lock()
        self._current: Snapshot | None = None
        self._generation = 0

    def acquire(self) -> Snapshot:
        """The snapshot of the latest commit (opened if needed); release() it after use."""
        with self._lock:
            snap = self._current
            if snap is None or snap.generation != self._generation:
                if snap is not None:
                    self._retire(snap)
                snap = self._current = Snapshot(self.dbs, self.deltas, self._generation)
            snap.refs += 1
            return snap

    def release(self, snap: Snapshot) -> None:
        """Done with a snapshot from acquire()."""
        with self._lock:
            snap.refs -= 1
            if snap.retired and snap.refs == 0:
                snap.close()

    def committed(self) -> None:
        """A write committed: lookups from now on take a new snapshot."""
        with self._lock:
            self._generation += 1

    def publish(self, key: tuple[int, int, int], delta: RowDelta | None) -> None:
        """Replace (or with None, forget) a layer's recent rows; snapshots taken from now on see them."""
        deltas = dict(self.deltas)
        if delta is None:
            deltas.pop(key, None)
        else:
            deltas[key] = delta
        with self._lock:
            self.deltas = deltas
            self._generation += 1

    def close(self) -> None:
        """End the current snapshot (as soon as no lookup uses it)."""
        with self._lock:
            if self._current is not None:
                self._retire(self._current)
                self._current = None

    @staticmethod
    def _retire(snap: Snapshot) -> None:
        snap.retired = True
        if snap.refs == 0:
            snap.close()
