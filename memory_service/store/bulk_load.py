"""Bulk loads: whole chunks of rows written straight into an inactive version (imports of big tables).

A push or a row write goes through the write-ahead log, the recent rows and the runs, and
carries each row's optimizer record with it; for an import of a whole table that is
several writes of every row (and, at the fold, optimizer chunks for every row). A bulk
load writes each chunk once, in order, in batched commits, and leaves optimizer state
alone (a row without a record has zeros, as after create). It takes whole chunks of an
inactive version, so the rows that serve never see a half-loaded table: load into a new
version, then swap.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from memory_service.errors import FailedPrecondition, InvalidArgument, shown
from memory_service.store.catalog import Catalog
from memory_service.store.compaction import Compactor
from memory_service.store.layout import ROWS, WRITE_BATCH_BYTES, Databases, chunk_key
from memory_service.store.ownership import Ownership
from memory_service.store.snapshots import Snapshots
from memory_service.table_meta import TableMeta


@dataclasses.dataclass(frozen=True)
class RowLoad:
    """Rows [start_row, start_row + n) of one layer of an inactive version (one LoadRows message)."""
    name: str
    layer: int
    start_row: int
    rows: np.ndarray  # [n, head_dim] in the table dtype
    version: int
    fingerprint: str | None = None


class BulkLoader:
    """Chunk-aligned row loads into inactive versions of one store."""

    def __init__(self, dbs: Databases, catalog: Catalog, ownership: Ownership, snapshots: Snapshots, compactor: Compactor):
        self.dbs, self.catalog, self.ownership, self.snapshots, self.compactor = dbs, catalog, ownership, snapshots, compactor

    def load_rows(self, name: str, layer: int, start_row: int, rows: np.ndarray, version: int,
                  fingerprint: str | None = None) -> int:
        """Set rows [start_row, start_row + n) of an inactive version; start_row on a chunk boundary, n whole chunks
        (or up to the layer's end). Returns the rows loaded."""
        return self.load([RowLoad(name, layer, start_row, rows, version, fingerprint)])

    def load(self, loads: list[RowLoad]) -> int:
        """Several loads in as few synced commits as WRITE_BATCH_BYTES allows (a stream of LoadRows messages: one
        commit per 4 MiB message cost more than the writes). All are checked before any is written: one bad load
        writes none of them. Returns the rows loaded."""
        with self.compactor.exclusive():  # no swap, drop, freeze or compaction between the checks and the writes
            checked = [self._check(load) for load in loads]
            layers = {(meta.table_id, load.version, load.layer): meta for load, (meta, _) in zip(loads, checked)}
            for key, meta in layers.items():
                self.compactor.settle(meta, key)  # nothing pushed earlier may lie over the chunks loaded now
            txn, written, pending_bytes = self.dbs.env.begin(write=True), {}, 0
            try:
                for load, (meta, values) in zip(loads, checked):
                    if values.shape[0] == 0:
                        continue
                    key = (meta.table_id, load.version, load.layer)
                    chunks = self._put(txn, meta, load, values)
                    written.setdefault((key, ROWS), []).extend(chunks)
                    pending_bytes += len(chunks) * meta.chunk_rows * meta.row_nbytes
                    if pending_bytes >= WRITE_BATCH_BYTES:
                        self._commit(txn, written)
                        txn, written, pending_bytes = self.dbs.env.begin(write=True), {}, 0
                if written:
                    self._commit(txn, written)
            finally:
                txn.abort()
        return sum(values.shape[0] for _, values in checked)

    def _check(self, load: RowLoad) -> tuple[TableMeta, np.ndarray]:
        """The table and the rows of a load, once they and the shard's ownership of them are acceptable."""
        meta = self.catalog.info(load.name)
        num_rows = meta.check_request(load.layer, load.fingerprint)
        values = self._checked(meta, load.layer, num_rows, load.start_row, load.rows, load.version)
        if values.shape[0]:
            rows = np.array([load.start_row, load.start_row + values.shape[0] - 1])
            self.ownership.check(load.name, load.layer, rows, write=True)
        return meta, values

    def _put(self, txn, meta: TableMeta, load: RowLoad, values: np.ndarray) -> list[int]:
        """Put a load's chunks in txn (uncommitted); returns the chunk numbers."""
        first = load.start_row // meta.chunk_rows
        chunks = range(first, -(-(load.start_row + values.shape[0]) // meta.chunk_rows))
        for chunk in chunks:
            block = values[(chunk - first) * meta.chunk_rows:(chunk - first + 1) * meta.chunk_rows]
            if block.shape[0] < meta.chunk_rows:  # the layer's last chunk: zeros past its end
                block = np.concatenate([block, np.zeros((meta.chunk_rows - block.shape[0], meta.row_width),
                                                        dtype=meta.dtype)])  # [chunk_rows, row_width]
            # a whole chunk goes in as a view of the request's rows: LMDB copies it into its page once
            txn.put(chunk_key(ROWS, meta.table_id, load.version, load.layer, chunk),
                    block.reshape(-1).view(np.uint8), db=self.dbs.rows)
        return list(chunks)

    def _commit(self, txn, written: dict[tuple, list[int]]) -> None:
        """Commit (synced); readers' chunk indexes look the written chunks up again (their old pages are free)."""
        with self.snapshots.replacing(rewritten={k: np.asarray(v, dtype=np.int64) for k, v in written.items()}):
            txn.commit()

    @staticmethod
    def _checked(meta: TableMeta, layer: int, num_rows: int, start_row: int, rows, version: int) -> np.ndarray:
        """The rows of a bulk load, once its version, alignment, shape, dtype and values are acceptable."""
        name = meta.name
        if not version or version not in meta.versions:
            raise InvalidArgument(f"a bulk load names an existing version of {shown(name)} (got {version}); its versions "
                                  f"are {sorted(meta.versions)}", reason="VERSION_NOT_FOUND")
        if version == meta.active:
            raise FailedPrecondition(f"version {version} of {shown(name)} is active: load into a new version "
                                     "(engram table new-version --empty), then swap", reason="VERSION_ACTIVE")
        values = meta.check_rows(rows)
        count = values.shape[0]
        stop_row = start_row + count
        if start_row < 0 or start_row % meta.chunk_rows or stop_row > num_rows or (
                count % meta.chunk_rows and stop_row != num_rows):
            raise InvalidArgument(f"a bulk load covers whole chunks of {meta.chunk_rows} rows from a chunk boundary (or up "
                                  f"to the layer's end, {num_rows}): got rows [{start_row}, {stop_row})")
        return np.ascontiguousarray(values)  # whole chunks are handed to LMDB as views
