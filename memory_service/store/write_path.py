"""The write path of a store: rows written, gradient pushes (row-wise Adam), and folding pushes into the chunks.

Each request is one write transaction, committed with fsync before the call returns,
under the store's single writer lock. A gradient push appends one segment (its ids, new
rows and Adam records) to the `delta` database and merges it into the layer's immutable
RowDelta (row_delta.py), which lookups overlay on the chunks: a write the size of the
push, not of the chunks it touches. Past `max_delta_rows` recent rows (or once the
stored segments hold 4x that, for hot rows pushed again and again) the delta is folded
into the chunks, each touched chunk rewritten once for many pushes, and its segments
are deleted in the fold's last transaction. Until then the chunks already rewritten hold
the same values as the delta, so a reader, or a restart after a crash, sees the same
rows either way. At open the segments are read back.
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
from memory_service.store.layout import (
    DELTA,
    OPT,
    ROWS,
    WRITE_BATCH_BYTES,
    Databases,
    chunk_key,
    group_by_chunk,
    opt_dtype,
    parse_key,
    prefix_items,
    read_chunk,
)
from memory_service.store.ledger import RequestLedger
from memory_service.store.ownership import Ownership
from memory_service.store.snapshots import Snapshots
from memory_service.table_meta import TableMeta

log = logging.getLogger("engram.store")

DEFAULT_MAX_DELTA_ROWS = 1 << 16  # recent rows per layer held beside the chunks before they are folded in
SEGMENT_ROWS_PER_DELTA_ROW = 4  # hot rows pushed again and again: fold once the segments hold 4x the delta's limit


class WritePath:
    """Writes and gradient pushes of one store, and the recent rows they leave beside the chunks."""

    def __init__(self, dbs: Databases, catalog: Catalog, ownership: Ownership, ledger: RequestLedger, snapshots: Snapshots,
                 write_lock: threading.Lock, optimizer: RowAdamConfig, max_delta_rows: int, counters: dict):
        self.dbs, self.catalog, self.ownership, self.ledger, self.snapshots = dbs, catalog, ownership, ledger, snapshots
        self.write_lock = write_lock
        self.optimizer = optimizer
        self.max_delta_rows = max_delta_rows
        self.counters = counters

    def _empty_delta(self, meta: TableMeta, layer: int) -> RowDelta:
        return RowDelta.empty(meta.head_dim, meta.dtype, opt_dtype(meta.head_dim), meta.num_chunks(layer), meta.chunk_rows)

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
                ids, rows, opt = decode_segment(value, meta.head_dim, meta.dtype, opt_dtype(meta.head_dim))
                deltas[(table_id, version, layer)] = dataclasses.replace(delta.merged(ids, rows, opt), next_seq=seq + 1)
        for key, delta in deltas.items():
            self.snapshots.publish(key, delta)

    def _target(self, txn, name: str, layer: int, version: int, fingerprint: str | None) -> tuple[TableMeta, int, int]:
        """(metadata, rows of the layer, resolved version) of a write's table."""
        meta = self.catalog.read(txn, name)
        num_rows = meta.check_request(layer, fingerprint)
        return meta, num_rows, meta.resolve_version(version)

    def write_rows(self, name: str, layer: int, row_ids, rows, version: int = 0, fingerprint: str | None = None,
                   request_id: str | None = None) -> int:
        """Set rows of a version in one committed transaction; returns the version written."""
        with self.write_lock:
            meta = self.catalog.info(name)
            if layer in meta.layer_rows and int(version or meta.active) in meta.versions:
                self.fold(meta, int(version or meta.active), layer)  # written rows must not be hidden by older pushes
            with self.dbs.env.begin(write=True) as txn:
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
                for chunk, pos, offsets in group_by_chunk(ids, meta.chunk_rows):
                    key = chunk_key(ROWS, meta.table_id, v, layer, chunk)
                    block = read_chunk(txn, self.dbs.rows, key, meta.dtype, (meta.chunk_rows, meta.head_dim))
                    block[offsets] = values[pos]
                    txn.put(key, block.tobytes(), db=self.dbs.rows)
                self.ledger.record(txn, request_id, v)
            self.snapshots.committed()
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
                with self.dbs.env.begin(write=True) as txn:
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
                    state = np.empty(ids.size, dtype=opt_dtype(meta.head_dim))  # [N]
                    snap.gather(meta, v, layer, ids, rows)
                    snap.gather(meta, v, layer, ids, state, kind=OPT)
                    new_rows, new_m, new_v, new_steps = row_adam_update(rows, state["m"], state["v"], state["step"], g, lr,
                                                                        self.optimizer)
                    state["m"], state["v"], state["step"] = new_m, new_v, new_steps
                    key = (meta.table_id, v, layer)
                    delta = self.snapshots.deltas.get(key) or self._empty_delta(meta, layer)
                    txn.put(chunk_key(DELTA, meta.table_id, v, layer, delta.next_seq), encode_segment(ids, new_rows, state),
                            db=self.dbs.delta)
                    self.ledger.record(txn, request_id, v)
                    merged = delta.merged(ids, new_rows, state)  # before the commit: a failure here stores nothing
            finally:
                self.snapshots.release(snap)
            self.snapshots.publish(key, merged)
            if merged.size > self.max_delta_rows or merged.segment_rows > SEGMENT_ROWS_PER_DELTA_ROW * self.max_delta_rows:
                try:
                    self.fold(meta, v, layer)
                except Exception:  # noqa: BLE001 - the push is committed; the next push folds again
                    log.exception("folding the recent rows of %s v%d layer %d failed", name, v, layer)
            self.counters["gradient_pushes"] += 1
            self.counters["rows_updated"] += ids.size
            return v

    def fold(self, meta: TableMeta, version: int, layer: int) -> int:
        """Write a layer's recent rows into its chunks and delete their segments (write lock held); returns rows folded.

        Commits every WRITE_BATCH_BYTES of chunks; the segments go in the last transaction.
        """
        key = (meta.table_id, version, layer)
        delta = self.snapshots.deltas.get(key)
        if delta is None:
            return 0
        record = opt_dtype(meta.head_dim)
        txn, pending = self.dbs.env.begin(write=True, buffers=True), 0
        try:
            for chunk, pos, offsets in group_by_chunk(delta.ids, meta.chunk_rows):
                row_key = chunk_key(ROWS, meta.table_id, version, layer, chunk)
                opt_key = chunk_key(OPT, meta.table_id, version, layer, chunk)
                block = read_chunk(txn, self.dbs.rows, row_key, meta.dtype, (meta.chunk_rows, meta.head_dim))
                state = read_chunk(txn, self.dbs.opt, opt_key, record, (meta.chunk_rows,))
                row_bytes(block)[offsets] = row_bytes(delta.rows)[pos]
                row_bytes(state)[offsets] = row_bytes(delta.opt)[pos]
                txn.put(row_key, memoryview(block).cast("B"), db=self.dbs.rows)  # no intermediate bytes copy
                txn.put(opt_key, memoryview(state.view(np.uint8)).cast("B"), db=self.dbs.opt)
                pending += block.nbytes + state.nbytes
                if pending >= WRITE_BATCH_BYTES:
                    txn.commit()
                    txn, pending = self.dbs.env.begin(write=True, buffers=True), 0
            for seq_key in [bytes(k) for k, _ in prefix_items(txn, self.dbs.delta, DELTA, meta.table_id, version, layer)]:
                txn.delete(seq_key, db=self.dbs.delta)
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        self.snapshots.publish(key, None)
        self.counters["folds"] += 1
        return delta.size

    def fold_table(self, meta: TableMeta, versions=None, layers=None) -> None:
        """Fold the recent rows of some (default: all) versions and layers of a table (write lock held)."""
        for table_id, version, layer in list(self.snapshots.deltas):
            if table_id == meta.table_id and (versions is None or version in versions) and (layers is None or layer in layers):
                self.fold(meta, version, layer)

    def forget(self, table_id: int, versions: set[int]) -> None:
        """Drop the recent rows of dropped versions (their segments are deleted with the version)."""
        for key in [k for k in self.snapshots.deltas if k[0] == table_id and k[1] in versions]:
            self.snapshots.publish(key, None)

    def delta_rows(self) -> int:
        """Recent rows held beside the chunks, all layers."""
        return sum(d.size for d in self.snapshots.deltas.values())
