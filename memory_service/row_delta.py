"""Recently updated rows of one (table, version, layer), kept beside the chunks.

A gradient push used to rewrite every chunk it touched (4096 rows and their Adam
records per chunk), so a push of a few thousand scattered rows wrote the whole layer;
on a billion-row table each row of a push is in a chunk of its own and the write grows
4096-fold. Now a push appends one segment (its ids, new rows and new Adam records) to
the store and merges it into an in-memory RowDelta; lookups overlay the delta on the
rows gathered from the chunks. When the delta grows past a limit, the store folds it
into the chunks (each touched chunk rewritten once for many pushes) and deletes the
segments. A RowDelta is immutable: a write builds a new one, and a reader keeps the
one its snapshot started with.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from memory_service import native

_COUNT = struct.Struct("<Q")


@dataclass(frozen=True)
class RowDelta:
    """Sorted unique row ids with their current rows and Adam records, and which chunks hold any of them."""

    ids: np.ndarray  # int64 [D], ascending
    rows: np.ndarray  # [D, head_dim], table dtype
    opt: np.ndarray  # [D] optimizer records
    chunk_mask: np.ndarray  # bool [num_chunks]: chunks with at least one row here
    chunk_rows: int
    next_seq: int = 0  # sequence number of the next segment written for this layer
    segment_rows: int = 0  # rows in this layer's stored segments, repeats included (what a fold reclaims)
    lineage: int = 0  # deltas merged one from another share it; a fold starts a new one

    @classmethod
    def empty(cls, head_dim: int, dtype, record: np.dtype, num_chunks: int, chunk_rows: int, next_seq: int = 0,
              lineage: int = 0) -> "RowDelta":
        """A delta with no rows."""
        return cls(np.empty(0, dtype=np.int64), np.empty((0, head_dim), dtype=dtype), np.empty(0, dtype=record),
                   np.zeros(num_chunks, dtype=bool), chunk_rows, next_seq, 0, lineage)

    def holds_all_of(self, other: "RowDelta") -> bool:
        """Whether this delta was merged from `other` (or is it): it overlays every row `other` holds."""
        return self.lineage == other.lineage and self.next_seq >= other.next_seq

    def only(self, ids: np.ndarray, segment_rows: int, lineage: int) -> "RowDelta":
        """A new delta of the held rows whose ids are in `ids` (ascending unique), as a new lineage."""
        keep = np.isin(self.ids, ids, assume_unique=True)
        mask = np.zeros_like(self.chunk_mask)
        mask[self.ids[keep] // self.chunk_rows] = True
        return RowDelta(self.ids[keep], self.rows[keep], self.opt[keep], mask, self.chunk_rows, self.next_seq, segment_rows,
                        lineage)

    @property
    def size(self) -> int:
        """Rows held."""
        return int(self.ids.size)

    def merged(self, ids: np.ndarray, rows: np.ndarray, opt: np.ndarray) -> "RowDelta":
        """A new delta where rows of `ids` (unique, any order) replace or join the held ones."""
        order = np.argsort(ids, kind="stable")
        ids, rows, opt = ids[order], rows[order], opt[order]
        if self.size and native.available():
            ids, rows, opt = native.merge_rows((self.ids, self.rows, self.opt), (ids, np.ascontiguousarray(rows),
                                                                                 np.ascontiguousarray(opt)))
        elif self.size:
            kept = np.flatnonzero(~self._contains(ids))  # [K]: held rows not being replaced
            kept_ids = self.ids[kept]
            new_at = np.arange(ids.size) + np.searchsorted(kept_ids, ids)  # [n]: places in the merged order
            kept_at = np.arange(kept.size) + np.searchsorted(ids, kept_ids)  # [K]
            total = kept.size + ids.size
            merged_ids = np.empty(total, dtype=np.int64)
            merged_rows = np.empty((total, self.rows.shape[1]), dtype=self.rows.dtype)
            merged_opt = np.empty(total, dtype=self.opt.dtype)
            for target, old, new in ((merged_ids, kept_ids, ids), (row_bytes(merged_rows), row_bytes(self.rows)[kept], row_bytes(rows)),
                                     (row_bytes(merged_opt), row_bytes(self.opt)[kept], row_bytes(opt))):
                target[kept_at] = old  # as raw bytes: numpy copies structured records one field at a time
                target[new_at] = new
            ids, rows, opt = merged_ids, merged_rows, merged_opt
        mask = self.chunk_mask.copy()
        mask[ids // self.chunk_rows] = True
        return RowDelta(ids, rows, opt, mask, self.chunk_rows, self.next_seq + 1, self.segment_rows + int(order.size),
                        self.lineage)

    def _contains(self, sorted_ids: np.ndarray) -> np.ndarray:
        """bool [D]: which held ids appear in sorted_ids."""
        at = np.searchsorted(sorted_ids, self.ids)
        return sorted_ids[np.minimum(at, sorted_ids.size - 1)] == self.ids if sorted_ids.size else np.zeros(self.size, bool)

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ids, indexes into this delta) of the ids held here; ids int64 [N], any order, repeats allowed."""
        if not self.size or not ids.size:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        if native.available():  # gallops through ascending ids (a deduplicated lookup) instead of binary searching each
            return native.find_sorted(self.ids, ids)
        candidates = np.flatnonzero(self.chunk_mask[ids // self.chunk_rows])  # only ids in chunks with updates
        at = np.minimum(np.searchsorted(self.ids, ids[candidates]), self.size - 1)
        hit = self.ids[at] == ids[candidates]
        return candidates[hit], at[hit]

    def overlay(self, ids: np.ndarray, out: np.ndarray, opt: bool = False) -> None:
        """out[i] = the held row (or Adam record with opt=True) of ids[i], where there is one."""
        positions, index = self.find(ids)
        if positions.size:
            row_bytes(out)[positions] = row_bytes(self.opt if opt else self.rows)[index]


def row_bytes(a: np.ndarray) -> np.ndarray:
    """uint8 [N, bytes per item] view of an array of N items (rows or records) whose items are contiguous; writes go to `a`."""
    view = a.view(np.uint8)  # [N, row bytes] for rows; [N * record bytes] for records. ValueError if items are not contiguous
    if view.ndim != 2:
        view = view.reshape(a.shape[0], -1)
    if not np.may_share_memory(view, a):  # reshape copied
        raise ValueError("row_bytes: the array's items are not laid out as rows")
    return view


def encode_segment(ids: np.ndarray, rows: np.ndarray, opt: np.ndarray) -> bytes:
    """One push's rows as stored: count, ids (int64), rows (table dtype), Adam records; little-endian raw bytes."""
    return b"".join((_COUNT.pack(ids.size), np.ascontiguousarray(ids, dtype="<i8").tobytes(),
                     np.ascontiguousarray(rows).tobytes(), np.ascontiguousarray(opt).tobytes()))


def decode_segment(blob, head_dim: int, dtype, record: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, rows, opt) of a stored segment (copies: the blob may be an LMDB buffer)."""
    (n,) = _COUNT.unpack_from(blob, 0)
    dtype = np.dtype(dtype)
    pos = _COUNT.size
    ids = np.frombuffer(blob, dtype="<i8", count=n, offset=pos).astype(np.int64)
    pos += 8 * n
    rows = np.frombuffer(blob, dtype=dtype, count=n * head_dim, offset=pos).reshape(n, head_dim).copy()
    pos += dtype.itemsize * n * head_dim
    opt = np.frombuffer(blob, dtype=record, count=n, offset=pos).copy()
    if pos + record.itemsize * n != len(blob):
        raise ValueError(f"row segment is {len(blob)} bytes, expected {pos + record.itemsize * n}")
    return ids, rows, opt
