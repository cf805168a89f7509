"""Sorted runs: pushed rows on disk, between the recent rows in RAM and the chunks.

A run is an immutable, sorted set of (row id, row, optimizer record) of one (table,
version, layer), in the `runs` database. A flushed run stores its ids as one value and
its rows and records in parts of PART_ROWS, written sequentially. A merged run stores
only ids and where each row is (its place in the parts of the runs it was merged from,
which stay where they are until the fold): merging two runs writes 16 bytes a row, not
the row and its optimizer record, so the log factor of merging costs next to nothing.

A layer's runs are listed, newest first, in its run directory (the `meta` database); a
run exists for readers once its directory entry commits, and a reader's snapshot keeps
the runs it started with, so merging runs or folding them into the chunks never
disturbs a lookup (compaction.py). Lookups lay the runs over the chunks, oldest first,
then the recent rows over them.
"""

from __future__ import annotations

import ctypes
import json
import struct
from dataclasses import dataclass

import numpy as np

from memory_service import native
from memory_service.store.layout import PAGE_BYTES, Databases
from memory_service.store.row_view import RowView

Key = tuple[int, int, int]  # (table id, version, layer)
PART_ROWS = 1 << 12  # rows (and records) per stored part of a run: values small enough for LMDB to reuse freed space
IDS, ROWS, RECORDS, WHERE = 0, 1, 2, 3  # the arrays of a run (WHERE: a merged run's row places)
_KEY = struct.Struct(">IIIIBH")  # table, version, layer, run id, array, part
_DIRECTORY = struct.Struct(">III")


def run_key(key: Key, run: int, array: int, part: int = 0) -> bytes:
    """Key of one stored array part of a run."""
    return _KEY.pack(*key, run, array, part)


def directory_key(key: Key) -> bytes:
    """Key of a layer's run directory in the meta database."""
    return b"runs:" + _DIRECTORY.pack(*key)


@dataclass(frozen=True)
class RunInfo:
    """One run of a layer's directory."""

    run: int
    count: int  # distinct rows held
    stored: int = 0  # rows in the parts it reads from, superseded ones included (0: count)
    sources: tuple[tuple[int, int], ...] = ()  # a merged run's (run id, parts) holding its rows, in order

    @property
    def stored_rows(self) -> int:
        """Rows its parts hold (what its disk space and a fold's reading follow)."""
        return self.stored or self.count

    @property
    def part_sources(self) -> tuple[tuple[int, int], ...]:
        """(run id, parts) whose parts hold this run's rows and records, in order."""
        return self.sources or ((self.run, -(-self.count // PART_ROWS)),)


def read_directory(txn, dbs: Databases, key: Key) -> tuple[list[RunInfo], int]:
    """(runs newest first, the next run id) of a layer."""
    blob = txn.get(directory_key(key), db=dbs.meta)
    if blob is None:
        return [], 1
    data = json.loads(bytes(blob))
    runs = [RunInfo(e[0], e[1], *(e[2], tuple(tuple(s) for s in e[3])) if len(e) > 2 else ()) for e in data["runs"]]
    return runs, data["next"]


def write_directory(txn, dbs: Databases, key: Key, runs: list[RunInfo], next_run: int) -> None:
    """Replace a layer's run directory (inside a write transaction)."""
    entries = [[r.run, r.count] if not r.sources else [r.run, r.count, r.stored, [list(s) for s in r.sources]]
               for r in runs]
    txn.put(directory_key(key), json.dumps({"runs": entries, "next": next_run}).encode(), db=dbs.meta)


def _view(buf, dtype, shape) -> np.ndarray:
    """A read-only array over a stored value, by its address: valid as long as the value exists in the reader's
    snapshot, not only while the transaction that found it is open. That holds for values of a page or more,
    which LMDB keeps in pages of their own that never move (smaller ones sit in B-tree pages that do): the
    writer pads every run value to a page."""
    assert len(buf) >= PAGE_BYTES, "run values are padded to a page"
    address = np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0]
    count = int(np.prod(shape))
    array = np.frombuffer((ctypes.c_uint8 * len(buf)).from_address(address), dtype=dtype, count=count).reshape(shape)
    array.flags.writeable = False
    return array


def _padded(data: np.ndarray) -> np.ndarray:
    """Bytes of an array, zero-padded to at least a page (so LMDB stores them in pages of their own)."""
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return flat if flat.size >= PAGE_BYTES else np.concatenate([flat, np.zeros(PAGE_BYTES - flat.size, np.uint8)])


class RunView:
    """A run's arrays as views of the memory map: its ids, and its rows and records part by part."""

    def __init__(self, txn, dbs: Databases, key: Key, info: RunInfo, row_nbytes: int, record_nbytes: int):
        self.info = info
        self.ids = _view(txn.get(run_key(key, info.run, IDS), db=dbs.runs), np.int64, (info.count,))  # [n], ascending
        # [n]: row i's place in the parts (part * PART_ROWS + offset); a flushed run's rows are in order (None)
        self.where = (_view(txn.get(run_key(key, info.run, WHERE), db=dbs.runs), np.int64, (info.count,))
                      if info.sources else None)
        self.num_parts = sum(n for _, n in info.part_sources)
        self.parts, self.views = {}, {}
        for array, nbytes in ((ROWS, row_nbytes), (RECORDS, record_nbytes)):
            bufs = [txn.get(run_key(key, run, array, p), db=dbs.runs) for run, n in info.part_sources for p in range(n)]
            self.parts[array] = [_view(buf, np.uint8, (len(buf) // nbytes, nbytes)) for buf in bufs]  # the last may be padded
            addresses = np.array([p.__array_interface__["data"][0] for p in self.parts[array]], dtype=np.int64)
            self.views[array] = RowView(addresses, np.zeros(len(bufs), dtype=bool), PART_ROWS * nbytes, nbytes)

    def places(self, index: np.ndarray) -> np.ndarray:
        """Where rows index (positions in ids) are in the parts: part * PART_ROWS + offset."""
        return index if self.where is None else self.where[index]

    def _rows_at(self, array: int, places: np.ndarray) -> np.ndarray:
        """Copies of the rows (or records) at places in the parts: uint8 [n, bytes]."""
        view = self.views[array]
        nbytes = self.parts[array][0].shape[1]
        got = np.empty((places.size, nbytes), dtype=np.uint8)
        if not places.size:
            return got
        first = view.chunk_base[places // PART_ROWS] + places * (nbytes // view.unit)  # [H]: first unit of each row
        if native.available():
            native.gather_rows(view.region, first, got)
        else:
            units = (first[:, None] + np.arange(nbytes // view.unit)[None, :]).reshape(-1)
            got.reshape(-1, view.unit)[:] = view.region[units]
        return got

    def overlay(self, ids: np.ndarray, out: np.ndarray, array: int) -> None:
        """out[i] = this run's row (array ROWS) or record (RECORDS) of ids[i], where it holds one; out uint8 [N, bytes]."""
        positions, index = find(self.ids, ids)
        if positions.size:
            out[positions] = self._rows_at(array, self.places(index))

    def between(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, rows, records) copies of the rows with lo <= id < hi (for folds)."""
        a, b = np.searchsorted(self.ids, [lo, hi])
        ids = np.array(self.ids[a:b])
        if self.where is not None:
            places = np.asarray(self.where[a:b])
            return ids, self._rows_at(ROWS, places), self._rows_at(RECORDS, places)
        out = []
        for array in (ROWS, RECORDS):
            pieces = []
            for p in range(a // PART_ROWS, -(-b // PART_ROWS)):
                start, stop = max(a, p * PART_ROWS), min(b, (p + 1) * PART_ROWS)
                pieces.append(self.parts[array][p][start - p * PART_ROWS:stop - p * PART_ROWS])
            nbytes = self.parts[array][0].shape[1] if self.parts[array] else 0
            out.append(np.concatenate(pieces) if pieces else np.empty((0, nbytes), np.uint8))
        return ids, out[0], out[1]


def find(run_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in ids, indexes into run_ids) of the ids a sorted run holds; ids int64 [N] in any order."""
    if not run_ids.size or not ids.size:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if native.available():
        return native.find_sorted(run_ids, ids)
    at = np.minimum(np.searchsorted(run_ids, ids), run_ids.size - 1)
    hit = np.flatnonzero(run_ids[at] == ids)
    return hit, at[hit]


def merge_places(older: RunView, newer: RunView) -> tuple[np.ndarray, np.ndarray]:
    """(ids, places) of the run two runs merge into, over the older's parts then the newer's; the newer row wins."""
    shift = older.num_parts * PART_ROWS  # the newer run's parts come after the older's
    old_places = older.places(np.arange(older.info.count, dtype=np.int64))
    new_places = newer.places(np.arange(newer.info.count, dtype=np.int64)) + shift
    old = (np.ascontiguousarray(older.ids), old_places.reshape(-1, 1), np.empty((older.info.count, 0), np.uint8))
    new = (np.ascontiguousarray(newer.ids), new_places.reshape(-1, 1), np.empty((newer.info.count, 0), np.uint8))
    ids, places, _ = merge_sorted(old, new)
    return ids, np.ascontiguousarray(places.reshape(-1))


def write_merged(txn, dbs: Databases, key: Key, run: int, ids: np.ndarray, places: np.ndarray, older: RunInfo,
                 newer: RunInfo) -> RunInfo:
    """Store a merged run's ids and places (its rows stay in the parts of the runs it came from); its directory entry."""
    txn.put(run_key(key, run, IDS), _padded(ids.astype("<i8")).data, db=dbs.runs)
    txn.put(run_key(key, run, WHERE), _padded(places.astype("<i8")).data, db=dbs.runs)
    return RunInfo(run, int(ids.size), older.stored_rows + newer.stored_rows, older.part_sources + newer.part_sources)


def merge_sorted(old: tuple[np.ndarray, np.ndarray, np.ndarray],
                 new: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge two sorted (ids, rows bytes, record bytes) sets; where an id is in both, the new one wins."""
    if not old[0].size:
        return new
    if not new[0].size:
        return old
    if native.available():
        return native.merge_rows(tuple(np.ascontiguousarray(x) for x in old), tuple(np.ascontiguousarray(x) for x in new))
    ids = np.concatenate([old[0], new[0]])
    order = np.argsort(ids, kind="stable")  # old before new among equal ids
    ids = ids[order]
    last = np.append(ids[1:] != ids[:-1], True)  # keep the last of each id: the new one
    keep = order[last]
    return ids[last], np.concatenate([old[1], new[1]])[keep], np.concatenate([old[2], new[2]])[keep]


class RunWriter:
    """Writes one new run part by part, each part in a transaction of its own; finish() lists it."""

    def __init__(self, dbs: Databases, key: Key, run: int, row_nbytes: int, record_nbytes: int):
        self.dbs, self.key, self.run = dbs, key, run
        self.nbytes = {ROWS: row_nbytes, RECORDS: record_nbytes}
        self._ids: list[np.ndarray] = []
        self._pending = {ROWS: [], RECORDS: []}
        self._buffered = 0
        self._parts = 0
        self.count = 0

    def append(self, ids: np.ndarray, rows: np.ndarray, records: np.ndarray) -> None:
        """Add sorted rows (ids ascending and above every id appended before); rows and records as bytes [n, ...]."""
        if not ids.size:
            return
        self._ids.append(np.ascontiguousarray(ids, dtype=np.int64))
        self._pending[ROWS].append(rows)
        self._pending[RECORDS].append(records)
        self._buffered += ids.size
        self.count += ids.size
        while self._buffered >= PART_ROWS:
            self._write_part(PART_ROWS)

    def _write_part(self, rows_in_part: int) -> None:
        with self.dbs.env.begin(write=True) as txn:
            for array in (ROWS, RECORDS):
                whole = np.concatenate(self._pending[array]) if len(self._pending[array]) > 1 else self._pending[array][0]
                txn.put(run_key(self.key, self.run, array, self._parts), _padded(whole[:rows_in_part]).data, db=self.dbs.runs)
                self._pending[array] = [whole[rows_in_part:]] if whole.shape[0] > rows_in_part else []
        self._buffered -= rows_in_part
        self._parts += 1

    def finish(self, txn) -> RunInfo:
        """Write the last part and the ids inside `txn` (which also lists the run); returns its directory entry."""
        for array in (ROWS, RECORDS):
            if self._pending[array]:
                whole = _padded(np.concatenate(self._pending[array]))
                txn.put(run_key(self.key, self.run, array, self._parts), whole.data, db=self.dbs.runs)
        ids = np.concatenate(self._ids) if self._ids else np.empty(0, np.int64)
        txn.put(run_key(self.key, self.run, IDS), _padded(ids.astype("<i8")).data, db=self.dbs.runs)
        return RunInfo(self.run, self.count)


def delete_run(txn, dbs: Databases, key: Key, info: RunInfo, parts: bool = True) -> None:
    """Delete a run's ids (and places), and with parts=True the parts holding its rows (inside a write transaction)."""
    txn.delete(run_key(key, info.run, IDS), db=dbs.runs)
    txn.delete(run_key(key, info.run, WHERE), db=dbs.runs)
    if parts:
        for run, count in info.part_sources:
            for array in (ROWS, RECORDS):
                for part in range(count):
                    txn.delete(run_key(key, run, array, part), db=dbs.runs)


def delete_runs_of(txn, dbs: Databases, table_id: int, version: int | None = None) -> None:
    """Delete every stored run array of a table (or of one version) and their directories."""
    prefix = struct.pack(">I", table_id) + (b"" if version is None else struct.pack(">I", version))
    for db, start in ((dbs.runs, prefix), (dbs.meta, b"runs:" + prefix)):
        cursor = txn.cursor(db=db)
        doomed = []
        if cursor.set_range(start):
            for k in cursor.iternext(values=False):
                if not bytes(k).startswith(start):
                    break
                doomed.append(bytes(k))
        for k in doomed:
            txn.delete(k, db=db)


def remove_unlisted(txn, dbs: Databases) -> int:
    """Delete stored run arrays no directory refers to (a flush or merge cut short by a crash); returns how many."""
    live: dict[Key, set[int]] = {}
    doomed = []
    cursor = txn.cursor(db=dbs.runs)
    for k in cursor.iternext(values=False):
        table, version, layer, run, _, _ = _KEY.unpack(bytes(k))
        key = (table, version, layer)
        if key not in live:
            runs, _ = read_directory(txn, dbs, key)
            live[key] = {r.run for r in runs} | {source for r in runs for source, _ in r.sources}
        if run not in live[key]:
            doomed.append(bytes(k))
    for k in doomed:
        txn.delete(k, db=dbs.runs)
    return len(doomed)
