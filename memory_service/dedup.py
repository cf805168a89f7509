"""Batch dedup: unique row ids and the inverse map, with one in-place sort."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memory_service import native


@dataclass
class Dedup:
    """Sorted unique ids of a batch, plus how to expand rows of `unique` back to the batch order.

    The inverse is worked out only when asked for, so a caller can send the unique ids
    first and compute the inverse while the rows travel.
    """

    unique: np.ndarray  # int64 [U], ascending
    first: np.ndarray | None  # bool [N]: in sorted order, where a new id starts (None: not computed, or no order)
    # int64 [N]: sorted packed words (id << shift | position), or argsort positions (None: batch was already unique+sorted)
    order: np.ndarray | None
    shift: int = 0  # bits of position in `order` (0: `order` holds positions)

    @property
    def positions(self) -> np.ndarray | None:
        """int64 [N]: batch position of each id in sorted order."""
        if self.order is None:
            return None
        return self.order & ((1 << self.shift) - 1) if self.shift else self.order

    def inverse(self) -> np.ndarray:
        """int64 [N]: index into `unique` of each batch position (rows[inverse] restores batch order)."""
        if self.order is None:
            return np.arange(self.unique.size)
        if self.first is None:  # native dedup: one pass over the sorted words
            return native.inverse(self.order, self.shift)
        unique_index = np.cumsum(self.first) - 1  # [N]: index into unique, sorted order
        inverse = np.empty(self.first.size, dtype=np.int64)
        inverse[self.positions] = unique_index
        return inverse


def dedup_ids(ids: np.ndarray) -> Dedup:
    """Unique ids by sorting (id << b | position) words: a native radix sort, else numpy's in-place sort.

    ids: int64 [N], non-negative (checked against the table before this). The numpy sort
    is 3x faster than argsort/np.unique here; the native radix sort 2x faster again.
    """
    n = ids.size
    if n < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return Dedup(ids, None, None)
    shift = max(1, int(n - 1).bit_length())
    id_bits = max(1, int(ids.max()).bit_length())
    if native.available() and id_bits + shift <= 62 and int(ids.min()) >= 0:
        keys, unique = native.dedup(ids, shift, id_bits)
        return Dedup(unique, None, keys, shift)
    if id_bits + shift <= 62:
        order = (ids << shift) | np.arange(n, dtype=np.int64)
        order.sort()
        sorted_ids = order >> shift
    else:
        order, shift = np.argsort(ids, kind="stable"), 0
        sorted_ids = ids[order]
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(sorted_ids[1:], sorted_ids[:-1], out=first[1:])
    return Dedup(sorted_ids[first], first, order, shift)


class PartwiseDedup:
    """Dedup handed out in ascending slices, so the first ids can be sent before the whole batch is sorted.

    One pass groups the (id << b | position) words by the top bits of the id; then each
    run of groups holding about `piece` ids is sorted and its distinct ids appended to
    `unique`. Iterating yields the number of distinct ids ready so far (unique[:count]);
    afterwards `result()` is the same Dedup as dedup_ids() gives. Native kernels only:
    use `PartwiseDedup.supports(ids.size, id_bound)` first.
    """

    TOP_BITS = 8

    def __init__(self, ids: np.ndarray, piece: int, id_bound: int | None = None):
        """ids: int64 [N] in [0, id_bound) (a caller that checked them passes the bound and saves two passes)."""
        n = ids.size
        self.shift = max(1, int(n - 1).bit_length())
        top = int(ids.max()) if id_bound is None else id_bound - 1
        self.id_bits = max(self.TOP_BITS, top.bit_length())
        self.keys, self.starts = native.group_keys(ids, self.shift, self.id_bits, self.TOP_BITS)
        self.unique_buffer = np.empty(n, dtype=np.int64)
        self.piece = max(1, piece)
        self.count = 0

    @staticmethod
    def supports(n: int, id_bound: int) -> bool:
        """Whether the native kernels can take n ids in [0, id_bound) (narrow enough to pack with their positions)."""
        return native.available() and n >= 2 and \
            max(PartwiseDedup.TOP_BITS, int(id_bound - 1).bit_length()) + max(1, int(n - 1).bit_length()) <= 62

    def __iter__(self):
        starts, groups = self.starts, self.starts.size - 1
        scratch = np.empty(int(np.diff(starts).max()), dtype=np.int64)
        low_bits = self.id_bits - self.TOP_BITS
        group = 0
        while group < groups:  # runs of whole groups with about `piece` ids each
            end = max(group + 1, int(np.searchsorted(starts, starts[group] + self.piece, side="right")) - 1)
            end = min(end, groups)
            self.count += native.dedup_groups(self.keys, starts, group, end, low_bits, self.shift, scratch,
                                              self.unique_buffer[self.count:])
            group = end
            yield self.count

    def result(self) -> Dedup:
        """The finished dedup (iterate first)."""
        return Dedup(self.unique_buffer[:self.count], None, self.keys, self.shift)


def expand_rows(rows: np.ndarray, inverse: np.ndarray, out: np.ndarray) -> None:
    """out[i] = rows[inverse[i]]: rows [U, D], inverse int64 [N] in [0, U), out [N, D] of rows' dtype (C-contiguous)."""
    if native.available() and rows.size and rows.flags.c_contiguous and out.flags.c_contiguous:
        row_nbytes = rows.shape[1] * rows.itemsize
        native.gather_rows(rows.view(np.uint8).reshape(rows.shape[0], row_nbytes), inverse,
                           out.view(np.uint8).reshape(out.shape[0], row_nbytes))
    else:
        np.take(rows, inverse, axis=0, out=out)
