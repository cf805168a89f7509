"""Reads: a shared read snapshot, and rows gathered straight out of LMDB's memory map.

A long-lived read transaction (a Snapshot) is shared by all lookups and replaced after
every committed write (Snapshots). A ChunkIndex turns every row id into an address
(chunk base + offset) and gathers all rows with one native call (or one vectorised
`np.take`) over a zero-copy view of the mapped region. Never one LMDB get per row.

A row is the chunk's, unless a sorted run holds a newer one (runs.py, laid over the
chunks oldest first), unless the recent rows in RAM hold a newer one still (row_delta.py,
laid over last). Each snapshot keeps the runs and recent rows it started with, so a
reader sees whole pushes only; MVCC gives the rest: a reader never sees half a write, and
a lookup reads the active version and its rows from one snapshot, so a swap is atomic
for readers too. Stored values never move while they exist, so a chunk index, once
built, serves every later snapshot: compaction that rewrites chunks marks just those for
new snapshots to look up again (`committed(rewritten=...)`).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from memory_service import native
from memory_service.errors import FailedPrecondition, NotFound, shown
from memory_service.row_delta import RowDelta, row_bytes
from memory_service.store.layout import OPT, ROWS, Databases, chunk_key
from memory_service.store.row_view import RowView
from memory_service.store.runs import RECORDS, Key, RunView, read_directory
from memory_service.store.runs import ROWS as RUN_ROWS
from memory_service.table_meta import TableMeta, meta_key


def _address(buf) -> int:
    """Memory address of a buffer (a zero-copy LMDB value)."""
    return np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0]


class ChunkIndex:
    """Chunk addresses of one (table, version, layer) and kind (ROWS: rows, OPT: optimizer records, absent = zeros),
    resolved lazily; shared by the snapshots in which those chunks did not change."""

    def __init__(self, meta: TableMeta, version: int, layer: int, kind: int = ROWS, view: RowView | None = None):
        self.meta = meta
        self.version = version
        self.layer = layer
        self.kind = kind
        self.chunk_rows = meta.chunk_rows if kind == ROWS else meta.opt_rows
        self.row_nbytes = meta.row_nbytes if kind == ROWS else meta.opt_record.itemsize
        self.chunk_nbytes = self.chunk_rows * self.row_nbytes
        self.chunk_shift = self.chunk_rows.bit_length() - 1 if self.chunk_rows & (self.chunk_rows - 1) == 0 else 0
        num_chunks = meta.num_chunks(layer) if kind == ROWS else meta.num_opt_chunks(layer)
        self._lock = threading.Lock()
        self.view = view or RowView(np.full(num_chunks, -1, dtype=np.int64), np.zeros(num_chunks, dtype=bool),
                                    self.chunk_nbytes, self.row_nbytes)

    def without(self, chunks: np.ndarray) -> "ChunkIndex":
        """A copy in which the given (rewritten) chunks are to be looked up again."""
        addr, missing = self.view.addr.copy(), self.view.missing.copy()
        addr[chunks], missing[chunks] = -1, False
        return ChunkIndex(self.meta, self.version, self.layer, self.kind,
                          RowView(addr, missing, self.chunk_nbytes, self.row_nbytes))

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
                buf = snapshot.txn.get(chunk_key(self.kind, self.meta.table_id, self.version, self.layer, chunk),
                                       db=snapshot.dbs.db_of(self.kind))
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

    def __init__(self, snapshots: "Snapshots", generation: int, private: bool = False):
        self.dbs = snapshots.dbs
        # opened while a write replaced chunks and before the shared indexes knew of it: this snapshot may see the
        # new chunks, so it resolves chunk addresses for itself (never from, or into, the shared indexes)
        self.private = private
        self.own_indexes: dict[tuple, ChunkIndex] = {}
        self.txn = snapshots.dbs.env.begin(write=False, buffers=True)
        self.deltas = snapshots.deltas  # recent rows as of this snapshot (replaced, never mutated, by writers)
        self.generation = generation
        self.lock = threading.Lock()  # serialises LMDB calls on this txn
        self.refs = 0
        self.retired = False
        self.metas: dict[str, TableMeta] = {}  # tables found; misses are not kept (any number of names may be asked)
        self._runs: dict[Key, list[RunView]] = {}
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

    def index(self, meta: TableMeta, version: int, layer: int, kind: int = ROWS) -> ChunkIndex:
        """The chunk index of (table, version, layer) and kind valid in this snapshot."""
        return self._snapshots.index_for(self, meta, version, layer, kind)

    def runs(self, meta: TableMeta, version: int, layer: int) -> list[RunView]:
        """The layer's sorted runs as of this snapshot, oldest first."""
        key = (meta.table_id, version, layer)
        runs = self._runs.get(key)
        if runs is None:
            with self.lock:
                infos, _ = read_directory(self.txn, self.dbs, key)
                runs = self._runs[key] = [self._snapshots.run_view(self.txn, key, info, meta) for info in reversed(infos)]
        return runs

    def gather(self, meta: TableMeta, version: int, layer: int, ids: np.ndarray, out: np.ndarray, kind: int = ROWS) -> None:
        """out[i] = current row (kind OPT: optimizer record) of ids[i]: the chunks, then the runs, then the recent rows."""
        if ids.size == 0:
            return
        self.index(meta, version, layer, kind).gather(ids, out, self)
        out_bytes = row_bytes(out)
        for run in self.runs(meta, version, layer):
            run.overlay(ids, out_bytes, RUN_ROWS if kind == ROWS else RECORDS)
        delta = self.deltas.get((meta.table_id, version, layer))
        if delta is not None:
            delta.overlay(ids, out, opt=kind == OPT)

    def close(self) -> None:
        """End the read transaction (only once no lookup uses it)."""
        self.txn.abort()


class Snapshots:
    """The current Snapshot, replaced after every commit; the recent rows and chunk indexes new snapshots see."""

    def __init__(self, dbs: Databases):
        self.dbs = dbs
        self.deltas: dict[Key, RowDelta] = {}  # (table id, version, layer) -> recent rows
        self._lock = threading.Lock()
        self._current: Snapshot | None = None
        self._generation = 0
        self._indexes: dict[tuple, tuple[ChunkIndex, int]] = {}  # (key, kind) -> (index, first generation it is valid for)
        self._restructured: dict[tuple, int] = {}  # generation of each (key, kind)'s last structural change
        self._run_views: dict[tuple, RunView] = {}  # (key, run) -> views of a run's arrays (a run never changes)
        self._replacing = 0  # writes replacing chunks whose commit may be visible before committed() ran

    def acquire(self) -> Snapshot:
        """The snapshot of the latest commit (opened if needed); release() it after use."""
        with self._lock:
            snap = self._current
            if snap is None or snap.generation != self._generation:
                if snap is not None:
                    self._retire(snap)
                snap = self._current = Snapshot(self, self._generation, private=self._replacing > 0)
            snap.refs += 1
            return snap

    def release(self, snap: Snapshot) -> None:
        """Done with a snapshot from acquire()."""
        with self._lock:
            snap.refs -= 1
            if snap.refs == 0 and snap.retired:
                self._close(snap)

    def index_for(self, snap: Snapshot, meta: TableMeta, version: int, layer: int, kind: int = ROWS) -> ChunkIndex:
        """The shared chunk index of a key and kind, if it is valid at the snapshot's generation; else a new one
        (shared when no structural change happened since the snapshot began)."""
        slot = ((meta.table_id, version, layer), kind)
        if snap.private:
            with snap.lock:
                return snap.own_indexes.setdefault(slot, ChunkIndex(meta, version, layer, kind))
        with self._lock:
            entry = self._indexes.get(slot)
            if entry is not None and entry[1] <= snap.generation:
                return entry[0]
            index = ChunkIndex(meta, version, layer, kind)
            since = self._restructured.get(slot, 0)
            if entry is None and since <= snap.generation:  # valid from the last structural change on
                self._indexes[slot] = (index, since)
            return index

    def run_view(self, txn, key: Key, info, meta: TableMeta) -> RunView:
        """Views of a run's arrays (built once: a stored run never moves or changes)."""
        view = self._run_views.get((key, info.run))
        if view is None:
            view = self._run_views[(key, info.run)] = RunView(txn, self.dbs, key, info, meta.row_nbytes,
                                                             meta.opt_record.itemsize)
        return view

    @contextlib.contextmanager
    def replacing(self, restructured: set[Key] | None = None, rewritten: dict[tuple, np.ndarray] | None = None):
        """Around the commit of a write that replaces or deletes stored chunks (then committed() with the same
        arguments). A snapshot opened in between may already see the commit while the shared chunk indexes still
        hold the old chunks' addresses (pages the commit freed): it gets chunk indexes of its own instead."""
        with self._lock:
            self._replacing += 1
        try:
            yield
        finally:
            self.committed(restructured, rewritten, replaced=True)

    def committed(self, restructured: set[Key] | None = None, rewritten: dict[tuple, np.ndarray] | None = None,
                  dropped_runs: list[tuple] | None = None, replaced: bool = False) -> None:
        """A write committed: lookups from now on take a new snapshot.

        restructured: keys whose chunks were created, replaced or deleted wholesale (their chunk
        indexes are rebuilt); rewritten: {(key, kind): chunks} rewritten in place of themselves
        (just those are looked up again); dropped_runs: (key, run) no longer listed anywhere;
        replaced: the end of a replacing() block.
        """
        with self._lock:
            if replaced:
                self._replacing -= 1
            self._generation += 1
            if self._current is not None and self._current.refs == 0:  # an idle snapshot would keep LMDB from reusing
                self._retire(self._current)                            # the pages this commit freed
                self._current = None
            for key in restructured or ():
                for kind in (ROWS, OPT):
                    self._indexes.pop((key, kind), None)
                    self._restructured[(key, kind)] = self._generation
            if restructured:  # dropped versions and tables: their runs' views go too
                for slot in [s for s in self._run_views if s[0] in restructured]:
                    del self._run_views[slot]
            for slot, chunks in (rewritten or {}).items():
                entry = self._indexes.get(slot)
                if entry is not None:
                    self._indexes[slot] = (entry[0].without(chunks), self._generation)
                self._restructured[slot] = self._generation
            for run in dropped_runs or ():
                self._run_views.pop(run, None)

    def publish(self, key: Key, delta: RowDelta | None) -> None:
        """Replace (or with None, forget) a layer's recent rows; snapshots taken from now on see them."""
        deltas = dict(self.deltas)
        if delta is None:
            deltas.pop(key, None)
        else:
            deltas[key] = delta
        with self._lock:
            self.deltas = deltas
        self.committed()

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
        snap.close()
