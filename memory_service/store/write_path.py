"""The write path of a store: rows written and gradient pushes (row-wise Adam).

A push (or a write of rows) is one transaction of the write-ahead environment (wal/): it
appends a segment (ids, new rows, optimizer records) and the request id, and is synced
before the reply: a write the size of the push, whatever the table's size. The segment
is merged into the layer's immutable RowDelta in RAM (row_delta.py), which lookups lay
over the sorted runs and the chunks; a push reads the rows and records it updates the
same way (chunks, runs, delta), from the latest snapshot. Once a delta passes
`max_delta_rows`, compaction.py moves it to disk in the background (sequential writes
only); a push waits for that only when compaction falls behind (the delta holds 4x its
bound). At open the log is read back into the deltas.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import numpy as np

from memory_service.backend import check_gradients, check_row_ids
from memory_service.errors import FailedPrecondition, InvalidArgument, shown
from memory_service.row_delta import RowDelta, decode_segment, encode_segment
from memory_service.row_optim import RowAdamConfig, check_learning_rate, row_adam_step
from memory_service.store.catalog import Catalog
from memory_service.store.compaction import Compactor
from memory_service.store.layout import DELTA, OPT, Databases, chunk_key, parse_key
from memory_service.store.ledger import RequestLedger
from memory_service.store.ownership import Ownership
from memory_service.store.snapshots import Key, Snapshot, Snapshots
from memory_service.table_meta import TableMeta

log = logging.getLogger("engram.store")

DEFAULT_MAX_DELTA_ROWS = 1 << 15  # recent rows per layer held in RAM before compaction writes them to a run
BACKLOG_FACTOR = 3  # a push waits for compaction once its delta holds this many times the bound


class WritePath:
    """Writes and gradient pushes of one store, and the recent rows they leave in RAM."""

    def __init__(self, dbs: Databases, catalog: Catalog, ownership: Ownership, ledger: RequestLedger, snapshots: Snapshots,
                 compactor: Compactor, write_lock: threading.RLock, optimizer: RowAdamConfig, counters: dict):
        self.dbs, self.catalog, self.ownership, self.ledger, self.snapshots = dbs, catalog, ownership, ledger, snapshots
        self.compactor = compactor
        self.write_lock = write_lock
        self.optimizer = optimizer
        self.counters = counters
        self._next_seq: dict[Key, int] = {}  # sequence number of each layer's next segment

    # ------------------------------------------------------------------ deltas and segments
    def _empty_delta(self, meta: TableMeta, key: Key) -> RowDelta:
        return RowDelta.empty(meta.row_width, meta.dtype, meta.opt_record, meta.num_chunks(key[2]), meta.chunk_rows,
                              self._next_seq.get(key, 0), self.compactor.new_lineage())

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
                ids, rows, opt = decode_segment(value, meta.row_width, meta.dtype, meta.opt_record)
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
        """Writer lock released: have a delta past its bound compacted (in the background, unless it fell behind)."""
        if not self.compactor.over_bound(merged):
            return
        limit = self.compactor.max_delta_rows
        if merged.size <= BACKLOG_FACTOR * limit and merged.segment_rows <= BACKLOG_FACTOR * 4 * limit:
            self.compactor.request(meta, key)
            return
        try:
            self.compactor.compact(meta, key)  # the backlog is too big: this push waits for it
        except Exception:  # noqa: BLE001 - the write is committed; the next one compacts again
            log.exception("compacting %s v%d layer %d failed", meta.name, key[1], key[2])

    def _target(self, txn, name: str, layer: int, version: int, fingerprint: str | None) -> tuple[TableMeta, int, int]:
        """(metadata, rows of the layer, resolved version) of a write's table."""
        meta = self.catalog.read(txn, name)
        num_rows = meta.check_request(layer, fingerprint)
        return meta, num_rows, meta.resolve_version(version)

    def records(self, meta: TableMeta, version: int, layer: int, ids: np.ndarray, snap: Snapshot) -> np.ndarray:
        """Current optimizer records of rows ids [N] as of the snapshot: chunks, then runs, then recent rows."""
        records = np.empty(ids.size, dtype=meta.opt_record)
        snap.gather(meta, version, layer, ids, records, kind=OPT)
        return records

    # ------------------------------------------------------------------ writes
    def write_rows(self, name: str, layer: int, row_ids, rows, version: int = 0, fingerprint: str | None = None,
                   request_id: str | None = None) -> int:
        """Set rows of a version in one committed transaction (their optimizer state unchanged); returns the version."""
        with self.write_lock:
            meta, num_rows, v = self._target_now(name, layer, version, fingerprint)
            ids = check_row_ids(row_ids, num_rows, layer)
            self.ownership.check(name, layer, ids, write=True)
            values = meta.check_rows(rows, ids.size)
            if np.unique(ids).size != ids.size:
                raise InvalidArgument("row ids of a write must be unique")
            v, merged = self._commit(meta, v, layer, ids, request_id, lambda snap: (
                np.ascontiguousarray(values), self.records(meta, v, layer, ids, snap)))
        if merged is None:  # a retried request, or no rows
            return v
        self._maybe_fold(meta, (meta.table_id, v, layer), merged)
        self.counters["writes"] += 1
        self.counters["rows_written"] += ids.size
        return v

    def _commit(self, meta: TableMeta, v: int, layer: int, ids: np.ndarray, request_id: str | None,
                update) -> tuple[int, RowDelta | None]:
        """One write (under write_lock): update(snapshot) gives the new rows and optimizer records of ids, appended to
        the log and published as recent rows. Returns the version written and the merged recent rows; None for them
        when nothing was written (a request already applied: the version it was applied to; no ids: recorded)."""
        snap = self.snapshots.acquire()  # the latest commit: no other writer runs while we hold the lock
        try:
            with self.dbs.wal_env.begin(write=True) as txn:
                done = self.ledger.seen(txn, request_id)
                if done is not None:
                    return done, None
                if ids.size == 0:
                    self.ledger.record(txn, request_id, v)
                    return v, None
                rows, records = update(snap)
                merged = self._append(txn, meta, v, layer, ids, rows, records, request_id)
        finally:
            self.snapshots.release(snap)
        self._publish((meta.table_id, v, layer), merged)
        return v, merged

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
            ids = check_row_ids(row_ids, num_rows, layer)
            self.ownership.check(name, layer, ids, write=True)  # under the lock: ownership cannot change meanwhile
            if not meta.trainable:
                raise FailedPrecondition(f"table {shown(name)} stores {meta.spec.dtype} rows, which are for serving: "
                                         "gradients cannot update them (train a float table, then quantize it into a "
                                         "new version of an FP8 table: engram table quantize)", reason="NOT_TRAINABLE")
            g = check_gradients(ids, grads, meta.head_dim)

            def adam_step(snap) -> tuple[np.ndarray, np.ndarray]:
                rows = np.empty((ids.size, meta.head_dim), dtype=meta.dtype)  # [N, head_dim]
                snap.gather(meta, v, layer, ids, rows)
                state = self.records(meta, v, layer, ids, snap)  # [N]
                return row_adam_step(rows, state, g, lr, self.optimizer)

            v, merged = self._commit(meta, v, layer, ids, request_id, adam_step)
        if merged is None:  # a retried request, or no rows
            return v
        self._maybe_fold(meta, (meta.table_id, v, layer), merged)
        self.counters["gradient_pushes"] += 1
        self.counters["rows_updated"] += ids.size
        return v

    def forget(self, table_id: int, versions: set[int]) -> None:
        """Drop the recent rows of dropped versions (inside exclusive(); their segments go with the version)."""
        for key in [k for k in self.snapshots.deltas if k[0] == table_id and k[1] in versions]:
            self.snapshots.publish(key, None)

    def delta_rows(self) -> int:
        """Recent rows held beside the chunks, all layers."""
        return sum(d.size for d in self.snapshots.deltas.values())
