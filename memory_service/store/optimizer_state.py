"""Row-wise Adam state of a store's tables, kept apart from the rows it serves.

Each row's optimizer record (Adam m, v, step: 520 bytes for a 64-wide row, four times an
fp16 row) lives in small chunks of `meta.opt_rows` records, about one page each, keyed
like row chunks (kind OPT). A chunk is created the first time one of its rows is trained
(absent chunks read as zeros, so a table that is only served holds no state) and is
then updated in place (mapped.py). Either way a push writes about a page per row it
touches, whatever the table's size. Lookups never read this state, only pushes and
folds do, so its chunk addresses are kept here, per (table, version, layer): built by one
cursor pass over the existing chunks on first use, updated as folds create chunks,
dropped when a structural change replaces them.
"""

from __future__ import annotations

import threading

import numpy as np

from memory_service.row_delta import row_bytes
from memory_service.store.layout import OPT, Databases, chunk_key, parse_key, prefix_items
from memory_service.store.mapped import WritableMap
from memory_service.table_meta import TableMeta

Key = tuple[int, int, int]  # (table id, version, layer)
ABSENT = -1


class OptimizerState:
    """Optimizer records of every table of a store (pushes read them, folds write them)."""

    def __init__(self, dbs: Databases, mapped: WritableMap):
        self.dbs = dbs
        self.mapped = mapped
        self._chunks: dict[Key, np.ndarray] = {}  # int64 [opt chunks]: map address of each chunk's value, or ABSENT
        self._lock = threading.Lock()  # a scan and a fold's new chunks never interleave

    def _chunk_addresses(self, meta: TableMeta, version: int, layer: int) -> np.ndarray:
        key = (meta.table_id, version, layer)
        chunks = self._chunks.get(key)
        if chunks is None:
            with self._lock, self.dbs.env.begin(buffers=True) as txn:  # one pass over the chunks that exist now
                chunks = self._chunks.get(key)
                if chunks is None:
                    chunks = np.full(meta.num_opt_chunks(layer), ABSENT, dtype=np.int64)
                    for k, value in prefix_items(txn, self.dbs.opt, OPT, meta.table_id, version, layer):
                        chunks[parse_key(k)[4]] = np.frombuffer(value, dtype=np.uint8).__array_interface__["data"][0]
                    self._chunks[key] = chunks
        return chunks

    def addresses(self, meta: TableMeta, version: int, layer: int, ids: np.ndarray) -> np.ndarray:
        """int64 [N]: the map address of each row's record (ABSENT where its chunk does not exist yet)."""
        rows = meta.opt_rows
        chunk = ids // rows
        base = self._chunk_addresses(meta, version, layer)[chunk]
        return np.where(base >= 0, base + (ids - chunk * rows) * meta.opt_record.itemsize, ABSENT)

    def gather(self, meta: TableMeta, version: int, layer: int, ids: np.ndarray) -> np.ndarray:
        """The records of rows ids [N] (zeros for rows never trained): structured [N] of meta.opt_record.

        A record being written by a fold meanwhile may read torn; the caller lays the delta,
        which holds every such row, over the result."""
        out = np.empty(ids.size, dtype=meta.opt_record)
        self.mapped.read(self.addresses(meta, version, layer, ids), row_bytes(out))
        return out

    def write(self, txn, meta: TableMeta, version: int, layer: int, ids: np.ndarray, records: np.ndarray,
              addresses: np.ndarray) -> list[int]:
        """Store records [N] of rows ids [N] (ascending): in place where their chunk exists (addresses from
        `addresses`), else in new chunks put in `txn` (only chunks with a nonzero record); returns the chunks put."""
        data = row_bytes(records)  # [N, record bytes]
        self.mapped.write(addresses, data)
        new = np.flatnonzero((addresses < 0) & data.any(axis=1))
        if new.size == 0:
            return []
        rows, nbytes = meta.opt_rows, meta.opt_record.itemsize
        chunk_of = ids[new] // rows
        created, starts = np.unique(chunk_of, return_index=True)
        values = np.zeros((created.size, rows * nbytes), dtype=np.uint8)  # [C, chunk bytes]
        slot = np.searchsorted(created, chunk_of)  # [K]: which new chunk each record goes to
        offset = (ids[new] - chunk_of * rows) * nbytes
        index = (slot * rows * nbytes + offset)[:, None] + np.arange(nbytes)[None, :]  # [K, record bytes]
        values.reshape(-1)[index.reshape(-1)] = data[new].reshape(-1)
        keys = [chunk_key(OPT, meta.table_id, version, layer, int(c)) for c in created]
        with txn.cursor(db=self.dbs.opt) as cursor:
            cursor.putmulti(zip(keys, values))
        return created.tolist()

    def created(self, meta: TableMeta, version: int, layer: int, chunks: list[int]) -> None:
        """Record the addresses of chunks put by write(), once their transaction committed."""
        with self._lock:
            table = self._chunks.get((meta.table_id, version, layer))
            if table is None or not chunks:
                return
            with self.dbs.env.begin(buffers=True) as txn:
                for chunk in chunks:
                    value = txn.get(chunk_key(OPT, meta.table_id, version, layer, chunk), db=self.dbs.opt)
                    table[chunk] = np.frombuffer(value, dtype=np.uint8).__array_interface__["data"][0]

    def forget(self, table_id: int, versions=None, layers=None) -> None:
        """Drop the chunk addresses of keys whose chunks were replaced or deleted (rebuilt on next use)."""
        with self._lock:
            for key in [k for k in self._chunks if k[0] == table_id and (versions is None or k[1] in versions)
                        and (layers is None or k[2] in layers)]:
                del self._chunks[key]
