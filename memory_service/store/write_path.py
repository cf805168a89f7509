"""The write path of a store: rows written, gradient pushes (row-wise Adam), and folding pushes into the chunks.

Each request is one write transaction, committed with fsync before the call returns,
under the store's single writer lock. A push (or a write of rows) appends one segment
(its ids, new rows and optimizer records) to the `delta` database and merges it into
the layer's immutable RowDelta (row_delta.py), which lookups overlay on the chunks: a
write the size of the push. Past `max_delta_rows` recent rows (or once the stored
segments hold 4x that, for hot rows pushed again and again) the delta is folded in:

1. wait until no reader holds a snapshot without this delta (they are lookups: ms);
2. write each row into its chunk's pages in place, and each optimizer record into its
   small chunk (optimizer_state.py), through a writable mapping of the data file
   (mapped.py); a reader cannot see a row half-written, because its snapshot overlays
   the delta, which holds every row being written;
3. in one transaction: create the optimizer chunks that did not exist, delete the
   segments, commit; the commit's fdatasync also makes the in-place bytes durable;
4. publish the layer without its delta.

A fold writes about a page per row folded whatever the table's size: the cost of a push
follows the rows pushed, never the table. A crash before step 3 commits leaves the
segments, which are read back at open and folded again (same values).
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import numpy as np

from memory_service.backend import check_gradients, check_row_ids
from memory_service.errors import InvalidArgument
from memory_service.row_delta import RowDelta, decode_segment, encode_segment, row_bytes
from memory_service.row_optim import RowAdamConfig, check_learning_rate, row_adam_update
from memory_service.store.catalog import Catalog
from memory_service.store.layout import DELTA, ROWS, Databases, chunk_key, group_by_chunk, parse_key, prefix_items
from memory_service.store.ledger import RequestLedger
from memory_service.store.mapped import WritableMap
from memory_service.store.optimizer_state import OptimizerState
from memory_service.store.ownership import Ownership
from memory_service.store.snapshots import Snapshots
from memory_service.table_meta import TableMeta

log = logging.getLogger("engram.store")

DEFAULT_MAX_DELTA_ROWS = 1 << 14  # recent rows per layer held beside the chunks before they are folded in
SEGMENT_ROWS_PER_DELTA_ROW = 4  # hot rows pushed again and again: fold once the segments hold 4x the delta's limit
READER_WAIT_S = 10.0  # how long a fold waits for lookups on older snapshots before leaving the rows for the next push


class WritePath:
    """Writes and gradient pushes of one store, and the recent rows they leave beside the chunks."""

    def __init__(self, dbs: Databases, catalog: Catalog, ownership: Ownership, ledger: RequestLedger, snapshots: Snapshots,
                 state: OptimizerState, mapped: WritableMap, write_lock: threading.Lock, optimizer: RowAdamConfig,
                 max_delta_rows: int, counters: dict):
        self.dbs, self.catalog, self.ownership, self.ledger, self.snapshots = dbs, catalog, ownership, ledger, snapshots
        self.state, self.mapped = state, mapped
        self.write_lock = write_lock
        self.optimizer = optimizer
        self.max_delta_rows = max_delta_rows
        self.counters = counters

    def _empty_delta(self, meta: TableMeta, layer: int) -> RowDelta:
        return RowDelta.empty(meta.head_dim, meta.dtype, meta.opt_record, meta.num_chunks(layer), meta.chunk_rows)

    def load(self) -> None:
        """Rebuild every layer's recent rows from the stored segments, oldest first (after a restart)."""
        metas = {m.table_id: m for m in self.catalog.list()}
        deltas: dict[tuple[int, int, int], RowDelta] = {}
        with self.dbs.env.begin(buffers=True) as txn:
            for key, value in txn.cursor(db=self.dbs.delta):
                _, table_id, version, layer, seq = parse_key(key)
                meta = metas.get(table_id)
                if meta is None or version not in meta.versions:
                    continue  # left by a drop that did not finish: nothing reads it
                delta = deltas.get((table_id, version, layer)) or self._empty_delta(meta, layer)
                ids, rows, opt = decode_segment(value, meta.head_dim, meta.dtype, meta.opt_record)
                deltas[(table_id, version, layer)] = dataclasses.replace(delta.merged(ids, rows, opt), next_seq=seq + 1)
        for key, delta in deltas.items():
            self.snapshots.publish(key, delta)

    def _target(self, txn, name: str, layer: int, version: int, fingerprint: str | None) -> tuple[TableMeta, int, int]:
        """(metadata, rows of the layer, resolved version) of a write's table."""
        meta = self.catalog.read(txn, name)
        num_rows = meta.check_request(layer, fingerprint)
        return meta, num_rows, meta.resolve_version(version)

    def records(self, meta: TableMeta, version: int, layer: int, ids: np.ndarray, txn) -> np.ndarray:
        """Current optimizer records of rows ids [N]: their chunks with the recent ones laid over them."""
        records = self.state.gather(meta, version, layer, ids, txn)
        delta = self.snapshots.deltas.get((meta.table_id, version, layer))
        if delta is not None:
            delta.overlay(ids, records, opt=True)
        return records

    def _append(self, txn, meta: TableMeta, version: int, layer: int, ids, rows, records, request_id) -> RowDelta:
        """Append one segment (inside txn) and return the layer's delta with it merged (published after the commit)."""
        delta = self.snapshots.deltas.get((meta.table_id, version, layer)) or self._empty_delta(meta, layer)
        txn.put(chunk_key(DELTA, meta.table_id, version, layer, delta.next_seq), encode_segment(ids, rows, records),
                db=self.dbs.delta)
        self.ledger.record(txn, request_id, version)
        return delta.merged(ids, rows, records)  # before the commit: a failure here stores nothing

    def _after_append(self, meta: TableMeta, version: int, layer: int, merged: RowDelta) -> None:
        """Publish a merged delta, and fold it when it grew past its bounds (a failed fold is retried next time)."""
        self.snapshots.publish((meta.table_id, version, layer), merged)
        if merged.size > self.max_delta_rows or merged.segment_rows > SEGMENT_ROWS_PER_DELTA_ROW * self.max_delta_rows:
            try:
                self.fold(meta, version, layer)
            except Exception:  # noqa: BLE001 - the write is committed; the next one folds again
                log.exception("folding the recent rows of %s v%d layer %d failed", meta.name, version, layer)

    def write_rows(self, name: str, layer: int, row_ids, rows, version: int = 0, fingerprint: str | None = None,
                   request_id: str | None = None) -> int:
        """Set rows of a version in one committed transaction (their optimizer state unchanged); returns the version."""
        with self.write_lock:
            with self.dbs.env.begin(write=True, buffers=True) as txn:
                meta, num_rows, v = self._target(txn, name, layer, version, fingerprint)
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
                records = self.records(meta, v, layer, ids, txn)
                merged = self._append(txn, meta, v, layer, ids, np.ascontiguousarray(values), records, request_id)
            self._after_append(meta, v, layer, merged)
            self.counters["writes"] += 1
            self.counters["rows_written"] += ids.size
            return v

    def apply_gradients(self, name: str, layer: int, row_ids, grads, lr: float, version: int = 0,
                        fingerprint: str | None = None, request_id: str | None = None) -> int:
        """Row-wise Adam on unique rows in one committed transaction; returns the version updated.

        Refused (InvalidArgument, nothing stored) when the update would leave a non-finite
        row or Adam moment: a learning rate or gradient too large for the table's dtype.
        """
        lr = check_learning_rate(lr)
        with self.write_lock:
            snap = self.snapshots.acquire()  # the latest commit: no other writer runs while we hold the lock
            try:
                with self.dbs.env.begin(write=True, buffers=True) as txn:
                    meta, num_rows, v = self._target(txn, name, layer, version, fingerprint)
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
                    state = self.records(meta, v, layer, ids, txn)  # [N]
                    new_rows, new_m, new_v, new_steps = row_adam_update(rows, state["m"], state["v"], state["step"], g, lr,
                                                                        self.optimizer)
                    state["m"], state["v"], state["step"] = new_m, new_v, new_steps
                    merged = self._append(txn, meta, v, layer, ids, new_rows, state, request_id)
            finally:
                self.snapshots.release(snap)
            self._after_append(meta, v, layer, merged)
            self.counters["gradient_pushes"] += 1
            self.counters["rows_updated"] += ids.size
            return v

    def fold(self, meta: TableMeta, version: int, layer: int) -> int:
        """Write a layer's recent rows into its chunks in place and delete their segments (write lock held); returns
        the rows folded (0 when the readers of older snapshots did not finish in time: the next write folds)."""
        key = (meta.table_id, version, layer)
        delta = self.snapshots.deltas.get(key)
        if delta is None:
            return 0
        snap = self.snapshots.acquire()  # this delta's snapshot: the latest commit
        try:
            row_addresses = snap.index(meta, version, layer).addresses(delta.ids, snap)  # [D], -1: chunk absent
            with snap.lock:
                opt_addresses = self.state.addresses(meta, version, layer, delta.ids, snap.txn)  # [D]
        finally:
            self.snapshots.release(snap)
        if not self.snapshots.wait_for_readers_without(key, delta, READER_WAIT_S):
            log.warning("lookups on older snapshots of %s v%d layer %d did not end in %.0f s; folding later",
                        meta.name, version, layer, READER_WAIT_S)
            return 0
        self.mapped.write(row_addresses, row_bytes(delta.rows))
        restructured = set()
        with self.dbs.env.begin(write=True, buffers=True) as txn:
            if np.any(row_addresses < 0):  # rows of chunks that do not exist (a table made without them): make them
                self._create_row_chunks(txn, meta, version, layer, delta, row_addresses < 0)
                restructured.add(key)
            created = self.state.write(txn, meta, version, layer, delta.ids, delta.opt, opt_addresses)
            for seq_key in [bytes(k) for k, _ in prefix_items(txn, self.dbs.delta, DELTA, meta.table_id, version, layer)]:
                txn.delete(seq_key, db=self.dbs.delta)
        if created:
            with self.dbs.env.begin(buffers=True) as txn:
                self.state.created(meta, version, layer, created, txn)
        self.snapshots.publish(key, None, restructured)
        self.counters["folds"] += 1
        return delta.size

    def _create_row_chunks(self, txn, meta: TableMeta, version: int, layer: int, delta: RowDelta, absent: np.ndarray) -> None:
        """Put the row chunks the delta's rows need that do not exist: zeros with those rows written in."""
        ids, rows = delta.ids[absent], row_bytes(delta.rows)[absent]
        for chunk, positions, offsets in group_by_chunk(ids, meta.chunk_rows):
            block = np.zeros((meta.chunk_rows, meta.row_nbytes), dtype=np.uint8)
            block[offsets] = rows[positions]
            txn.put(chunk_key(ROWS, meta.table_id, version, layer, chunk), block.tobytes(), db=self.dbs.rows)

    def fold_table(self, meta: TableMeta, versions=None, layers=None) -> None:
        """Fold the recent rows of some (default: all) versions and layers of a table (write lock held)."""
        for table_id, version, layer in list(self.snapshots.deltas):
            if table_id == meta.table_id and (versions is None or version in versions) and (layers is None or layer in layers):
                if not self.fold(meta, version, layer) and self.snapshots.deltas.get((table_id, version, layer)):
                    raise RuntimeError(f"could not fold the recent rows of {meta.name} v{version} layer {layer}")

    def forget(self, table_id: int, versions: set[int]) -> None:
        """Drop the recent rows of dropped versions (their segments are deleted with the version)."""
        for key in [k for k in self.snapshots.deltas if k[0] == table_id and k[1] in versions]:
            self.snapshots.publish(key, None)
        self.state.forget(table_id, versions)

    def delta_rows(self) -> int:
        """Recent rows held beside the chunks, all layers."""
        return sum(d.size for d in self.snapshots.deltas.values())
