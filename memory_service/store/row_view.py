"""RowView: rows in stored values, addressed straight in LMDB's memory map.

Stored values (chunks of a layer, parts of a sorted run) start at a page boundary plus
LMDB's page header and never move while they exist. A RowView spans them all with one
read-only view of the map, so the row r of value c is one index away:
`chunk_base[c] + r * units_per_row` (units: the largest common divisor of the row and the
page size), and a whole batch of rows is gathered in one native call or one `np.take`.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

from memory_service.store.layout import PAGE_BYTES


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
        unit = math.gcd(row_nbytes, PAGE_BYTES)
        # chunk values start at a page boundary plus LMDB's page header: their distances are whole pages
        assert not np.any((known - lo) % unit), "chunk values are not page-congruent"
        raw = (ctypes.c_uint8 * (hi - lo)).from_address(lo)
        region = np.frombuffer(raw, dtype=np.uint8)
        region.flags.writeable = False
        self.lo, self.unit = lo, unit
        self.region = region[: (hi - lo) // unit * unit].reshape(-1, unit)
        rows_per_chunk = chunk_nbytes // row_nbytes
        units_per_row = row_nbytes // unit
        # item index of row r = chunk_base[r // rows_per_chunk] + r * units_per_row
        self.chunk_base = (addr - lo) // unit - np.arange(addr.size, dtype=np.int64) * rows_per_chunk * units_per_row
