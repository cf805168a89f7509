"""The write path of a store: rows written, gradient pushes (row-wise Adam), and folding pushes into the chunks.

A push (or a write of rows) is one transaction of the write-ahead environment (wal/): it
appends a segment (ids, new rows, optimizer records) and the request id, and is synced
before the reply: a write the size of the push. The segment is merged into the layer's
immutable RowDelta (row_delta.py), which lookups overlay on the chunks. Once a delta
passes `max_delta_rows` (or its segments hold 4x that: hot rows pushed again and again),
a background thread folds it in while pushes and lookups go on:

1. wait until no reader holds a snapshot lacking this delta's rows (lookups: ms);
2. write each row into its chunk's pages in place, and each optimizer record into its
   small chunk (optimizer_state.py), through a writable mapping of the data file
   (mapped.py); no reader can see a row half-written, because every snapshot in use
   overlays a delta holding every row being written;
3. commit the table environment (creating optimizer chunks that did not exist): its
   fdatasync makes the in-place bytes durable;
4. drop the folded segments from the write-ahead log, and publish the layer's delta
   without the rows no later push touched.

A fold writes about a page per row whatever the table's size, so the cost of a push
follows the rows pushed, never the table. A crash before step 4 leaves the segments,
which are read back at open and folded again (same values). If folds fall behind, a
push waits for one (the delta never grows past 4x its bound).

Locks: a fold holds `fold_lock` throughout and the writer lock only to read and publish
the delta; structural changes (copies, drops, shard moves) take both, in that order
(`exclusive()`), so no fold writes into chunks they replace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading

import numpy as np

from memory_service.backend import check_gradients, check_row_ids
from memory_service.errors import InvalidArgument, NotFound
from memory_service.row_delta import RowDelta, decode_segment, encode_segment, row_bytes
from memory_service.row_optim import RowAdamConfig, check_learning_rate, row_adam_update
from memory_service.store.catalog import Catalog
from memory_service.store.layout import DELTA, ROWS, Databases, chunk_key, group_by_chunk, parse_key, prefix_items
from memory_service.store.ledger import RequestLedger
from memory_service.store.mapped import WritableMap
from memory_service.store.optimizer_state import OptimizerState
from memory_service.store.ownership import Ownership
from memory_service.store.snapshots import Key, Snapshots
from memory_service.table_meta import TableMeta

log = logging.getLogger("engram.store")

DEFAULT_MAX_DELTA_ROWS = 1 << 14  # recent rows per layer held beside the chunks before they are folded in
SEGMENT_ROWS_PER_DELTA_ROW = 4  # hot rows pushed again and again: fold once the segments hold 4x the delta's limit
BACKLOG_FACTOR = 4  # a push waits for a fold once its delta holds this many times the limit
READER_WAIT_S = 10.0  # how long a fold waits for lookups on older snapshots before trying again later


class WritePath:
    """Writes and gradient pushes of one store, the recent rows they leave beside the chunks, and their folding."""

    def __init__(self, dbs: Databases, catalog: Catalog, ownership: Ownership, ledger: RequestLedger, snapshots: Snapshots,
                 state: OptimizerState, mapped: WritableMap, write_lock: threading.RLock, optimizer: RowAdamConfig,
                 max_delta_rows: int, counters: dict, background: bool = True):
        self.dbs, self.catalog, self.ownership, self.ledger, self.snapshots = dbs, catalog, ownership, ledger, snapshots
        self.state, self.mapped = state, mapped
        self.write_lock = write_lock
        self.fold_lock = threading.RLock()  # taken before write_lock, never after
        self.optimizer = optimizer
        self.max_delta_rows = max_delta_rows
        self.counters = counters
        self._next_seq: dict[Key, int] = {}  # sequence number of each layer's next segment
        self._lineages = 0
        self._background = background
        self._wanted: dict[Key, TableMeta] = {}  # layers waiting for the folding thread
        self._wake = threading.Condition()
        self._closing = False
        self._folder: threading.Thread | None = None

    # ------------------------------------------------------------------ deltas and segments
    def _new_lineage(self) -> int:
        self._lineages += 1
        return self._lineages

    def _empty_delta(self, meta: TableMeta, key: Key) -> RowDelta:
        return RowDelta.empty(meta.head_dim, meta.dtype, meta.opt_record, meta.num_chunks(key[2]), meta.chunk_rows,
                              self._next_seq.get(key, 0), self._new_lineage())

    def load(self) -> None:
        """Rebuild every layer's recent rows from the stored segments, oldest first (after a restart)."""
        metas = {m.table_id: m for m in self.catalog.list()}
        deltas: dict[Key, RowDelta] = {}
        with self.dbs.wal_env.begin(buffers=True) as txn:
            for key, value in txn.cursor(db=self.dbs.delta):
                _, table_id, version, layer, seq = parse_key(key)
                meta = metas.get(table_id)
                if meta is None or version not in meta.versions:
                    continue  # left by a drop that did not finish: nothing reads it
                k = (table_id, version, layer)
                delta = deltas.get(k) or self._empty_delta(meta, k)
                ids, rows, opt = decode_segment(value, meta.head_dim, meta.dtype, meta.opt_record)
                deltas[k] = dataclasses.replace(delta.merged(ids, rows, opt), next_seq=seq + 1)
                self._next_seq[k] = seq + 1
        for key, delta in deltas.items():
            self.snapshots.publish(key, delta)

    def _append(self, txn, meta: TableMeta, version: int, layer: int, ids, rows, records, request_id) -> RowDelta:
        """Append one segment (inside a write-ahead txn); the layer's delta with it merged (published after the commit)."""
        key = (meta.table_id, version, layer)
        delta = self.snapshots.deltas.get(key) or self._empty_delta(meta, key)
        txn.put(chunk_key(DELTA, *key, delta.next_seq), encode_segment(ids, rows, records), db=self.dbs.delta)
        self.ledger.record(txn, request_id, version)
        return delta.merged(ids, rows, records)  # before the commit: a failure here stores nothing

    def _publish(self, key: Key, merged: RowDelta) -> None:
        """After the commit, writer lock held: the next write merges onto this delta, lookups overlay it."""
        self._next_seq[key] = merged.next_seq
        self.snapshots.publish(key, merged)

    def _maybe_fold(self, meta: TableMeta, key: Key, merged: RowDelta) -> None:
        """Writer lock released: have a delta past its bounds folded (in the background unless folds fall behind)."""
        limit = self.max_delta_rows
        if merged.size <= limit and merged.segment_rows <= SEGMENT_ROWS_PER_DELTA_ROW * limit:
            return
        backlog = merged.size > BACKLOG_FACTOR * limit or merged.segment_rows > BACKLOG_FACTOR * SEGMENT_ROWS_PER_DELTA_ROW * limit
        if self._background and not backlog:
            self._request_fold(meta, key)
            return
        try:
            self.fold(meta, key[1], key[2])
        except Exception:  # noqa: BLE001 - the write is committed; the next one folds again
            log.exception("folding the recent rows of %s v%d layer %d failed", meta.name, key[1], key[2])

    def _target(self, txn, name: str, layer: int, version: int, fingerprint: str | None) -> tuple[TableMeta, int, int]:
        """(metadata, rows of the layer, resolved version) of a write's table."""
        meta = self.catalog.read(txn, name)
        num_rows = meta.check_request(layer, fingerprint)
        return meta, num_rows, meta.resolve_version(version)

    def records(self, meta: TableMeta, version: int, layer: int, ids: np.ndarray) -> np.ndarray:
        """Current optimizer records of rows ids [N]: their chunks with the recent ones laid over them."""
        records = self.state.gather(meta, version, layer, ids)
        delta = self.snapshots.deltas.get((meta.table_id, version, layer))
        if delta is not None:
            delta.overlay(ids, records, opt=True)
        return records

    # ------------------------------------------------------------------ writes
    def write_rows(self, name: str, layer: int, row_ids, rows, version: int = 0, fingerprint: str | None = None,
                   request_id: str | None = None) -> int:
        """Set rows of a version in one committed transaction (their optimizer state unchanged); returns the version."""
        with self.write_lock:
            meta, num_rows, v = self._target_now(name, layer, version, fingerprint)
            with self.dbs.wal_env.begin(write=True) as txn:
                done = self.ledger.seen(txn, request_id)
                if done is not None:
                    return done
                ids = check_row_ids(row_ids, num_rows, layer)
                self.ownership.check(name, layer, ids, write=True)
                values = np.asarray(rows)
                if values.shape != (ids.size, meta.head_dim):
                    raise InvalidArgument(f"rows must be [{ids.size}, {meta.head_dim}] for {ids.size} ids, got {list(values.shape)}")
                if values.dtype != meta.dtype:
                    raise InvalidArgument(f"rows must be {meta.dtype.name} (the table dtype), got {values.dtype.name}")
                if not np.isfinite(values).all():
                    raise InvalidArgument("rows contain NaN or Inf; refusing to store them", reason="NON_FINITE_VALUE")
                if np.unique(ids).size != ids.size:
                    raise InvalidArgument("row ids of a write must be unique")
                if ids.size == 0:
                    self.ledger.record(txn, request_id, v)
                    return v
                records = self.records(meta, v, layer, ids)
                merged = self._append(txn, meta, v, layer, ids, np.ascontiguousarray(values), records, request_id)
            self._publish((meta.table_id, v, layer), merged)
        self._maybe_fold(meta, (meta.table_id, v, layer), merged)
        self.counters["writes"] += 1
        self.counters["rows_written"] += ids.size
        return v

    def _target_now(self, name: str, layer: int, version: int, fingerprint: str | None) -> tuple[TableMeta, int, int]:
        with self.dbs.env.begin() as txn:
            return self._target(txn, name, layer, version, fingerprint)

    def apply_gradients(self, name: str, layer: int, row_ids, grads, lr: float, version: int = 0,
                        fingerprint: str | None = None, request_id: str | None = None) -> int:
        """Row-wise Adam on unique rows in one committed transaction; returns the version updated.

        Refused (InvalidArgument, nothing stored) when the update would leave a non-finite
        row or Adam moment: a learning rate or gradient too large for the table's dtype.
        """
        lr = check_learning_rate(lr)
        with self.write_lock:
            meta, num_rows, v = self._target_now(name, layer, version, fingerprint)
            snap = self.snapshots.acquire()  # the latest commit: no other writer runs while we hold the lock
            try:
                with self.dbs.wal_env.begin(write=True) as txn:
                    ids = check_row_ids(row_ids, num_rows, layer)
                    self.ownership.check(name, layer, ids, write=True)  # under the lock: ownership cannot change meanwhile
                    g = check_gradients(ids, grads, meta.head_dim)
                    done = self.ledger.seen(txn, request_id)
                    if done is not None:
                        return done
                    if ids.size == 0:
                        self.ledger.record(txn, request_id, v)
                        return v
                    rows = np.empty((ids.size, meta.head_dim), dtype=meta.dtype)  # [N, head_dim]
                    snap.gather(meta, v, layer, ids, rows)
                    state = self.records(meta, v, layer, ids)  # [N]
                    new_rows, new_m, new_v, new_steps = row_adam_update(rows, state["m"], state["v"], state["step"], g, lr,
                                                                        self.optimizer)
                    state["m"], state["v"], state["step"] = new_m, new_v, new_steps
                    merged = self._append(txn, meta, v, layer, ids, new_rows, state, request_id)
            finally:
                self.snapshots.release(snap)
            self._publish((meta.table_id, v, layer), merged)
        self._maybe_fold(meta, (meta.table_id, v, layer), merged)
        self.counters["gradient_pushes"] += 1
        self.counters["rows_updated"] += ids.size
        return v

    # ------------------------------------------------------------------ folding
    @contextlib.contextmanager
    def exclusive(self):
        """No fold runs and no write lands while the block runs (structural changes of chunks)."""
        with self.fold_lock, self.write_lock:
            yield

    def fold(self, meta: TableMeta, version: int, layer: int) -> int:
        """Write a layer's recent rows into its chunks in place and drop their segments; returns the rows folded
        (0 when the readers of older snapshots did not finish in time: a later write folds)."""
        key = (meta.table_id, version, layer)
        with self.fold_lock:
            with self.write_lock:
                delta = self.snapshots.deltas.get(key)
                if delta is None or not self._exists(meta, version):
                    return 0
                snap = self.snapshots.acquire()  # holds this delta: safe to read from while rows are written
            self.counters["folds_started"] += 1
            try:
                row_addresses = snap.index(meta, version, layer).addresses(delta.ids, snap)  # [D], -1: chunk absent
            finally:
                self.snapshots.release(snap)
            opt_addresses = self.state.addresses(meta, version, layer, delta.ids)  # [D]
            if not self.snapshots.wait_for_readers_without(key, delta, READER_WAIT_S):
                log.warning("lookups on older snapshots of %s v%d layer %d did not end in %.0f s; folding later",
                            meta.name, version, layer, READER_WAIT_S)
                return 0
            self.mapped.write(row_addresses, row_bytes(delta.rows))
            restructured = set()
            with self.dbs.env.begin(write=True) as txn:  # its commit also syncs the bytes written in place
                if np.any(row_addresses < 0):  # rows of chunks that do not exist (a table made without them): make them
                    self._create_row_chunks(txn, meta, version, layer, delta, row_addresses < 0)
                    restructured.add(key)
                created = self.state.write(txn, meta, version, layer, delta.ids, delta.opt, opt_addresses)
            self.state.created(meta, version, layer, created)
            with self.write_lock:
                self._rebase(meta, key, delta, restructured)
            self.counters["folds"] += 1
            return delta.size

    def _exists(self, meta: TableMeta, version: int) -> bool:
        """Whether the table and version are still there (a fold asked for before a drop runs after it)."""
        try:
            return version in self.catalog.info(meta.name).versions
        except NotFound:
            return False

    def _rebase(self, meta: TableMeta, key: Key, folded: RowDelta, restructured: set[Key]) -> None:
        """Drop the folded segments; keep in the delta only the rows pushed again since (write lock held)."""
        current = self.snapshots.deltas[key]
        later_ids, later_rows = [], 0
        with self.dbs.wal_env.begin(write=True, buffers=True) as txn:
            for seq_key, value in list(prefix_items(txn, self.dbs.delta, DELTA, *key)):
                if parse_key(seq_key)[4] < folded.next_seq:
                    txn.delete(bytes(seq_key), db=self.dbs.delta)
                else:
                    ids, _, _ = decode_segment(value, meta.head_dim, meta.dtype, meta.opt_record)
                    later_ids.append(ids)
                    later_rows += ids.size
        if later_ids:
            rest = current.only(np.unique(np.concatenate(later_ids)), later_rows, self._new_lineage())
            self.snapshots.publish(key, rest, restructured)
        else:
            self.snapshots.publish(key, None, restructured)

    def _create_row_chunks(self, txn, meta: TableMeta, version: int, layer: int, delta: RowDelta, absent: np.ndarray) -> None:
        """Put the row chunks the delta's rows need that do not exist: zeros with those rows written in."""
        ids, rows = delta.ids[absent], row_bytes(delta.rows)[absent]
        for chunk, positions, offsets in group_by_chunk(ids, meta.chunk_rows):
            block = np.zeros((meta.chunk_rows, meta.row_nbytes), dtype=np.uint8)
            block[offsets] = rows[positions]
            txn.put(chunk_key(ROWS, meta.table_id, version, layer, chunk), block.tobytes(), db=self.dbs.rows)

    def fold_table(self, meta: TableMeta, versions=None, layers=None) -> None:
        """Fold the recent rows of some (default: all) versions and layers of a table (inside exclusive())."""
        for table_id, version, layer in list(self.snapshots.deltas):
            if table_id == meta.table_id and (versions is None or version in versions) and (layers is None or layer in layers):
                if not self.fold(meta, version, layer) and self.snapshots.deltas.get((table_id, version, layer)):
                    raise RuntimeError(f"could not fold the recent rows of {meta.name} v{version} layer {layer}")

    def _request_fold(self, meta: TableMeta, key: Key) -> None:
        with self._wake:
            self._wanted[key] = meta
            if self._folder is None:
                self._folder = threading.Thread(target=self._fold_loop, name="engram-fold", daemon=True)
                self._folder.start()
            self._wake.notify()

    def _fold_loop(self) -> None:
        while True:
            with self._wake:
                while not self._wanted and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                key, meta = self._wanted.popitem()
            try:
                delta = self.snapshots.deltas.get(key)
                if delta is not None and (delta.size > self.max_delta_rows
                                          or delta.segment_rows > SEGMENT_ROWS_PER_DELTA_ROW * self.max_delta_rows):
                    self.fold(meta, key[1], key[2])
            except Exception:  # noqa: BLE001 - the rows stay in the delta; the next push asks again
                log.exception("folding the recent rows of %s v%d layer %d failed", meta.name, key[1], key[2])

    def wait_for_folds(self) -> None:
        """Return once the folding thread has nothing asked of it and no fold runs (tests, benchmarks, shutdown)."""
        while True:
            with self._wake:
                idle = not self._wanted
            with self.fold_lock:  # a fold in progress finishes first
                if idle:
                    return

    def close(self) -> None:
        """Stop the folding thread (after the fold in progress, if any)."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        if self._folder is not None:
            self._folder.join()

    def forget(self, table_id: int, versions: set[int]) -> None:
        """Drop the recent rows of dropped versions (inside exclusive(); their segments go with the version)."""
        for key in [k for k in self.snapshots.deltas if k[0] == table_id and k[1] in versions]:
            self.snapshots.publish(key, None)
        with self._wake:
            for key in [k for k in self._wanted if k[0] == table_id and k[1] in versions]:
                del self._wanted[key]
        self.state.forget(table_id, versions)

    def delta_rows(self) -> int:
        """Recent rows held beside the chunks, all layers."""
        return sum(d.size for d in self.snapshots.deltas.values())
