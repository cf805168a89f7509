"""How a table store lays out one LMDB environment (one shard directory): databases, keys, records.

    meta      b"table:" + name      -> TableMeta JSON (spec, versions, active, history)
              b"next_table_id"      -> u32, big-endian
              b"shard_state"        -> JSON {"epoch", "owned": {table: {layer: [lo, hi]}}} (a shard of a pool)
    rows      (ROWS, table, version, layer, chunk) -> chunk_rows x head_dim raw rows (table dtype, little-endian)
    opt       (OPT, table, version, layer, chunk)  -> opt_rows optimizer records (about a page); absent = zeros
    delta     (DELTA, table, version, layer, seq)  -> one gradient push: count, ids, rows, Adam records
    maps      table id (u32, big-endian) -> int64 compression map (for token lookups)
    requests  b"req:" + request id -> (version u64, unix time f64): writes already applied

Keys are big-endian (kind u8, table u32, version u32, layer u32, chunk u32), so one
(table, version, layer) is one contiguous key range. Chunk values are larger than half a
page: LMDB keeps each in whole overflow pages of its memory map, which never move while
the value exists. That is what lets a lookup gather rows straight out of the map
(snapshots.py) and a fold write pushed rows into them in place (write_path.py, mapped.py).
Row chunks hold `chunk_rows` rows (4096 by default); optimizer chunks hold `opt_rows`
records, sized to about a page so a push writes about a page of state per row.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

MAX_CHUNK_BYTES = 64 << 20  # one chunk value: a write of a row rewrites at most this much
DEFAULT_MAP_SIZE = 1 << 40  # virtual address space reserved for the map; the file grows as needed
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
    """An open LMDB environment and its named databases."""

    env: lmdb.Environment
    meta: object
    rows: object
    opt: object
    delta: object
    maps: object
    requests: object

    def db_of(self, kind: int):
        """The database holding keys of a kind."""
        return {ROWS: self.rows, OPT: self.opt, DELTA: self.delta}[kind]


def open_databases(path: Path, map_size: int = DEFAULT_MAP_SIZE, sync: bool = True) -> Databases:
    """Open (creating if needed) the environment under `path` and every database above."""
    # readahead off: lookups are random, readahead would pull useless pages into RAM.
    env = lmdb.open(str(path), map_size=map_size, max_dbs=8, subdir=True, sync=sync, metasync=sync,
                    readahead=False, max_readers=512, lock=True)
    return Databases(env, env.open_db(b"meta"), env.open_db(b"rows"), env.open_db(b"opt"), env.open_db(b"delta"),
                     env.open_db(b"maps"), env.open_db(b"requests"))


def prefix_items(txn, db, kind: int, table_id: int, version: int, layer: int | None = None):
    """(key, value) of every key of one (table, version[, layer]) in key order."""
    prefix = struct.pack(">BII", kind, table_id, version) + (b"" if layer is None else struct.pack(">I", layer))
    cursor = txn.cursor(db=db)
    if cursor.set_range(prefix):
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
