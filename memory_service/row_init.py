"""Seeded initial rows that any store can reproduce block by block.

Row r of a layer's table is drawn from a generator seeded by (seed, layer, r // block),
so an in-process table, one LMDB shard or eight shards that each hold a slice of the
rows all start from the same values, whatever their chunking.
"""

from __future__ import annotations

import numpy as np

from memory_service.fp8_rows import quantize
from memory_service.row_dtypes import FP8_BLOCK_SCALED

INIT_BLOCK_ROWS = 4096  # rows drawn from one generator


def init_rows(num_rows: int, head_dim: int, layer_id: int, start: int, stop: int,
              std: float = 1.0, seed: int = 0, dtype: str = "float32") -> np.ndarray:
    """Rows [start, stop) of a layer's initial table, [stop - start, head_dim] N(0, std^2) in a float dtype; for
    FP8 tables, those values quantized: records [stop - start, head_dim + head_dim / 32]."""
    if not 0 <= start <= stop <= num_rows:
        raise ValueError(f"row range [{start}, {stop}) is outside the table [0, {num_rows})")
    if dtype == FP8_BLOCK_SCALED:
        return quantize(init_rows(num_rows, head_dim, layer_id, start, stop, std, seed, "float32"))
    out = np.empty((stop - start, head_dim), dtype=dtype)
    first_block, last_block = start // INIT_BLOCK_ROWS, (stop - 1) // INIT_BLOCK_ROWS if stop > start else -1
    for block in range(first_block, last_block + 1):
        block_start = block * INIT_BLOCK_ROWS
        block_rows = min(INIT_BLOCK_ROWS, num_rows - block_start)
        rng = np.random.default_rng([seed, layer_id, block])
        values = rng.standard_normal((block_rows, head_dim), dtype=np.float32) * np.float32(std)
        lo, hi = max(start, block_start), min(stop, block_start + block_rows)
        out[lo - start:hi - start] = values[lo - block_start:hi - block_start]
    return out
