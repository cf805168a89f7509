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

import numpy as np

from memory_service.errors import FailedPrecondition, InvalidArgument, shown
from memory_service.store.catalog import Catalog
from memory_service.store.compaction import Compactor
from memory_service.store.layout import ROWS, WRITE_BATCH_BYTES, Databases, chunk_key
from memory_service.store.ownership import Ownership
from memory_service.store.snapshots import Snapshots
from memory_service.table_meta import TableMeta


class BulkLoader:
    """Chunk-aligned row loads into inactive versions of one store."""

    def __init__(self, dbs: Databases, catalog: Catalog, ownership: Ownership, snapshots: Snapshots, compactor: Compactor):
        self.dbs, self.catalog, self.ownership, self.snapshots, self.compactor = dbs, catalog, ownership, snapshots, compactor

    def load_rows(self, name: str, layer: int, start_row: int, rows: np.ndarray, version: int,
                  fingerprint: str | None = None) -> int:
        """Set rows [start_row, start_row + n) of an inactive version; start_row on a chunk boundary, n whole chunks
        (or up to the layer's end). Returns the rows loaded."""
        with self.compactor.exclusive():  # no swap, drop, freeze or compaction between the checks and the writes
            meta = self.catalog.info(name)
            num_rows = meta.check_request(layer, fingerprint)
            values = self._checked(meta, layer, num_rows, start_row, rows, version)
            count = values.shape[0]
            if count == 0:
                return 0
            stop_row = start_row + count
            self.ownership.check(name, layer, np.array([start_row, stop_row - 1]), write=True)
            key = (meta.table_id, version, layer)
            first = start_row // meta.chunk_rows
            chunks = np.arange(first, -(-stop_row // meta.chunk_rows))
            self.compactor.settle(meta, key)  # nothing pushed earlier may lie over the chunks loaded now
            batch, txn = [], self.dbs.env.begin(write=True)
            try:
                for chunk in chunks:
                    block = np.zeros((meta.chunk_rows, meta.head_dim), dtype=meta.dtype)  # [chunk_rows, head_dim]
                    part = values[(chunk - first) * meta.chunk_rows:(chunk - first + 1) * meta.chunk_rows]
                    block[:part.shape[0]] = part
                    txn.put(chunk_key(ROWS, meta.table_id, version, layer, int(chunk)), block.tobytes(), db=self.dbs.rows)
                    batch.append(chunk)
                    if len(batch) * block.nbytes >= WRITE_BATCH_BYTES or chunk == chunks[-1]:
                        # readers' chunk indexes look these chunks up again (their old pages are free)
                        with self.snapshots.replacing(rewritten={(key, ROWS): np.asarray(batch, dtype=np.int64)}):
                            txn.commit()
                        batch, txn = [], self.dbs.env.begin(write=True)
            finally:
                txn.abort()
        return count

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
        values = np.asarray(rows)
        if values.ndim != 2 or values.shape[1] != meta.head_dim:
            raise InvalidArgument(f"rows must be [n, {meta.head_dim}], got {list(values.shape)}")
        if values.dtype != meta.dtype:
            raise InvalidArgument(f"rows must be {meta.dtype.name} (the table dtype), got {values.dtype.name}")
        count = values.shape[0]
        stop_row = start_row + count
        if start_row < 0 or start_row % meta.chunk_rows or stop_row > num_rows or (
                count % meta.chunk_rows and stop_row != num_rows):
            raise InvalidArgument(f"a bulk load covers whole chunks of {meta.chunk_rows} rows from a chunk boundary (or up "
                                  f"to the layer's end, {num_rows}): got rows [{start_row}, {stop_row})")
        if not np.isfinite(values).all():
            raise InvalidArgument("rows contain NaN or Inf; refusing to store them", reason="NON_FINITE_VALUE")
        return values
