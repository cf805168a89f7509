"""How a table store lays out its LMDB environments (one shard directory): databases, keys, records.

    meta      b"table:" + name      -> TableMeta JSON (spec, versions, active, history)
              b"next_table_id"      -> u32, big-endian
              b"shard_state"        -> JSON {"epoch", "owned": {table: {layer: [lo, hi]}}} (a shard of a pool)
    rows      (ROWS, table, version, layer, chunk) -> chunk_rows x head_dim raw rows (table dtype, little-endian)
    opt       (OPT, table, version, layer, chunk)  -> opt_rows optimizer records; absent = zeros
              b"runs:" + (table, version, layer) -> JSON run directory: [[run id, rows], ...] newest first
    maps      table id (u32, big-endian) -> int64 compression map (for token lookups)
    runs      (table, version, layer, run, array, part) -> a sorted run's ids, rows or records (runs.py)
  in wal/ (the write-ahead environment, synced by every write):
    delta     (DELTA, table, version, layer, seq)  -> one push (or write): count, ids, rows, optimizer records
    requests  b"req:" + request id -> (version u64, unix time f64): writes already applied

Keys are big-endian (kind u8, table u32, version u32, layer u32, chunk u32), so one
(table, version, layer) is one contiguous key range. Chunk values are larger than half a
page: LMDB keeps each in whole overflow pages of its memory map, which never move while
the value exists. That is what lets a lookup gather rows straight out of the map
(snapshots.py). Chunks hold `chunk_rows` rows (1024 by default) and are rewritten only
when compaction folds the sorted runs into them (compaction.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

MAX_CHUNK_BYTES = 64 << 20  # one chunk value: a write of a row rewrites at most this much
DEFAULT_MAP_SIZE = 1 << 40  # virtual address space reserved for the map; the file grows as needed
WAL_MAP_SIZE = 1 << 36  # the write-ahead environment holds only recent pushes and request ids
WRITE_BATCH_BYTES = 64 << 20  # bulk writes (init, copy, drop) commit every this many bytes
PAGE_BYTES = 4096
ROWS, OPT, DELTA = 1, 2, 3  # key kinds
_KEY = struct.Struct(">BIIII")  # kind, table id, version, layer, chunk (or segment sequence number)
_TABLE_ID = struct.Struct(">I")


def chunk_key(kind: int, table_id: int, version: int, layer: int, chunk: int) -> bytes:
    """Key of one chunk (or, for DELTA, of one pushed segment)."""
    return _KEY.pack(kind, table_id, version, layer, chunk)


def parse_key(key) -> tuple[int, int, int, int, int]:
    """(kind, table id, version, layer, chunk) of a key."""
    return _KEY.unpack(bytes(key))


def table_id_key(table_id: int) -> bytes:
    """Key of a table's compression map."""
    return _TABLE_ID.pack(table_id)


@dataclass(frozen=True)
class Databases:
    """The store's two LMDB environments and their named databases.

    `env` (the directory itself) holds tables: meta, rows, opt, maps. `wal_env` (its `wal/`
    subdirectory) holds what every write commits: pushed segments (delta) and the request
    ledger; a push syncs only this small file, and folds sync the big one in the background.
    """

    env: lmdb.Environment
    wal_env: lmdb.Environment
    meta: object
    rows: object
    opt: object
    maps: object
    runs: object
    delta: object
    requests: object

    def db_of(self, kind: int):
        """The database holding keys of a kind."""
        return {ROWS: self.rows, OPT: self.opt, DELTA: self.delta}[kind]

    def env_of(self, kind: int) -> lmdb.Environment:
        """The environment holding keys of a kind."""
        return self.wal_env if kind == DELTA else self.env


def open_databases(path: Path, map_size: int = DEFAULT_MAP_SIZE, sync: bool = True) -> Databases:
    """Open (creating if needed) both environments under `path` and every database above."""
    # readahead off: lookups are random, readahead would pull useless pages into RAM.
    env = lmdb.open(str(path), map_size=map_size, max_dbs=8, subdir=True, sync=sync, metasync=sync,
                    readahead=False, max_readers=512, lock=True)
    wal_env = lmdb.open(str(Path(path) / "wal"), map_size=WAL_MAP_SIZE, max_dbs=4, subdir=True, sync=sync, metasync=sync,
                        max_readers=512, lock=True)
    dbs = Databases(env, wal_env, env.open_db(b"meta"), env.open_db(b"rows"), env.open_db(b"opt"), env.open_db(b"maps"),
                    env.open_db(b"runs"), wal_env.open_db(b"delta"), wal_env.open_db(b"requests"))
    _move_log_of_older_stores(dbs)
    return dbs


def _move_log_of_older_stores(dbs: Databases) -> None:
    """Stores made before the write-ahead environment kept segments and request ids in the main one: move them."""
    for name, target in ((b"delta", dbs.delta), (b"requests", dbs.requests)):
        try:
            old = dbs.env.open_db(name, create=False)
        except lmdb.NotFoundError:
            continue
        with dbs.env.begin(write=True) as txn, dbs.wal_env.begin(write=True) as wal:
            items = list(txn.cursor(db=old))
            for key, value in items:
                wal.put(key, value, db=target)
            txn.drop(old, delete=True)


def prefix_items(txn, db, kind: int, table_id: int, version: int, layer: int | None = None, start: bytes | None = None):
    """(key, value) of every key of one (table, version[, layer]) in key order (only keys after `start`, if given)."""
    prefix = struct.pack(">BII", kind, table_id, version) + (b"" if layer is None else struct.pack(">I", layer))
    cursor = txn.cursor(db=db)
    if cursor.set_range(prefix if start is None else start + b"\0"):
        for key, value in cursor:
            if bytes(key[:len(prefix)]) != prefix:  # keys are memoryviews in buffers=True transactions
                break
            yield key, value


def read_chunk(txn, db, key: bytes, dtype, shape: tuple) -> np.ndarray:
    """A writable copy of a chunk, or zeros when the chunk does not exist yet (one copy in a buffers=True txn)."""
    current = txn.get(key, db=db)
    if current is None:
        return np.zeros(shape, dtype=dtype)
    return np.frombuffer(current, dtype=dtype).reshape(shape).copy()


def group_by_chunk(ids: np.ndarray, chunk_rows: int):
    """Yield (chunk, positions in ids, offsets in chunk) for every chunk the ids touch (a loop per chunk, not per row)."""
    chunks = ids // chunk_rows
    order = np.argsort(chunks, kind="stable")
    sorted_chunks = chunks[order]
    bounds = np.flatnonzero(np.diff(sorted_chunks)) + 1
    for part in np.split(order, bounds):
        if part.size:
            chunk = int(chunks[part[0]])
            yield chunk, part, ids[part] - chunk * chunk_rows
