"""TableStore: one LMDB environment holding any number of Engram table sets and their versions.

The store's face: lookups (the read path is here and in snapshots.py), and the wiring
of its parts, each in a module of its own:

    layout.py      databases, keys and records of the environment
    snapshots.py   the shared read snapshot; rows gathered out of the memory map
    catalog.py     table metadata and compression maps
    versions.py    create, copy, swap, roll back and drop tables and versions
    write_path.py  rows written and gradient pushes (row-wise Adam), logged, then held in RAM
    compaction.py  recent rows to sorted runs (runs.py), runs merged, runs folded into the chunks
    ledger.py      request ids of applied writes (a retried write is applied once)
    ownership.py   the rows a shard of a pool owns, and those frozen while they move
    migration.py   chunks exported to and imported from other shards
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from memory_service.backend import check_row_ids
from memory_service.errors import InvalidArgument, ResourceExhausted
from memory_service.row_optim import RowAdamConfig
from memory_service.spec import EngramSpec
from memory_service.store.bulk_load import BulkLoader, RowLoad
from memory_service.store.catalog import Catalog
from memory_service.store.compaction import Compactor
from memory_service.store.layout import DEFAULT_MAP_SIZE, PAGE_BYTES, ROWS, open_databases, prefix_items
from memory_service.store.ledger import RequestLedger
from memory_service.store.migration import ShardMoves
from memory_service.store.ownership import Ownership
from memory_service.store.runs import remove_unlisted
from memory_service.store.snapshots import Snapshots
from memory_service.store.versions import Versions
from memory_service.store.write_path import DEFAULT_MAX_DELTA_ROWS, WritePath
from memory_service.table_meta import DEFAULT_CHUNK_ROWS, TableMeta

log = logging.getLogger("engram.store")


class TableStore:
    """One LMDB environment: tables, versions, lookups, writes and gradient pushes."""

    def __init__(self, path: str | Path, map_size: int = DEFAULT_MAP_SIZE, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 optimizer: RowAdamConfig | None = None, sync: bool = True, max_delta_rows: int = DEFAULT_MAX_DELTA_ROWS,
                 background_compaction: bool = True):
        """background_compaction=False compacts in the push that passes the bound (deterministic, for tests)."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.dbs = open_databases(self.path, map_size, sync)
        self._write_lock = threading.RLock()  # one writer at a time
        self.counters = {"lookups": 0, "rows_served": 0, "writes": 0, "rows_written": 0, "rows_loaded": 0, "gradient_pushes": 0,
                         "rows_updated": 0, "compactions_started": 0, "compactions": 0, "flushes": 0, "merges": 0, "folds": 0,
                         "flush_s": 0.0, "merge_s": 0.0, "fold_s": 0.0}  # seconds spent in each compaction step
        self.catalog = Catalog(self.dbs)
        self.ownership = Ownership(self.dbs, self._write_lock)
        self.ledger = RequestLedger(self.dbs)
        self.snapshots = Snapshots(self.dbs)
        self.compactor = Compactor(self.dbs, self.catalog, self.snapshots, self.ownership, self._write_lock, max_delta_rows,
                                   self.counters, background=background_compaction)
        self.writes = WritePath(self.dbs, self.catalog, self.ownership, self.ledger, self.snapshots, self.compactor,
                                self._write_lock, optimizer or RowAdamConfig(), self.counters)
        self.versions = Versions(self.dbs, self.catalog, self.ownership, self.snapshots, self.writes, self.compactor,
                                 self._write_lock, chunk_rows)
        self.moves = ShardMoves(self.dbs, self.catalog, self.ownership, self.versions, self.writes, self.compactor,
                                self.snapshots)
        self.loader = BulkLoader(self.dbs, self.catalog, self.ownership, self.snapshots, self.compactor)
        self.writes.load()
        with self.dbs.env.begin(write=True) as txn:
            removed = remove_unlisted(txn, self.dbs)
        if removed:
            log.info("removed %d stored run arrays no run lists (a compaction cut short)", removed)

    # ------------------------------------------------------------------ tables and versions (versions.py)
    def create_table(self, name: str, spec: EngramSpec, compression_map: np.ndarray | None = None,
                     init_std: float = 1.0, init_seed: int = 0, chunk_rows: int | None = None) -> TableMeta:
        """Create a table set whose version 1 holds seeded N(0, init_std^2) rows (zeros if init_std == 0); active."""
        return self.versions.create_table(name, spec, compression_map, init_std, init_seed, chunk_rows)

    def create_version(self, name: str, copy_of: int | None = None, init_std: float | None = None, init_seed: int = 0) -> int:
        """New (inactive) version: a copy of another (0: the active one), seeded rows, or zeros; returns its number."""
        return self.versions.create_version(name, copy_of, init_std, init_seed)

    def swap(self, name: str, version: int) -> tuple[int, int]:
        """Make `version` active; returns (active, previous)."""
        return self.versions.swap(name, version)

    def rollback(self, name: str) -> tuple[int, int]:
        """Re-activate the version active before the last swap; returns (active, previous)."""
        return self.versions.rollback(name)

    def drop_version(self, name: str, version: int) -> None:
        """Delete an inactive version's rows and optimizer state."""
        self.versions.drop_version(name, version)

    def drop_table(self, name: str) -> None:
        """Delete a table set with all its versions."""
        self.versions.drop_table(name)

    def table_info(self, name: str) -> TableMeta:
        """Current metadata of a table (NotFound if absent)."""
        return self.catalog.info(name)

    def list_tables(self) -> list[TableMeta]:
        """Metadata of every table, by name."""
        return self.catalog.list()

    def compression_map(self, name: str) -> np.ndarray | None:
        """The table's compression map (int64 [vocab]) or None."""
        return self.catalog.compression_map(name)

    # ------------------------------------------------------------------ reads
    def lookup(self, name: str, layer: int, row_ids, version: int = 0, fingerprint: str | None = None,
               out=None, max_bytes: int | None = None) -> tuple[np.ndarray, int]:
        """Stored rows [N, row_width] (table dtype; FP8 records) for int64 ids [N], and the version they came from.

        out: an array to fill, or a callable (num_rows, row_width, dtype, version) -> array
        (the server gathers straight into its reply message). max_bytes: refuse
        (RESOURCE_EXHAUSTED) a response larger than this.
        """
        return self.lookup_layers(name, [(layer, row_ids)], version, fingerprint, out, max_bytes)

    def lookup_layers(self, name: str, parts: list[tuple[int, object]], version: int = 0, fingerprint: str | None = None,
                      out=None, max_bytes: int | None = None) -> tuple[np.ndarray, int]:
        """Rows of several (layer, ids [N_i]) parts, one after the other [sum N_i, row_width], all read from one
        version in one snapshot, and that version; out and max_bytes as for lookup()."""
        snap = self.snapshots.acquire()
        try:
            meta = snap.meta(name)
            checked = [(layer, check_row_ids(ids, meta.check_request(layer, fingerprint), layer)) for layer, ids in parts]
            total = sum(ids.size for _, ids in checked)
            if max_bytes is not None and total * meta.row_nbytes > max_bytes:
                raise ResourceExhausted(
                    f"lookup response of {total} rows is {total * meta.row_nbytes / 2**20:.1f} MiB, over the "
                    f"{max_bytes / 2**20:.1f} MiB limit: split it into batches of at most {max_bytes // meta.row_nbytes} rows")
            v = meta.resolve_version(version)
            if callable(out):
                out = out(total, meta.row_width, meta.dtype, v)
            if out is None or out.shape != (total, meta.row_width) or out.dtype != meta.dtype:
                out = np.empty((total, meta.row_width), dtype=meta.dtype)
            packed = out if out.flags.c_contiguous else np.empty_like(out, order="C")  # a strided caller buffer
            start = 0
            for layer, ids in checked:
                snap.gather(meta, v, layer, ids, packed[start:start + ids.size])  # [N_i, row_width], contiguous
                start += ids.size
            if packed is not out:
                out[...] = packed
            self.counters["lookups"] += 1
            self.counters["rows_served"] += total
            return out, v
        finally:
            self.snapshots.release(snap)

    def read_range(self, name: str, layer: int, start: int, stop: int, version: int = 0) -> tuple[np.ndarray, int]:
        """Rows [start, stop) of a layer (export); an empty range gives no rows."""
        meta = self.table_info(name)
        num_rows = meta.check_request(layer, None)
        if not 0 <= start <= stop <= num_rows:
            raise InvalidArgument(f"row range [{start}, {stop}) is outside layer {layer}'s [0, {num_rows})")
        return self.lookup(name, layer, np.arange(start, stop, dtype=np.int64), version)

    def optimizer_state(self, name: str, layer: int, row_ids, version: int = 0) -> np.ndarray:
        """Adam records (m, v, step) of rows (for tests and export)."""
        snap = self.snapshots.acquire()
        try:
            meta = snap.meta(name)
            ids = check_row_ids(row_ids, meta.check_request(layer, None), layer)
            return self.writes.records(meta, meta.resolve_version(version), layer, ids, snap)
        finally:
            self.snapshots.release(snap)

    # ------------------------------------------------------------------ writes (write_path.py, ledger.py)
    def write_rows(self, name: str, layer: int, row_ids, rows, version: int = 0, fingerprint: str | None = None,
                   request_id: str | None = None) -> int:
        """Set rows of a version in one committed transaction; returns the version written."""
        return self.writes.write_rows(name, layer, row_ids, rows, version, fingerprint, request_id)

    def load_rows(self, name: str, layer: int, start_row: int, rows, version: int, fingerprint: str | None = None) -> int:
        """Whole chunks of rows from start_row into an inactive version, written once each (bulk_load.py)."""
        return self.loader.load_rows(name, layer, start_row, rows, version, fingerprint)

    def load(self, loads: list[RowLoad]) -> int:
        """Several bulk loads (a LoadRows stream's messages) in shared commits; one bad load writes none of them."""
        loaded = self.loader.load(loads)
        self.counters["rows_loaded"] += loaded
        return loaded

    def apply_gradients(self, name: str, layer: int, row_ids, grads, lr: float, version: int = 0,
                        fingerprint: str | None = None, request_id: str | None = None) -> int:
        """Row-wise Adam on unique rows in one committed transaction; returns the version updated."""
        return self.writes.apply_gradients(name, layer, row_ids, grads, lr, version, fingerprint, request_id)

    def prune_requests(self, older_than_s: float = 3600.0) -> int:
        """Forget request ids recorded more than older_than_s ago; returns how many."""
        with self._write_lock:
            return self.ledger.prune(older_than_s)

    # ------------------------------------------------------------------ a shard of a pool (ownership.py, migration.py)
    @property
    def shard_state(self) -> dict:
        """{"epoch", "owned"} as last set (epoch 0: not a shard of a pool)."""
        return self.ownership.state

    def set_shard_state(self, epoch: int, owned: dict[str, dict[int, tuple[int, int]]]) -> None:
        """Record (durably) the shard map epoch and the row range this shard owns per table and layer."""
        with self._write_lock:
            self.ownership.set(epoch, owned)
        self.snapshots.committed()

    def check_owned(self, name: str, layer: int, ids: np.ndarray, write: bool = False) -> None:
        """StaleShardMap when ids are not this shard's; ShardUnavailable for writes to rows being moved."""
        self.ownership.check(name, layer, ids, write)

    def freeze(self, name: str, layer: int, start: int, stop: int) -> None:
        """Refuse writes to rows [start, stop) from now on; returns once writes in progress have committed."""
        self.ownership.freeze(name, layer, start, stop)

    def unfreeze(self, name: str) -> None:
        """Accept writes to every owned row of a table again."""
        self.ownership.unfreeze(name)

    def blueprint(self, name: str) -> dict:
        """What another shard needs to hold this table: spec, compression map, chunking, versions, active."""
        return self.moves.blueprint(name)

    def adopt_table(self, name: str, blueprint: dict) -> None:
        """Hold a table with another shard's spec and version numbers but no rows yet."""
        self.moves.adopt_table(name, blueprint)

    def export_chunks(self, name: str, layer: int, start_row: int, stop_row: int) -> list[tuple[bytes, bytes]]:
        """Every version's chunks (rows and Adam state) covering rows [start, stop)."""
        return self.moves.export_chunks(name, layer, start_row, stop_row)

    def import_chunks(self, name: str, layer: int, chunks: list[tuple[bytes, bytes]], start_row: int, stop_row: int) -> int:
        """Store chunks another shard exported for rows [start_row, stop_row) of a layer; returns how many."""
        return self.moves.import_chunks(name, layer, chunks, start_row, stop_row)

    def drop_unowned_chunks(self, name: str) -> int:
        """Delete chunks of rows this shard no longer owns; returns how many."""
        return self.moves.drop_unowned_chunks(name)

    # ------------------------------------------------------------------ housekeeping
    def warm(self, name: str, version: int = 0, batch_chunks: int = 4096, stop: threading.Event | None = None) -> int:
        """Touch every page of a version's rows, so the page cache holds them (as far as they fit); returns bytes read.

        One short read transaction per batch of chunks: a reader held through a whole big table would keep LMDB
        from reusing the pages compaction frees meanwhile. Stops early (between batches) once `stop` is set."""
        meta = self.table_info(name)
        v = meta.resolve_version(version)
        total, after = 0, None
        while True:
            with self.dbs.env.begin(buffers=True) as txn:
                seen = 0
                for key, value in prefix_items(txn, self.dbs.rows, ROWS, meta.table_id, v, start=after):
                    np.frombuffer(value, dtype=np.uint8)[::PAGE_BYTES].sum()  # reads one byte per page: faults it in
                    total += len(value)
                    seen += 1
                    if seen == batch_chunks:
                        after = bytes(key)
                        break
            if seen < batch_chunks or (stop is not None and stop.is_set()):
                return total

    def stats(self) -> dict[str, float]:
        """Counters plus environment size figures."""
        info, stat = self.dbs.env.info(), self.dbs.env.stat()
        out = {k: float(v) for k, v in self.counters.items()}
        out["delta_rows"] = float(self.writes.delta_rows())
        out.update(map_size=float(info["map_size"]), last_page=float(info["last_pgno"]),
                   used_bytes=float((info["last_pgno"] + 1) * stat["psize"]), readers=float(info["num_readers"]))
        return out

    def close(self) -> None:
        """Close the environment (after ending the shared snapshot)."""
        self.compactor.close()
        self.snapshots.close()
        self.dbs.env.close()
        self.dbs.wal_env.close()
