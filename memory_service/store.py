"""LMDB table store: Engram rows in fixed-size chunks of raw bytes, versions, row-wise Adam.

Layout of one environment (one shard directory):

    meta  db   b"table:" + name      -> TableMeta JSON (spec, versions, active, history)
               b"next_table_id"      -> u32
    rows  db   (kind, table, version, layer, chunk) -> chunk_rows x head_dim raw rows
    opt   db   same key              -> chunk_rows x (m[hd] f4, v[hd] f4, step i8), absent = zeros
    delta db   (kind, table, version, layer, seq) -> one push's ids, rows and Adam records
    maps  db   table id              -> int64 compression map (for token lookups)

Reads: a long-lived read transaction (a snapshot) is shared by all lookups and replaced
after every committed write. Chunks are values bigger than a page, so LMDB stores each
in contiguous overflow pages inside its memory map; a lookup turns every row id into
an address (chunk base + offset) and gathers all rows with one vectorised `np.take`
over a zero-copy view of the mapped region. Never one LMDB get per row.

Writes: one writer at a time; each request is one write transaction (committed with
fsync before the call returns). A gradient push appends a segment to the delta db and
lookups overlay the merged recent rows (row_delta.py) on the chunks; past
`max_delta_rows` rows the delta is folded into the chunks, each touched chunk rewritten
once for many pushes. MVCC means a reader never sees half a write, and a
lookup reads the active version and its rows from the same snapshot, so a swap is
atomic for readers too.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import struct
import threading
import logging
import time
from pathlib import Path

import lmdb
import numpy as np

from memory_service.backend import check_gradients, check_row_ids
from memory_service import native
from memory_service.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted,
                                   ShardUnavailable as ShardBusy)
from memory_service.row_init import init_rows
from memory_service.row_delta import RowDelta, decode_segment, encode_segment, row_bytes
from memory_service.row_optim import RowAdamConfig, row_adam_update
from memory_service.spec import EngramSpec
from memory_service.table_meta import TableMeta, check_table_name, layer_rows_for_spec

log = logging.getLogger("engram.store")

DEFAULT_CHUNK_ROWS = 4096
DEFAULT_MAP_SIZE = 1 << 40  # virtual address space reserved for the map; the file grows as needed
WRITE_BATCH_BYTES = 64 << 20  # bulk writes (init, copy, drop) commit every this many bytes
_KEY = struct.Struct(">BIIII")  # kind, table id, version, layer, chunk (big-endian: prefix order)
_ROWS, _OPT, _DELTA = 1, 2, 3
DEFAULT_MAX_DELTA_ROWS = 1 << 16  # recent rows per layer held beside the chunks before they are folded in
SEGMENT_ROWS_PER_DELTA_ROW = 4  # hot rows pushed again and again: fold once the segments hold 4x the delta's limit
_PAGE = 4096


def opt_dtype(head_dim: int) -> np.dtype:
    """Per-row optimizer record: Adam m, v and the row's step count."""
    return np.dtype([("m", "<f4", (head_dim,)), ("v", "<f4", (head_dim,)), ("step", "<i8")])


def chunk_key(kind: int, table_id: int, version: int, layer: int, chunk: int) -> bytes:
    """Key of one chunk."""
    return _KEY.pack(kind, table_id, version, layer, chunk)


def _address(buf) -> int:
    """Memory address of a buffer (a zero-copy LMDB value)."""
    return np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0]


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


class RowView:
    """An immutable picture of resolved chunks: addresses, absent chunks, and one row view over [lo, hi).

    Replaced as a whole (never mutated) when more chunks get resolved, so a gather that
    took a RowView computes addresses and reads rows from the same picture.
    """

    __slots__ = ("addr", "missing", "any_missing", "complete", "lo", "unit", "region", "chunk_base")

    def __init__(self, addr: np.ndarray, missing: np.ndarray, chunk_nbytes: int, row_nbytes: int):
        self.addr, self.missing = addr, missing
        self.any_missing = bool(missing.any())
        self.complete = bool(np.all((addr >= 0) | missing))  # nothing left to resolve
        self.lo, self.unit, self.region, self.chunk_base = 0, 0, None, None
        known = addr[addr >= 0]
        if known.size == 0:
            return
        lo, hi = int(known.min()), int(known.max()) + chunk_nbytes
        unit = math.gcd(row_nbytes, _PAGE)
        if np.any((known - lo) % unit):
            return  # not page-congruent: the gather goes chunk by chunk
        raw = (ctypes.c_uint8 * (hi - lo)).from_address(lo)
        region = np.frombuffer(raw, dtype=np.uint8)
        region.flags.writeable = False
        self.lo, self.unit = lo, unit
        self.region = region[: (hi - lo) // unit * unit].reshape(-1, unit)
        rows_per_chunk = chunk_nbytes // row_nbytes
        units_per_row = row_nbytes // unit
        # item index of row r = chunk_base[r // rows_per_chunk] + r * units_per_row
        self.chunk_base = (addr - lo) // unit - np.arange(addr.size, dtype=np.int64) * rows_per_chunk * units_per_row


class ChunkIndex:
    """Chunk addresses of one (table, version, layer) inside a snapshot, resolved lazily."""

    def __init__(self, snapshot: "Snapshot", meta: TableMeta, version: int, layer: int, kind: int = _ROWS):
        self.snapshot = snapshot
        self.meta = meta
        self.version = version
        self.layer = layer
        self.kind = kind  # _ROWS: rows; _OPT: Adam records (absent chunks read as zeros)
        self.db = snapshot.rows_db if kind == _ROWS else snapshot.opt_db
        self.chunk_rows = meta.chunk_rows
        self.row_nbytes = meta.row_nbytes if kind == _ROWS else opt_dtype(meta.head_dim).itemsize
        self.chunk_nbytes = meta.chunk_rows * self.row_nbytes
        self.chunk_shift = meta.chunk_rows.bit_length() - 1 if meta.chunk_rows & (meta.chunk_rows - 1) == 0 else 0
        num_chunks = meta.num_chunks(layer)
        self.buffers: dict[int, memoryview] = {}  # keeps the zero-copy values referenced
        self.view = RowView(np.full(num_chunks, -1, dtype=np.int64), np.zeros(num_chunks, dtype=bool),
                            self.chunk_nbytes, self.row_nbytes)

    def resolve(self, chunks: np.ndarray) -> RowView:
        """A view in which every given chunk is resolved (one LMDB get per newly seen chunk)."""
        view = self.view
        if not np.any((view.addr[chunks] < 0) & ~view.missing[chunks]):
            return view
        with self.snapshot.lock:
            view = self.view
            need = chunks[(view.addr[chunks] < 0) & ~view.missing[chunks]]
            if need.size == 0:
                return view
            addr, missing = view.addr.copy(), view.missing.copy()
            txn = self.snapshot.txn
            for chunk in need.tolist():
                buf = txn.get(chunk_key(self.kind, self.meta.table_id, self.version, self.layer, chunk), db=self.db)
                if buf is None:
                    missing[chunk] = True
                    continue
                if len(buf) != self.chunk_nbytes:
                    raise FailedPrecondition(f"chunk {chunk} of {self.meta.name} v{self.version} layer {self.layer} is "
                                             f"{len(buf)} bytes, expected {self.chunk_nbytes}: the store is damaged")
                self.buffers[chunk] = buf
                addr[chunk] = _address(buf)
            self.view = RowView(addr, missing, self.chunk_nbytes, self.row_nbytes)
            return self.view

    def gather(self, ids: np.ndarray, out: np.ndarray) -> None:
        """out[i] = row ids[i]; ids int64 [N] in range, out [N, head_dim] in the table dtype."""
        if ids.size == 0:
            return
        chunks = ids >> self.chunk_shift if self.chunk_shift else ids // self.chunk_rows
        view = self.view
        if not view.complete:
            touched = np.zeros(view.addr.shape[0], dtype=bool)
            touched[chunks] = True
            view = self.resolve(np.flatnonzero(touched))
        out_bytes = row_bytes(out)  # [N, row bytes], a view of out
        if view.region is not None:
            units_per_row = self.row_nbytes // view.unit
            first = view.chunk_base[chunks]  # [N]; absent chunks give garbage indices (clipped, zeroed below)
            first += ids if units_per_row == 1 else ids * units_per_row
            if native.available() and out_bytes.flags.c_contiguous:
                native.gather_rows(view.region, first, out_bytes)
            elif units_per_row == 1:
                np.take(view.region, first, axis=0, out=out_bytes, mode="clip")
            else:
                index = first[:, None] + np.arange(units_per_row)[None, :]  # [N, k]
                np.take(view.region, index.reshape(-1), axis=0, out=out_bytes.reshape(-1, view.unit), mode="clip")
        else:
            for chunk, pos, offsets in group_by_chunk(ids, self.chunk_rows):
                if not view.missing[chunk]:
                    rows = np.frombuffer(self.buffers[chunk], dtype=np.uint8).reshape(self.chunk_rows, self.row_nbytes)
                    out_bytes[pos] = rows[offsets]
        if view.any_missing:
            out_bytes[view.missing[chunks]] = 0


class Snapshot:
    """A read transaction plus lazily built chunk indexes; shared by concurrent lookups."""

    def __init__(self, store: "TableStore", generation: int):
        self.txn = store.env.begin(write=False, buffers=True)
        self.rows_db = store.rows_db
        self.opt_db = store.opt_db
        self.deltas = store._deltas  # recent rows as of this snapshot (replaced, never mutated, by writers)
        self.generation = generation
        self.lock = threading.Lock()  # serialises LMDB calls on this txn
        self.refs = 0
        self.retired = False
        self.metas: dict[str, TableMeta | None] = {}
        self.indexes: dict[tuple, ChunkIndex] = {}
        self._meta_db = store.meta_db

    def meta(self, name: str) -> TableMeta:
        """Table metadata as of this snapshot (NotFound if absent)."""
        if name not in self.metas:
            with self.lock:
                blob = self.txn.get(b"table:" + name.encode(), db=self._meta_db)
                self.metas[name] = TableMeta.from_json(blob) if blob is not None else None
        meta = self.metas[name]
        if meta is None:
            raise NotFound(f"no table named {name!r}")
        return meta

    def index(self, meta: TableMeta, version: int, layer: int, kind: int = _ROWS) -> ChunkIndex:
        """The chunk index of (table, version, layer) rows (or Adam records), built on first use."""
        key = (meta.table_id, version, layer, kind)
        index = self.indexes.get(key)
        if index is None:
            with self.lock:
                index = self.indexes.setdefault(key, ChunkIndex(self, meta, version, layer, kind))
        return index

    def gather(self, meta: TableMeta, version: int, layer: int, ids: np.ndarray, out: np.ndarray, kind: int = _ROWS) -> None:
        """out[i] = current row (or Adam record) of ids[i]: the chunks with the recent rows laid over them."""
        self.index(meta, version, layer, kind).gather(ids, out)
        delta = self.deltas.get((meta.table_id, version, layer))
        if delta is not None:
            delta.overlay(ids, out, opt=kind == _OPT)

    def close(self) -> None:
        """End the read transaction (only once no lookup uses it)."""
        self.indexes.clear()
        self.txn.abort()


class TableStore:
    """One LMDB environment holding any number of table sets and their versions."""

    def __init__(self, path: str | Path, map_size: int = DEFAULT_MAP_SIZE, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 optimizer: RowAdamConfig | None = None, sync: bool = True, max_delta_rows: int = DEFAULT_MAX_DELTA_ROWS):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.default_chunk_rows = chunk_rows
        self.optimizer = optimizer or RowAdamConfig()
        # readahead off: lookups are random, readahead would pull useless pages into RAM.
        self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=8, subdir=True, sync=sync, metasync=sync,
                             readahead=False, max_readers=512, lock=True)
        self.meta_db = self.env.open_db(b"meta")
        self.rows_db = self.env.open_db(b"rows")
        self.opt_db = self.env.open_db(b"opt")
        self.maps_db = self.env.open_db(b"maps")
        self.requests_db = self.env.open_db(b"requests")  # request id -> version, for idempotent retries
        self.delta_db = self.env.open_db(b"delta")  # pushes not yet folded into the chunks
        self.max_delta_rows = max_delta_rows
        self._write_lock = threading.Lock()
        self._snap_lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._generation = 0
        self.counters = {"lookups": 0, "rows_served": 0, "writes": 0, "rows_written": 0, "gradient_pushes": 0, "rows_updated": 0,
                         "folds": 0}
        self.shard_state = self._load_shard_state()
        self._deltas: dict[tuple[int, int, int], RowDelta] = {}  # (table id, version, layer) -> recent rows
        self._load_deltas()
        self.frozen: dict[str, dict[int, list[tuple[int, int]]]] = {}  # rows being moved to another shard: no writes

    # ------------------------------------------------------------------ shard ownership
    def _load_shard_state(self) -> dict:
        with self.env.begin() as txn:
            blob = txn.get(b"shard_state", db=self.meta_db)
        return json.loads(bytes(blob)) if blob is not None else {"epoch": 0, "owned": {}}

    def set_shard_state(self, epoch: int, owned: dict[str, dict[int, tuple[int, int]]]) -> None:
        """Record (durably) the shard map epoch and the row range this shard owns per table and layer."""
        state = {"epoch": int(epoch), "owned": {t: {str(l): [int(a), int(b)] for l, (a, b) in layers.items()} for t, layers in owned.items()}}
        with self._write_lock, self.env.begin(write=True) as txn:
            txn.put(b"shard_state", json.dumps(state).encode(), db=self.meta_db)
        self.shard_state = state
        self._committed()

    def owned_range(self, name: str, layer: int) -> tuple[int, int] | None:
        """Rows [lo, hi) of a layer this shard owns, or None when the store is not a shard of a pool."""
        layers = self.shard_state["owned"].get(name)
        if layers is None:
            return None
        lo_hi = layers.get(str(layer))
        return (0, 0) if lo_hi is None else tuple(lo_hi)

    def check_owned(self, name: str, layer: int, ids: np.ndarray, write: bool = False) -> None:
        """FAILED_PRECONDITION when ids are not this shard's (stale map); UNAVAILABLE for writes to rows being moved."""
        if ids.size == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        owned = self.owned_range(name, layer)
        if owned is not None and not (owned[0] <= low and high < owned[1]):
            raise FailedPrecondition(f"stale shard map: rows [{low}, {high}] of {name!r} layer {layer} are not on this shard "
                                     f"(it holds [{owned[0]}, {owned[1]}) at epoch {self.shard_state['epoch']}); refresh the map")
        if write:
            self._check_not_moving(name, layer, low, high)

    def _check_not_moving(self, name: str, layer: int, low: int, high: int) -> None:
        for start, stop in self.frozen.get(name, {}).get(layer, []):
            if low < stop and high >= start:
                raise ShardBusy(f"rows [{start}, {stop}) of {name!r} layer {layer} are moving to another shard; retry")

    def freeze(self, name: str, layer: int, start: int, stop: int) -> None:
        """Refuse writes to rows [start, stop) from now on; returns once writes in progress have committed."""
        with self._write_lock:  # a write either committed before this, or will see the freeze
            self.frozen.setdefault(name, {}).setdefault(layer, []).append((start, stop))

    def unfreeze(self, name: str) -> None:
        """Accept writes to every owned row of a table again."""
        with self._write_lock:
            self.frozen.pop(name, None)

    # ------------------------------------------------------------------ snapshots
    def _acquire(self) -> Snapshot:
        with self._snap_lock:
            snap = self._snapshot
            if snap is None or snap.generation != self._generation:
                if snap is not None:
                    snap.retired = True
                    if snap.refs == 0:
                        snap.close()
                snap = self._snapshot = Snapshot(self, self._generation)
            snap.refs += 1
            return snap

    def _release(self, snap: Snapshot) -> None:
        with self._snap_lock:
            snap.refs -= 1
            if snap.retired and snap.refs == 0:
                snap.close()

    def _committed(self) -> None:
        with self._snap_lock:
            self._generation += 1

    def _publish(self, key: tuple[int, int, int], delta: RowDelta | None) -> None:
        """Replace (or with None, forget) a layer's recent rows; snapshots taken from now on see them."""
        deltas = dict(self._deltas)
        if delta is None:
            deltas.pop(key, None)
        else:
            deltas[key] = delta
        with self._snap_lock:
            self._deltas = deltas
            self._generation += 1

    def _empty_delta(self, meta: TableMeta, layer: int, next_seq: int = 0) -> RowDelta:
        return RowDelta.empty(meta.head_dim, meta.dtype, opt_dtype(meta.head_dim), meta.num_chunks(layer), meta.chunk_rows,
                              next_seq)

    def _load_deltas(self) -> None:
        """Rebuild every layer's recent rows from the stored segments, oldest first (after a restart)."""
        metas = {m.table_id: m for m in self.list_tables()}
        deltas: dict[tuple[int, int, int], RowDelta] = {}
        with self.env.begin(buffers=True) as txn:
            for key, value in txn.cursor(db=self.delta_db):
                _, table_id, version, layer, seq = _KEY.unpack(bytes(key))
                meta = metas.get(table_id)
                if meta is None or version not in meta.versions:
                    continue  # left by a drop that did not finish: nothing reads it
                delta = deltas.get((table_id, version, layer)) or self._empty_delta(meta, layer)
                ids, rows, opt = decode_segment(value, meta.head_dim, meta.dtype, opt_dtype(meta.head_dim))
                deltas[(table_id, version, layer)] = dataclasses.replace(delta.merged(ids, rows, opt), next_seq=seq + 1)
        self._deltas = deltas

    # ------------------------------------------------------------------ metadata
    def _read_meta(self, txn, name: str) -> TableMeta:
        blob = txn.get(b"table:" + name.encode(), db=self.meta_db)
        if blob is None:
            raise NotFound(f"no table named {name!r}")
        return TableMeta.from_json(bytes(blob))  # bytes: a buffers=True transaction hands out memoryviews

    def _put_meta(self, txn, meta: TableMeta) -> None:
        txn.put(b"table:" + meta.name.encode(), meta.to_json(), db=self.meta_db)

    def table_info(self, name: str) -> TableMeta:
        """Current metadata of a table."""
        with self.env.begin(buffers=False) as txn:
            return self._read_meta(txn, name)

    def list_tables(self) -> list[TableMeta]:
        """Metadata of every table, by name."""
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.meta_db)
            metas = []
            if cursor.set_range(b"table:"):
                for key, value in cursor:
                    if not key.startswith(b"table:"):
                        break
                    metas.append(TableMeta.from_json(value))
            return metas

    def compression_map(self, name: str) -> np.ndarray | None:
        """The table's compression map (int64 [vocab]) or None."""
        meta = self.table_info(name)
        with self.env.begin() as txn:
            blob = txn.get(struct.pack(">I", meta.table_id), db=self.maps_db)
        return None if blob is None else np.frombuffer(blob, dtype="<i8").copy()

    # ------------------------------------------------------------------ tables and versions
    def create_table(self, name: str, spec: EngramSpec, compression_map: np.ndarray | None = None,
                     init_std: float = 1.0, init_seed: int = 0, chunk_rows: int | None = None) -> TableMeta:
        """Create a table set whose version 1 holds seeded N(0, init_std^2) rows (zeros if init_std == 0); active.

        A shard of a pool materializes only the chunks of the rows it owns (set_shard_state first).
        """
        check_table_name(name)
        chunk_rows = int(chunk_rows or self.default_chunk_rows)
        if chunk_rows < 64 or chunk_rows * spec.row_nbytes < _PAGE:
            raise InvalidArgument(f"chunk_rows {chunk_rows} is too small: a chunk must span at least one {_PAGE}-byte page")
        if compression_map is not None:
            cmap = np.ascontiguousarray(compression_map, dtype="<i8")
            if spec.compressed_vocab_size is None or int(cmap.max()) + 1 != spec.compressed_vocab_size:
                raise InvalidArgument("compression map does not match the spec's compressed_vocab_size")
            if spec.compression_digest and spec.with_compression(cmap, spec.compressed_vocab_size).compression_digest != spec.compression_digest:
                raise InvalidArgument("compression map does not match the spec's compression_digest")
        with self._write_lock:
            with self.env.begin(write=True) as txn:
                if txn.get(b"table:" + name.encode(), db=self.meta_db) is not None:
                    raise AlreadyExists(f"table {name!r} already exists")
                raw = txn.get(b"next_table_id", db=self.meta_db)
                table_id = struct.unpack(">I", raw)[0] if raw else 1
                txn.put(b"next_table_id", struct.pack(">I", table_id + 1), db=self.meta_db)
            meta = TableMeta(name=name, table_id=table_id, spec=spec, chunk_rows=chunk_rows,
                             layer_rows=layer_rows_for_spec(spec), has_compression=compression_map is not None)
            version = meta.add_version("init" if init_std else "empty")
            self._fill_version(meta, version, init_std, init_seed)
            meta.active = version
            with self.env.begin(write=True) as txn:
                self._put_meta(txn, meta)
                if compression_map is not None:
                    txn.put(struct.pack(">I", table_id), cmap.tobytes(), db=self.maps_db)
            self._committed()
            return meta

    def _fill_version(self, meta: TableMeta, version: int, init_std: float, init_seed: int) -> None:
        """Write every chunk of a new version: seeded rows, or zeros when init_std == 0 (bulk, batched commits)."""
        spec = meta.spec
        pending = 0
        txn = self.env.begin(write=True)
        try:
            for layer, num_rows in meta.layer_rows.items():
                owned = self.owned_range(meta.name, layer) or (0, num_rows)
                first_chunk, end_chunk = owned[0] // meta.chunk_rows, -(-owned[1] // meta.chunk_rows)
                for chunk in range(first_chunk, end_chunk):
                    start = chunk * meta.chunk_rows
                    stop = min(num_rows, start + meta.chunk_rows)
                    rows = np.zeros((meta.chunk_rows, spec.head_dim), dtype=meta.dtype)
                    if init_std:
                        rows[: stop - start] = init_rows(num_rows, spec.head_dim, layer, start, stop, init_std, init_seed, spec.dtype)
                    txn.put(chunk_key(_ROWS, meta.table_id, version, layer, chunk), rows.tobytes(), db=self.rows_db)
                    pending += rows.nbytes
                    if pending >= WRITE_BATCH_BYTES:
                        txn.commit()
                        txn, pending = self.env.begin(write=True), 0
            txn.commit()
        except BaseException:
            txn.abort()
            raise

    def create_version(self, name: str, copy_of: int | None = None, init_std: float | None = None,
                       init_seed: int = 0) -> int:
        """New (inactive) version: a copy of another (rows and optimizer state), seeded rows, or zeros."""
        with self._write_lock:
            meta = self.table_info(name)
            if copy_of is not None:
                try:
                    source_version = meta.resolve_version(copy_of)
                except KeyError as e:
                    raise NotFound(str(e.args[0])) from None
                version = meta.add_version(f"copy of {source_version}")
                self._fold_table(meta, versions={source_version})  # the copy takes chunks only
                self._copy_version(meta, source_version, version)
            else:
                version = meta.add_version("init" if init_std else "empty")
                self._fill_version(meta, version, init_std or 0.0, init_seed)
            with self.env.begin(write=True) as txn:
                current = self._read_meta(txn, name)
                current.versions[version] = meta.versions[version]
                current.next_version = meta.next_version
                self._put_meta(txn, current)
            self._committed()
            return version

    def _prefix_items(self, txn, db, kind: int, table_id: int, version: int, layer: int | None = None):
        prefix = struct.pack(">BII", kind, table_id, version) + (b"" if layer is None else struct.pack(">I", layer))
        cursor = txn.cursor(db=db)
        if cursor.set_range(prefix):
            for key, value in cursor:
                if bytes(key[:len(prefix)]) != prefix:  # keys are memoryviews in buffers=True transactions
                    break
                yield key, value

    def _copy_version(self, meta: TableMeta, source: int, target: int) -> None:
        for kind, db in ((_ROWS, self.rows_db), (_OPT, self.opt_db)):
            with self.env.begin() as read:
                batch, pending = [], 0
                for key, value in self._prefix_items(read, db, kind, meta.table_id, source):
                    _, _, _, layer, chunk = _KEY.unpack(key)
                    batch.append((chunk_key(kind, meta.table_id, target, layer, chunk), bytes(value)))
                    pending += len(value)
                    if pending >= WRITE_BATCH_BYTES:
                        self._put_batch(db, batch)
                        batch, pending = [], 0
                self._put_batch(db, batch)

    def _put_batch(self, db, items) -> None:
        if items:
            with self.env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value, db=db)

    def _delete_version_chunks(self, table_id: int, version: int, batch: int = 1024) -> None:
        """Delete a version's chunks and pushed segments, a batch of keys per transaction."""
        for kind, db in ((_ROWS, self.rows_db), (_OPT, self.opt_db), (_DELTA, self.delta_db)):
            while True:
                with self.env.begin(write=True) as txn:
                    keys = []
                    for key, _ in self._prefix_items(txn, db, kind, table_id, version):
                        keys.append(bytes(key))
                        if len(keys) >= batch:
                            break
                    for key in keys:
                        txn.delete(key, db=db)
                if len(keys) < batch:
                    break

    def swap(self, name: str, version: int) -> tuple[int, int]:
        """Make `version` active; returns (active, previous). Readers switch at their next snapshot."""
        with self._write_lock:
            with self.env.begin(write=True) as txn:
                meta = self._read_meta(txn, name)
                if version not in meta.versions:
                    raise NotFound(f"table {name!r} has no version {version}; versions are {sorted(meta.versions)}")
                previous = meta.active
                if version != previous:
                    meta.history.append(previous)
                    meta.active = version
                    self._put_meta(txn, meta)
            self._committed()
            return version, previous

    def rollback(self, name: str) -> tuple[int, int]:
        """Re-activate the version that was active before the last swap; returns (active, previous)."""
        with self._write_lock:
            with self.env.begin(write=True) as txn:
                meta = self._read_meta(txn, name)
                history = [v for v in meta.history if v in meta.versions]
                if not history:
                    raise FailedPrecondition(f"table {name!r} has no earlier active version to roll back to")
                previous = meta.active
                meta.active = history.pop()
                meta.history = history
                self._put_meta(txn, meta)
            self._committed()
            return meta.active, previous

    def drop_version(self, name: str, version: int) -> None:
        """Delete an inactive version's rows and optimizer state."""
        with self._write_lock:
            with self.env.begin(write=True) as txn:
                meta = self._read_meta(txn, name)
                if version not in meta.versions:
                    raise NotFound(f"table {name!r} has no version {version}; versions are {sorted(meta.versions)}")
                if version == meta.active:
                    raise FailedPrecondition(f"version {version} of {name!r} is active; swap to another version first")
                del meta.versions[version]
                meta.history = [v for v in meta.history if v != version]
                self._put_meta(txn, meta)
            self._committed()
            self._forget_deltas(meta.table_id, {version})
            self._delete_version_chunks(meta.table_id, version)

    def drop_table(self, name: str) -> None:
        """Delete a table set with all its versions."""
        with self._write_lock:
            with self.env.begin(write=True) as txn:
                meta = self._read_meta(txn, name)
                txn.delete(b"table:" + name.encode(), db=self.meta_db)
                txn.delete(struct.pack(">I", meta.table_id), db=self.maps_db)
            self._committed()
            self._forget_deltas(meta.table_id, set(meta.versions))
            for version in meta.versions:
                self._delete_version_chunks(meta.table_id, version)

    def _forget_deltas(self, table_id: int, versions: set[int]) -> None:
        for key in [k for k in self._deltas if k[0] == table_id and k[1] in versions]:
            self._publish(key, None)

    # ------------------------------------------------------------------ reads
    def _check(self, meta: TableMeta, layer: int, fingerprint: str | None) -> int:
        if fingerprint is not None and fingerprint != meta.spec.fingerprint():
            raise FailedPrecondition(f"spec fingerprint {fingerprint!r} does not match table {meta.name!r} "
                                     f"({meta.spec.fingerprint()}): client and table disagree on hashing or layout")
        if layer not in meta.layer_rows:
            raise InvalidArgument(f"table {meta.name!r} has no layer {layer}; its layers are {sorted(meta.layer_rows)}")
        return meta.layer_rows[layer]

    def lookup(self, name: str, layer: int, row_ids, version: int = 0, fingerprint: str | None = None,
               out=None, max_bytes: int | None = None) -> tuple[np.ndarray, int]:
        """Rows [N, head_dim] (table dtype) for int64 ids [N], and the version they came from.

        out: an array to fill, or a callable (num_rows, head_dim, dtype, version) -> array
        (the server gathers straight into its reply message). max_bytes: refuse
        (RESOURCE_EXHAUSTED) a response larger than this.
        """
        snap = self._acquire()
        try:
            meta = snap.meta(name)
            num_rows = self._check(meta, layer, fingerprint)
            ids = check_row_ids(row_ids, num_rows, layer)
            if max_bytes is not None and ids.size * meta.row_nbytes > max_bytes:
                raise ResourceExhausted(
                    f"lookup response of {ids.size} rows is {ids.size * meta.row_nbytes / 2**20:.1f} MiB, over the "
                    f"{max_bytes / 2**20:.1f} MiB limit: split it into batches of at most {max_bytes // meta.row_nbytes} rows")
            try:
                v = meta.resolve_version(version)
            except KeyError as e:
                raise NotFound(str(e.args[0])) from None
            if callable(out):
                out = out(ids.size, meta.head_dim, meta.dtype, v)
            if out is None or out.shape != (ids.size, meta.head_dim) or out.dtype != meta.dtype:
                out = np.empty((ids.size, meta.head_dim), dtype=meta.dtype)
            if out.flags.c_contiguous:
                snap.gather(meta, v, layer, ids, out)
            else:  # a strided caller buffer: gather into a packed one, then copy
                packed = np.empty_like(out, order="C")
                snap.gather(meta, v, layer, ids, packed)
                out[...] = packed
            self.counters["lookups"] += 1
            self.counters["rows_served"] += ids.size
            return out, v
        finally:
            self._release(snap)

    def read_range(self, name: str, layer: int, start: int, stop: int, version: int = 0) -> tuple[np.ndarray, int]:
        """Rows [start, stop) of a layer (export)."""
        meta = self.table_info(name)
        num_rows = self._check(meta, layer, None)
        if not 0 <= start <= stop <= num_rows:
            raise InvalidArgument(f"row range [{start}, {stop}) is outside layer {layer}'s [0, {num_rows})")
        return self.lookup(name, layer, np.arange(start, stop, dtype=np.int64), version)

    def optimizer_state(self, name: str, layer: int, row_ids, version: int = 0) -> np.ndarray:
        """Adam records (m, v, step) of rows (for tests and export)."""
        meta = self.table_info(name)
        ids = check_row_ids(row_ids, self._check(meta, layer, None), layer)
        v = meta.resolve_version(version)
        out = np.zeros(ids.size, dtype=opt_dtype(meta.head_dim))
        snap = self._acquire()
        try:
            snap.gather(snap.meta(name), v, layer, ids, out, kind=_OPT)
        finally:
            self._release(snap)
        return out

    # ------------------------------------------------------------------ writes
    def _write_target(self, txn, name: str, layer: int, version: int, fingerprint: str | None) -> tuple[TableMeta, int, int]:
        meta = self._read_meta(txn, name)
        num_rows = self._check(meta, layer, fingerprint)
        try:
            v = meta.resolve_version(version)
        except KeyError as e:
            raise NotFound(str(e.args[0])) from None
        return meta, num_rows, v

    @staticmethod
    def _read_chunk(txn, db, key: bytes, dtype, shape: tuple) -> np.ndarray:
        """A writable copy of a chunk, or zeros when the chunk does not exist yet (one copy in a buffers=True txn)."""
        current = txn.get(key, db=db)
        if current is None:
            return np.zeros(shape, dtype=dtype)
        return np.frombuffer(current, dtype=dtype).reshape(shape).copy()

    def _seen_request(self, txn, request_id: str | None) -> int | None:
        """Version recorded for an already-applied request id, else None."""
        if not request_id:
            return None
        done = txn.get(b"req:" + request_id.encode(), db=self.requests_db)
        return struct.unpack(">Qd", done)[0] if done is not None else None

    def _record_request(self, txn, request_id: str | None, version: int) -> None:
        if request_id:
            txn.put(b"req:" + request_id.encode(), struct.pack(">Qd", version, time.time()), db=self.requests_db)

    def prune_requests(self, older_than_s: float = 3600.0) -> int:
        """Forget request ids recorded more than older_than_s ago; returns how many."""
        cutoff, dropped = time.time() - older_than_s, 0
        with self._write_lock, self.env.begin(write=True) as txn:
            cursor = txn.cursor(db=self.requests_db)
            for key, value in list(cursor):
                if struct.unpack(">Qd", value)[1] < cutoff:
                    txn.delete(key, db=self.requests_db)
                    dropped += 1
        return dropped

    def write_rows(self, name: str, layer: int, row_ids, rows, version: int = 0, fingerprint: str | None = None,
                   request_id: str | None = None) -> int:
        """Set rows of a version in one committed transaction; returns the version written."""
        with self._write_lock:
            meta = self.table_info(name)
            if layer in meta.layer_rows and int(version or meta.active) in meta.versions:
                self._fold(meta, int(version or meta.active), layer)  # written rows must not be hidden by older pushes
            with self.env.begin(write=True) as txn:
                meta, num_rows, v = self._write_target(txn, name, layer, version, fingerprint)
                done = self._seen_request(txn, request_id)
                if done is not None:
                    return done
                ids = check_row_ids(row_ids, num_rows, layer)
                self.check_owned(name, layer, ids, write=True)
                values = np.asarray(rows)
                if values.shape != (ids.size, meta.head_dim):
                    raise InvalidArgument(f"rows must be [{ids.size}, {meta.head_dim}] for {ids.size} ids, got {list(values.shape)}")
                if values.dtype != meta.dtype:
                    raise InvalidArgument(f"rows must be {meta.dtype.name} (the table dtype), got {values.dtype.name}")
                if np.unique(ids).size != ids.size:
                    raise InvalidArgument("row ids of a write must be unique")
                for chunk, pos, offsets in group_by_chunk(ids, meta.chunk_rows):
                    key = chunk_key(_ROWS, meta.table_id, v, layer, chunk)
                    block = self._read_chunk(txn, self.rows_db, key, meta.dtype, (meta.chunk_rows, meta.head_dim))
                    block[offsets] = values[pos]
                    txn.put(key, block.tobytes(), db=self.rows_db)
                self._record_request(txn, request_id, v)
            self._committed()
            self.counters["writes"] += 1
            self.counters["rows_written"] += ids.size
            return v

    def apply_gradients(self, name: str, layer: int, row_ids, grads, lr: float, version: int = 0,
                        fingerprint: str | None = None, request_id: str | None = None) -> int:
        """Row-wise Adam on unique rows in one committed transaction; returns the version updated.

        The new rows and Adam records are appended as one segment (a write the size of the
        push, not of the chunks it touches) and merged into the layer's recent rows; past
        max_delta_rows those are folded into the chunks.
        """
        if not np.isfinite(lr) or lr < 0:
            raise InvalidArgument(f"learning rate must be a finite number >= 0, got {lr}")
        with self._write_lock:
            snap = self._acquire()  # the latest commit: no other writer runs while we hold the lock
            try:
                with self.env.begin(write=True) as txn:
                    meta, num_rows, v = self._write_target(txn, name, layer, version, fingerprint)
                    ids = check_row_ids(row_ids, num_rows, layer)
                    self.check_owned(name, layer, ids, write=True)  # under the lock: ownership cannot change meanwhile
                    g = check_gradients(ids, grads, meta.head_dim)
                    done = self._seen_request(txn, request_id)
                    if done is not None:
                        return done
                    if ids.size == 0:
                        self._record_request(txn, request_id, v)
                        return v
                    rows = np.empty((ids.size, meta.head_dim), dtype=meta.dtype)  # [N, head_dim]
                    state = np.empty(ids.size, dtype=opt_dtype(meta.head_dim))  # [N]
                    snap.gather(meta, v, layer, ids, rows)
                    snap.gather(meta, v, layer, ids, state, kind=_OPT)
                    new_rows, new_m, new_v, new_steps = row_adam_update(rows, state["m"], state["v"], state["step"], g, lr,
                                                                        self.optimizer)
                    state["m"], state["v"], state["step"] = new_m, new_v, new_steps
                    key = (meta.table_id, v, layer)
                    delta = self._deltas.get(key) or self._empty_delta(meta, layer)
                    txn.put(chunk_key(_DELTA, meta.table_id, v, layer, delta.next_seq), encode_segment(ids, new_rows, state),
                            db=self.delta_db)
                    self._record_request(txn, request_id, v)
                    merged = delta.merged(ids, new_rows, state)  # before the commit: a failure here stores nothing
            finally:
                self._release(snap)
            self._publish(key, merged)
            if merged.size > self.max_delta_rows or merged.segment_rows > SEGMENT_ROWS_PER_DELTA_ROW * self.max_delta_rows:
                try:
                    self._fold(meta, v, layer)
                except Exception:  # noqa: BLE001 - the push is committed; the next push folds again
                    log.exception("folding the recent rows of %s v%d layer %d failed", name, v, layer)
            self.counters["gradient_pushes"] += 1
            self.counters["rows_updated"] += ids.size
            return v

    def _fold(self, meta: TableMeta, version: int, layer: int) -> int:
        """Write a layer's recent rows into its chunks and delete their segments (write lock held); returns rows folded.

        Commits every WRITE_BATCH_BYTES of chunks; the segments go in the last transaction.
        Until then the chunks already rewritten hold the same values as the delta, so a
        reader (or a restart after a crash) sees the same rows either way.
        """
        key = (meta.table_id, version, layer)
        delta = self._deltas.get(key)
        if delta is None:
            return 0
        record = opt_dtype(meta.head_dim)
        txn, pending = self.env.begin(write=True, buffers=True), 0
        try:
            for chunk, pos, offsets in group_by_chunk(delta.ids, meta.chunk_rows):
                row_key = chunk_key(_ROWS, meta.table_id, version, layer, chunk)
                opt_key = chunk_key(_OPT, meta.table_id, version, layer, chunk)
                block = self._read_chunk(txn, self.rows_db, row_key, meta.dtype, (meta.chunk_rows, meta.head_dim))
                state = self._read_chunk(txn, self.opt_db, opt_key, record, (meta.chunk_rows,))
                row_bytes(block)[offsets] = row_bytes(delta.rows)[pos]
                row_bytes(state)[offsets] = row_bytes(delta.opt)[pos]
                txn.put(row_key, memoryview(block).cast("B"), db=self.rows_db)  # no intermediate bytes copy
                txn.put(opt_key, memoryview(state.view(np.uint8)).cast("B"), db=self.opt_db)
                pending += block.nbytes + state.nbytes
                if pending >= WRITE_BATCH_BYTES:
                    txn.commit()
                    txn, pending = self.env.begin(write=True, buffers=True), 0
            for seq_key in [bytes(k) for k, _ in self._prefix_items(txn, self.delta_db, _DELTA, meta.table_id, version, layer)]:
                txn.delete(seq_key, db=self.delta_db)
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        self._publish(key, None)
        self.counters["folds"] += 1
        return delta.size

    def _fold_table(self, meta: TableMeta, versions=None, layers=None) -> None:
        """Fold the recent rows of some (default: all) versions and layers of a table (write lock held)."""
        for table_id, version, layer in list(self._deltas):
            if table_id == meta.table_id and (versions is None or version in versions) and (layers is None or layer in layers):
                self._fold(meta, version, layer)

    # ------------------------------------------------------------------ moving rows between shards
    def blueprint(self, name: str) -> dict:
        """What another shard needs to hold this table: spec, compression map, chunking, versions, active."""
        meta = self.table_info(name)
        cmap = self.compression_map(name)
        return {"spec_json": meta.spec.to_json(), "compression_map": None if cmap is None else cmap.tobytes(),
                "chunk_rows": meta.chunk_rows, "versions": sorted(meta.versions), "active": meta.active}

    def adopt_table(self, name: str, blueprint: dict) -> None:
        """Create a table with another shard's spec and version numbers but no rows (rows arrive by import_chunks)."""
        spec = EngramSpec.from_json(blueprint["spec_json"])
        cmap = None if blueprint["compression_map"] is None else np.frombuffer(blueprint["compression_map"], dtype="<i8")
        if name not in {m.name for m in self.list_tables()}:
            self.create_table(name, spec, cmap, init_std=0.0, chunk_rows=blueprint["chunk_rows"])
        wanted = set(blueprint["versions"])
        while max(self.table_info(name).versions) < max(wanted):
            self.create_version(name, init_std=0.0)
        if self.table_info(name).active != blueprint["active"]:
            self.swap(name, blueprint["active"])
        for version in sorted(set(self.table_info(name).versions) - wanted):
            self.drop_version(name, version)

    def export_chunks(self, name: str, layer: int, start_row: int, stop_row: int) -> list[tuple[bytes, bytes]]:
        """Every version's chunks (rows and Adam state) covering rows [start, stop): [(key suffix, value)]."""
        meta = self.table_info(name)
        with self._write_lock:
            self._fold_table(meta, layers={layer})  # recent rows into the chunks that travel
        first, end = start_row // meta.chunk_rows, -(-stop_row // meta.chunk_rows)
        out = []
        with self.env.begin() as txn:
            for version in meta.versions:
                for kind, db in ((_ROWS, self.rows_db), (_OPT, self.opt_db)):
                    for chunk in range(first, end):
                        value = txn.get(chunk_key(kind, meta.table_id, version, layer, chunk), db=db)
                        if value is not None:
                            out.append((struct.pack(">BIII", kind, version, layer, chunk), bytes(value)))
        return out

    def import_chunks(self, name: str, chunks: list[tuple[bytes, bytes]]) -> int:
        """Store chunks exported by another shard for this table (same version numbers); returns how many."""
        meta = self.table_info(name)
        with self._write_lock, self.env.begin(write=True) as txn:
            for suffix, value in chunks:
                kind, version, layer, chunk = struct.unpack(">BIII", suffix)
                if version not in meta.versions:
                    raise FailedPrecondition(f"version {version} of {name!r} does not exist on this shard")
                txn.put(chunk_key(kind, meta.table_id, version, layer, chunk), value, db=self.rows_db if kind == _ROWS else self.opt_db)
        self._committed()
        return len(chunks)

    def drop_unowned_chunks(self, name: str) -> int:
        """Delete chunks of rows this shard no longer owns (after a move); returns how many."""
        meta = self.table_info(name)
        dropped = 0
        with self._write_lock:  # one hold: no push (ownership is checked under this lock) lands between fold and drop
            self._fold_table(meta)  # a later fold must not bring dropped chunks back
            for layer, num_rows in meta.layer_rows.items():
                owned = self.owned_range(name, layer)
                if owned is None:
                    continue
                keep = range(owned[0] // meta.chunk_rows, -(-owned[1] // meta.chunk_rows))
                with self.env.begin(write=True) as txn:
                    for version in meta.versions:
                        for kind, db in ((_ROWS, self.rows_db), (_OPT, self.opt_db)):
                            for chunk in range(meta.num_chunks(layer)):
                                if chunk not in keep and txn.delete(chunk_key(kind, meta.table_id, version, layer, chunk), db=db):
                                    dropped += 1
            self._committed()
        return dropped

    # ------------------------------------------------------------------ housekeeping
    def warm(self, name: str, version: int = 0) -> int:
        """Touch every page of a version (prefault the map); returns bytes read."""
        meta = self.table_info(name)
        v = meta.resolve_version(version)
        total = 0
        with self.env.begin(buffers=True) as txn:
            for _, value in self._prefix_items(txn, self.rows_db, _ROWS, meta.table_id, v):
                np.frombuffer(value, dtype=np.uint8)[::_PAGE].sum()  # reads one byte per page: faults it in
                total += len(value)
        return total

    def stats(self) -> dict[str, float]:
        """Counters plus environment size figures."""
        info, stat = self.env.info(), self.env.stat()
        out = {k: float(v) for k, v in self.counters.items()}
        out["delta_rows"] = float(sum(d.size for d in self._deltas.values()))
        out.update(map_size=float(info["map_size"]), last_page=float(info["last_pgno"]),
                   used_bytes=float((info["last_pgno"] + 1) * stat["psize"]), readers=float(info["num_readers"]))
        return out

    def close(self) -> None:
        """Close the environment (after ending the shared snapshot)."""
        with self._snap_lock:
            if self._snapshot is not None:
                self._snapshot.retired = True
                if self._snapshot.refs == 0:
                    self._snapshot.close()
                self._snapshot = None
        self.env.close()
