"""Compaction: recent rows to sorted runs, runs into bigger runs, runs into the chunks; all sequential, all in the
background.

The write path keeps each layer's pushes in a delta in RAM, backed by the write-ahead
log (write_path.py). Here a background thread keeps three bounds, each with sequential
writes only, so a push costs the same whatever the table's size:

- flush: a delta past `max_delta_rows` becomes a new sorted run (runs.py), and the log
  segments it holds are dropped (the delta keeps only rows pushed since);
- merge: while the newest run holds at least 1/MERGE_RATIO of the next one's rows (or
  there are more than MAX_RUNS), the two merge into one, so a layer has few runs of
  geometrically growing sizes. A merge writes the ids and places of the rows (16 bytes
  a row), not the rows and records, which stay in the parts they were flushed to: the
  logarithmic number of merges a row goes through costs next to nothing;
- fold: once the runs' parts hold FOLD_FRACTION of the layer's rows, they are written
  into the chunks (every chunk rewritten once, in batches), and dropped with the parts.
  The rewrite costs the layer's size, once per FOLD_FRACTION of it pushed: a constant
  per row pushed.

Readers are never stopped: a run is listed only once written, chunks are rewritten with
LMDB's copy-on-write, and a snapshot keeps the runs, chunks and delta it started with.
A crash at any point leaves the log, the runs and the chunks consistent (a run not yet
listed is garbage, removed at open: runs.remove_unlisted; rows folded twice get the same values).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import numpy as np

from memory_service.row_delta import RowDelta, decode_segment, row_bytes
from memory_service.store.catalog import Catalog
from memory_service.store.layout import DELTA, OPT, ROWS, Databases, chunk_key, parse_key, prefix_items
from memory_service.store.ownership import Ownership
from memory_service.store.runs import (
    Key,
    RunInfo,
    RunView,
    RunWriter,
    delete_run,
    merge_places,
    read_directory,
    write_directory,
    write_merged,
)
from memory_service.store.snapshots import Snapshots
from memory_service.table_meta import TableMeta

log = logging.getLogger("engram.store")

MERGE_RATIO = 4  # merge the newest run into the next once it holds a quarter of that one's rows
MAX_RUNS = 6  # and merge anyway past this many runs (lookups look through each)
FOLD_FRACTION = 1 / 8  # fold the runs into the chunks once they hold this share of the layer's rows
FOLD_BATCH_BYTES = 16 << 20  # a fold commits every this many bytes of chunks: the pages each batch frees serve the next


class Compactor:
    """Flushes, merges and folds of one store, on a background thread (or in the calling thread when asked)."""

    def __init__(self, dbs: Databases, catalog: Catalog, snapshots: Snapshots, ownership: Ownership,
                 write_lock: threading.RLock, max_delta_rows: int, counters: dict, background: bool = True):
        self.dbs, self.catalog, self.snapshots, self.ownership = dbs, catalog, snapshots, ownership
        self.write_lock = write_lock
        self.lock = threading.RLock()  # taken before write_lock, never after: one compaction at a time
        self.max_delta_rows = max_delta_rows
        self.counters = counters
        self.background = background
        self.lineages = 0
        self._wanted: dict[Key, TableMeta] = {}
        self._wake = threading.Condition()
        self._closing = False
        self._busy = False  # the background thread took a layer and is compacting it
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ scheduling
    def new_lineage(self) -> int:
        """A number no delta had (write lock held)."""
        self.lineages += 1
        return self.lineages

    def over_bound(self, delta: RowDelta | None) -> bool:
        """Whether a delta should be flushed."""
        return delta is not None and (delta.size > self.max_delta_rows or delta.segment_rows > 4 * self.max_delta_rows)

    def request(self, meta: TableMeta, key: Key) -> None:
        """Have a layer flushed (and its runs merged or folded as needed): in the background, or now."""
        if not self.background:
            self.compact(meta, key)
            return
        with self._wake:
            self._wanted[key] = meta
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="engram-compact", daemon=True)
                self._thread.start()
            self._wake.notify_all()  # the loop, and any wait() caller

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._wanted and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                key, meta = self._wanted.popitem()
                self._busy = True
            try:
                self.compact(meta, key)
            except Exception:  # noqa: BLE001 - the rows stay where they are; the next push asks again
                log.exception("compacting %s v%d layer %d failed", meta.name, key[1], key[2])
            finally:
                with self._wake:
                    self._busy = False
                    self._wake.notify_all()

    def wait(self) -> None:
        """Return once nothing is asked of the background thread and no compaction runs."""
        with self._wake:
            while self._wanted or self._busy:
                self._wake.wait(0.05)

    def close(self) -> None:
        """Stop the background thread (after the compaction in progress)."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()

    @contextlib.contextmanager
    def exclusive(self):
        """No compaction runs and no write lands while the block runs (structural changes of chunks or runs)."""
        with self.lock, self.write_lock:
            yield

    def _exists(self, meta: TableMeta, version: int) -> bool:
        try:
            return version in self.catalog.info(meta.name).versions
        except Exception:  # noqa: BLE001 - the table is gone
            return False

    # ------------------------------------------------------------------ the three steps
    def compact(self, meta: TableMeta, key: Key) -> None:
        """Flush the layer's delta if it passed its bound, then merge and fold its runs as the policy says."""
        with self.lock:
            if not self._exists(meta, key[1]):
                return
            self.counters["compactions_started"] += 1
            try:
                if self.over_bound(self.snapshots.deltas.get(key)):
                    self.flush(meta, key)
                self._merge_runs(meta, key)
                runs, _ = self._directory(key)
                owned = self.ownership.owned_range(meta.name, key[2])  # a shard of a pool folds at 1/8 of its rows
                rows = meta.layer_rows[key[2]] if owned is None else max(owned[1] - owned[0], 1)
                if sum(r.stored_rows for r in runs) >= FOLD_FRACTION * rows:
                    self.fold(meta, key)
            finally:
                self.counters["compactions"] += 1

    def settle(self, meta: TableMeta, key: Key) -> None:
        """Everything of a layer into its chunks: flush the delta, fold the runs (before a copy or a shard move)."""
        with self.lock:
            if key in self.snapshots.deltas:
                self.flush(meta, key)
            if self._directory(key)[0]:
                self.fold(meta, key)

    def _directory(self, key: Key) -> tuple[list[RunInfo], int]:
        with self.dbs.env.begin() as txn:
            return read_directory(txn, self.dbs, key)

    def flush(self, meta: TableMeta, key: Key) -> None:
        """The delta becomes a new (newest) run; the log keeps only what was pushed since."""
        with self.write_lock:
            delta = self.snapshots.deltas.get(key)
        if delta is None:
            return
        started = time.perf_counter()
        runs, next_run = self._directory(key)
        writer = RunWriter(self.dbs, key, next_run, meta.row_nbytes, meta.opt_record.itemsize)
        writer.append(delta.ids, row_bytes(delta.rows), row_bytes(delta.opt))
        with self.dbs.env.begin(write=True) as txn:
            info = writer.finish(txn)
            write_directory(txn, self.dbs, key, [info] + runs, next_run + 1)
        self.snapshots.committed()
        self._rebase(meta, key, delta)
        self.counters["flushes"] += 1
        self.counters["flush_s"] += time.perf_counter() - started

    def _rebase(self, meta: TableMeta, key: Key, written: RowDelta) -> None:
        """Drop the log segments now stored elsewhere; keep in the delta only the rows pushed again since."""
        with self.write_lock:
            current = self.snapshots.deltas[key]
            later_ids, later_rows = [], 0
            with self.dbs.wal_env.begin(write=True, buffers=True) as txn:
                for seq_key, value in list(prefix_items(txn, self.dbs.delta, DELTA, *key)):
                    if parse_key(seq_key)[4] < written.next_seq:
                        txn.delete(bytes(seq_key), db=self.dbs.delta)
                    else:
                        ids, _, _ = decode_segment(value, meta.row_width, meta.dtype, meta.opt_record)
                        later_ids.append(ids)
                        later_rows += ids.size
            rest = None
            if later_ids:
                rest = current.only(np.unique(np.concatenate(later_ids)), later_rows, self.new_lineage())
            self.snapshots.publish(key, rest)

    def _merge_runs(self, meta: TableMeta, key: Key) -> None:
        """Merge the newest runs while the policy asks for it."""
        while True:
            runs, next_run = self._directory(key)
            if len(runs) < 2 or (runs[0].count * MERGE_RATIO < runs[1].count and len(runs) <= MAX_RUNS):
                return
            self._merge(meta, key, runs[:2], next_run)

    def _merge(self, meta: TableMeta, key: Key, pair: list[RunInfo], next_run: int) -> None:
        """One run out of two (pair: newest first): new ids and places, the rows stay in their parts (runs.py)."""
        started = time.perf_counter()
        newer, older = self._views(meta, key, pair)
        ids, places = merge_places(older, newer)
        with self.dbs.env.begin(write=True) as txn:
            info = write_merged(txn, self.dbs, key, next_run, ids, places, older.info, newer.info)
            runs, _ = read_directory(txn, self.dbs, key)
            merged_at = [r.run for r in runs].index(pair[0].run)
            runs = runs[:merged_at] + [info] + [r for r in runs[merged_at:] if r.run not in (pair[0].run, pair[1].run)]
            write_directory(txn, self.dbs, key, runs, next_run + 1)
            for old in pair:
                delete_run(txn, self.dbs, key, old, parts=False)  # the merged run reads its rows from their parts
        self.snapshots.committed(dropped_runs=[(key, r.run) for r in pair])
        self.counters["merges"] += 1
        self.counters["merge_s"] += time.perf_counter() - started

    def _views(self, meta: TableMeta, key: Key, runs: list[RunInfo]) -> list[RunView]:
        """Views of runs' arrays. No read transaction is held while they are read: a run's pages are freed only when
        this compactor deletes it, and a reader held through a long fold would keep LMDB from reusing the pages each
        batch frees, so the file would grow by a whole copy of the layer."""
        with self.dbs.env.begin(buffers=True) as read:
            return [RunView(read, self.dbs, key, info, meta.row_nbytes, meta.opt_record.itemsize) for info in runs]

    def fold(self, meta: TableMeta, key: Key) -> None:
        """Write every run into the chunks (rows and optimizer records), then drop the runs."""
        runs, _ = self._directory(key)
        if not runs:
            return
        started = time.perf_counter()
        views = self._views(meta, key, list(reversed(runs)))
        for kind, chunk_rows, nbytes in ((ROWS, meta.chunk_rows, meta.row_nbytes), (OPT, meta.opt_rows, meta.opt_record.itemsize)):
            self._fold_kind(meta, key, views, kind, chunk_rows, nbytes)
        with self.dbs.env.begin(write=True) as txn:
            current, next_run = read_directory(txn, self.dbs, key)
            folded = {r.run for r in runs}
            write_directory(txn, self.dbs, key, [r for r in current if r.run not in folded], next_run)
            for info in runs:
                delete_run(txn, self.dbs, key, info)
        self.snapshots.committed(dropped_runs=[(key, r.run) for r in runs])
        self.counters["folds"] += 1
        self.counters["fold_s"] += time.perf_counter() - started

    def _fold_kind(self, meta: TableMeta, key: Key, views: list[RunView], kind: int, chunk_rows: int, nbytes: int) -> None:
        """Rewrite every chunk of one kind that a run touches, oldest run first, in batched commits."""
        db = self.dbs.db_of(kind)
        num_rows = meta.layer_rows[key[2]]
        touched = np.unique(np.concatenate([v.ids // chunk_rows for v in views]))  # chunks some run writes into
        rewritten, pending = [], 0
        txn = self.dbs.env.begin(write=True, buffers=True)
        try:
            for chunk in touched.tolist():
                lo, hi = chunk * chunk_rows, min(num_rows, (chunk + 1) * chunk_rows)
                chunk_key_ = chunk_key(kind, *key, chunk)
                current = txn.get(chunk_key_, db=db)
                block = (np.zeros(chunk_rows * nbytes, np.uint8) if current is None
                         else np.frombuffer(current, np.uint8).copy()).reshape(chunk_rows, nbytes)
                for view in views:  # oldest first: newer runs overwrite
                    ids, rows, records = view.between(lo, hi)
                    block[ids - lo] = rows if kind == ROWS else records
                if current is None and not block.any():
                    continue  # absent optimizer chunks read as zeros: nothing to store
                txn.put(chunk_key_, block.data, db=db)
                rewritten.append(chunk)
                pending += block.nbytes
                if pending >= FOLD_BATCH_BYTES:
                    with self.snapshots.replacing(rewritten={(key, kind): np.asarray(rewritten, dtype=np.int64)}):
                        txn.commit()
                    txn, pending, rewritten = self.dbs.env.begin(write=True, buffers=True), 0, []
            with self.snapshots.replacing(rewritten={(key, kind): np.asarray(rewritten, dtype=np.int64)}):
                txn.commit()
        except BaseException:
            txn.abort()
            raise
