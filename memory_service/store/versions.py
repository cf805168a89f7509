"""Tables and their versions in a store: create, copy, seed, swap, roll back, drop.

A new version is written chunk by chunk in batched commits and becomes visible (in the
table's metadata) only once complete; swapping or rolling back is one write of the
metadata document, so readers switch atomically at their next snapshot. Versions are
kept until dropped explicitly; the active one cannot be dropped.
"""

from __future__ import annotations

import math
import shutil
import threading

import numpy as np

from memory_service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, shown
from memory_service.row_init import INIT_BLOCK_ROWS, init_rows
from memory_service.spec import EngramSpec
from memory_service.store.catalog import Catalog
from memory_service.store.compaction import Compactor
from memory_service.store.layout import (
    DELTA,
    MAX_CHUNK_BYTES,
    OPT,
    PAGE_BYTES,
    ROWS,
    WRITE_BATCH_BYTES,
    Databases,
    chunk_key,
    parse_key,
    prefix_items,
)
from memory_service.store.ownership import Ownership
from memory_service.store.runs import delete_runs_of
from memory_service.store.snapshots import Snapshots
from memory_service.store.write_path import WritePath
from memory_service.table_meta import TableMeta, check_table_name, layer_rows_for_spec

MAX_CHUNK_ROWS = 1 << 20


def check_init_std(init_std: float) -> float:
    """A finite, non-negative standard deviation for seeded rows."""
    if not math.isfinite(init_std) or init_std < 0:
        raise InvalidArgument(f"init_std must be a finite number >= 0, got {init_std}", reason="NON_FINITE_VALUE")
    return float(init_std)


class Versions:
    """Table and version lifecycle of one store (every method takes the store's writer lock)."""

    def __init__(self, dbs: Databases, catalog: Catalog, ownership: Ownership, snapshots: Snapshots, writes: WritePath,
                 compactor: Compactor, write_lock: threading.RLock, default_chunk_rows: int):
        self.dbs, self.catalog, self.ownership, self.snapshots, self.writes = dbs, catalog, ownership, snapshots, writes
        self.compactor = compactor
        self.write_lock = write_lock
        self.default_chunk_rows = default_chunk_rows

    def create_table(self, name: str, spec: EngramSpec, compression_map: np.ndarray | None = None,
                     init_std: float = 1.0, init_seed: int = 0, chunk_rows: int | None = None) -> TableMeta:
        """Create a table set whose version 1 holds seeded N(0, init_std^2) rows (zeros if init_std == 0); active.

        A shard of a pool materializes only the chunks of the rows it owns (set its shard state first).
        """
        check_table_name(name)
        init_std = check_init_std(init_std)
        chunk_rows = int(chunk_rows or self.default_chunk_rows)
        if chunk_rows < 64 or chunk_rows * spec.row_nbytes < PAGE_BYTES:
            raise InvalidArgument(f"chunk_rows {chunk_rows} is too small: a chunk holds at least 64 rows and spans at "
                                  f"least one {PAGE_BYTES}-byte page ({spec.row_nbytes}-byte rows)")
        if chunk_rows > MAX_CHUNK_ROWS or chunk_rows * spec.row_nbytes > MAX_CHUNK_BYTES:
            raise InvalidArgument(f"chunk_rows {chunk_rows} is too large: at most {MAX_CHUNK_ROWS} rows and "
                                  f"{MAX_CHUNK_BYTES >> 20} MiB per chunk")
        cmap = None
        if compression_map is not None:
            cmap = np.ascontiguousarray(compression_map, dtype="<i8")
            if spec.compressed_vocab_size is None or cmap.size == 0 or int(cmap.min()) < 0 \
                    or int(cmap.max()) + 1 != spec.compressed_vocab_size:
                raise InvalidArgument("compression map does not match the spec's compressed_vocab_size")
            bound = spec.with_compression(cmap, spec.compressed_vocab_size)
            if spec.compression_digest and bound.compression_digest != spec.compression_digest:
                raise InvalidArgument("compression map does not match the spec's compression_digest")
        layer_rows = layer_rows_for_spec(spec)
        self._check_fits(name, spec, layer_rows)
        with self.write_lock:
            with self.dbs.env.begin(write=True) as txn:
                if self.catalog.exists(txn, name):
                    raise AlreadyExists(f"table {shown(name)} already exists")
                table_id = self.catalog.next_table_id(txn)
            meta = TableMeta(name=name, table_id=table_id, spec=spec, chunk_rows=chunk_rows, layer_rows=layer_rows,
                             has_compression=cmap is not None)
            version = meta.add_version("init" if init_std else "empty")
            self._fill(meta, version, init_std, init_seed)
            meta.active = version
            with self.dbs.env.begin(write=True) as txn:
                self.catalog.put(txn, meta)
                if cmap is not None:
                    self.catalog.put_compression_map(txn, table_id, cmap)
            self.snapshots.committed()
            return meta

    def _check_fits(self, name: str, spec: EngramSpec, layer_rows: dict[int, int]) -> None:
        """ResourceExhausted when one version of the rows this store would hold exceeds its map or its free disk."""
        needed = 0
        for layer, num_rows in layer_rows.items():
            lo, hi = self.ownership.owned_range(name, layer) or (0, num_rows)
            needed += (hi - lo) * spec.row_nbytes
        limits = {"the store's map size": self.dbs.env.info()["map_size"],
                  "the free disk space": shutil.disk_usage(self.dbs.env.path()).free}
        for what, limit in limits.items():
            if needed > limit:
                raise ResourceExhausted(f"table {shown(name)} needs {needed / 2**30:,.1f} GiB per version here, more than "
                                        f"{what} ({limit / 2**30:,.1f} GiB): use more shards or smaller tables",
                                        reason="STORE_FULL")

    def _fill(self, meta: TableMeta, version: int, init_std: float, init_seed: int) -> None:
        """Write every owned chunk of a new version: seeded rows (batched commits). Zeros (init_std == 0) write
        nothing: an absent chunk reads as zeros everywhere (lookups, folds, copies), so an empty version for an
        import costs nothing before the rows arrive."""
        if not init_std:
            return
        spec = meta.spec
        pending = 0
        txn = self.dbs.env.begin(write=True)
        try:
            for layer, num_rows in meta.layer_rows.items():
                owned = self.ownership.owned_range(meta.name, layer) or (0, num_rows)
                first_chunk, end_chunk = owned[0] // meta.chunk_rows, -(-owned[1] // meta.chunk_rows)
                group = max(1, INIT_BLOCK_ROWS // meta.chunk_rows)  # chunks drawn at once: each seeded block drawn once
                for chunk in range(first_chunk, end_chunk):
                    if init_std and (chunk - first_chunk) % group == 0:
                        start = chunk * meta.chunk_rows
                        drawn = init_rows(num_rows, spec.head_dim, layer, start,
                                          min(num_rows, start + group * meta.chunk_rows), init_std, init_seed, spec.dtype)
                    rows = np.zeros((meta.chunk_rows, meta.row_width), dtype=meta.dtype)
                    if init_std:
                        offset = (chunk - first_chunk) % group * meta.chunk_rows
                        part = drawn[offset:offset + meta.chunk_rows]
                        rows[: part.shape[0]] = part
                    txn.put(chunk_key(ROWS, meta.table_id, version, layer, chunk), rows.tobytes(), db=self.dbs.rows)
                    pending += rows.nbytes
                    if pending >= WRITE_BATCH_BYTES:
                        txn.commit()
                        txn, pending = self.dbs.env.begin(write=True), 0
            txn.commit()
        except BaseException:
            txn.abort()
            raise

    def create_version(self, name: str, copy_of: int | None = None, init_std: float | None = None,
                       init_seed: int = 0) -> int:
        """New (inactive) version: a copy of another (0: the active one; rows and optimizer state), seeded rows, or zeros."""
        if init_std is not None:
            check_init_std(init_std)
        with self.compactor.exclusive():  # no compaction or push lands between settling the source and copying it
            meta = self.catalog.info(name)
            if copy_of is not None:
                source = meta.resolve_version(copy_of)
                version = meta.add_version(f"copy of {source}")
                for layer in meta.layer_rows:  # the copy takes chunks only
                    self.compactor.settle(meta, (meta.table_id, source, layer))
                self._copy(meta, source, version)
            else:
                version = meta.add_version("init" if init_std else "empty")
                self._fill(meta, version, init_std or 0.0, init_seed)
            with self.dbs.env.begin(write=True) as txn:
                current = self.catalog.read(txn, name)
                current.versions[version] = meta.versions[version]
                current.next_version = meta.next_version
                self.catalog.put(txn, current)
            self.snapshots.committed()
            return version

    def _copy(self, meta: TableMeta, source: int, target: int) -> None:
        for kind in (ROWS, OPT):
            db = self.dbs.db_of(kind)
            with self.dbs.env.begin() as read:
                batch, pending = [], 0
                for key, value in prefix_items(read, db, kind, meta.table_id, source):
                    _, _, _, layer, chunk = parse_key(key)
                    batch.append((chunk_key(kind, meta.table_id, target, layer, chunk), bytes(value)))
                    pending += len(value)
                    if pending >= WRITE_BATCH_BYTES:
                        self._put_batch(db, batch)
                        batch, pending = [], 0
                self._put_batch(db, batch)

    def _put_batch(self, db, items) -> None:
        if items:
            with self.dbs.env.begin(write=True) as txn, txn.cursor(db=db) as cursor:
                cursor.putmulti(items)

    def _delete_chunks(self, table_id: int, version: int, batch: int = 1024) -> None:
        """Delete a version's chunks, runs and logged segments, a batch of keys per transaction."""
        with self.dbs.env.begin(write=True) as txn:
            delete_runs_of(txn, self.dbs, table_id, version)
        for kind in (ROWS, OPT, DELTA):
            db = self.dbs.db_of(kind)
            while True:
                with self.dbs.env_of(kind).begin(write=True) as txn:
                    keys = []
                    for key, _ in prefix_items(txn, db, kind, table_id, version):
                        keys.append(bytes(key))
                        if len(keys) >= batch:
                            break
                    for key in keys:
                        txn.delete(key, db=db)
                if len(keys) < batch:
                    break

    def swap(self, name: str, version: int) -> tuple[int, int]:
        """Make `version` active; returns (active, previous). Readers switch at their next snapshot."""
        with self.write_lock:
            with self.dbs.env.begin(write=True) as txn:
                meta = self.catalog.read(txn, name)
                version = meta.resolve_version(version) if version else 0
                if not version:
                    raise InvalidArgument("swap needs a version number (>= 1)")
                previous = meta.active
                if version != previous:
                    meta.history.append(previous)
                    meta.active = version
                    self.catalog.put(txn, meta)
            self.snapshots.committed()
            return version, previous

    def rollback(self, name: str) -> tuple[int, int]:
        """Re-activate the version that was active before the last swap; returns (active, previous)."""
        with self.write_lock:
            with self.dbs.env.begin(write=True) as txn:
                meta = self.catalog.read(txn, name)
                history = [v for v in meta.history if v in meta.versions]
                if not history:
                    raise FailedPrecondition(f"table {shown(name)} has no earlier active version to roll back to",
                                             reason="NO_EARLIER_VERSION")
                previous = meta.active
                meta.active = history.pop()
                meta.history = history
                self.catalog.put(txn, meta)
            self.snapshots.committed()
            return meta.active, previous

    def drop_version(self, name: str, version: int) -> None:
        """Delete an inactive version's rows and optimizer state."""
        with self.compactor.exclusive():  # no compaction writes into what is being dropped
            with self.dbs.env.begin(write=True) as txn:
                meta = self.catalog.read(txn, name)
                if version not in meta.versions:
                    raise NotFound(f"table {shown(name)} has no version {version}; versions are {sorted(meta.versions)}",
                                   reason="VERSION_NOT_FOUND")
                if version == meta.active:
                    raise FailedPrecondition(f"version {version} of {shown(name)} is active; swap to another version first",
                                             reason="VERSION_ACTIVE")
                del meta.versions[version]
                meta.history = [v for v in meta.history if v != version]
                self.catalog.put(txn, meta)
            self.snapshots.committed({(meta.table_id, version, layer) for layer in meta.layer_rows})
            self.writes.forget(meta.table_id, {version})
            self._delete_chunks(meta.table_id, version)

    def drop_table(self, name: str) -> None:
        """Delete a table set with all its versions."""
        with self.compactor.exclusive():  # no compaction writes into what is being dropped
            with self.dbs.env.begin(write=True) as txn:
                meta = self.catalog.read(txn, name)
                self.catalog.delete(txn, meta)
            self.snapshots.committed({(meta.table_id, v, layer) for v in meta.versions for layer in meta.layer_rows})
            self.writes.forget(meta.table_id, set(meta.versions))
            for version in meta.versions:
                self._delete_chunks(meta.table_id, version)
