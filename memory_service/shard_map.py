"""Routing math: which shard holds which rows, and how a sorted batch splits into per-shard messages.

Shard s holds rows [bounds[layer][s], bounds[layer][s+1]) of each layer. Contiguous
ranges keep a sorted batch's parts contiguous (no regrouping per shard) and make
resharding a matter of moving ranges. Hashed row ids are uniform, so equal ranges are
balanced. A map is named by its epoch; a pool's directory hands out new maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from memory_service.errors import InvalidArgument


@dataclass
class ShardMap:
    """Shard addresses and each layer's row bounds per shard; `epoch` names this map (0: not a pool's)."""

    addresses: list[str]
    bounds: dict[int, list[int]] = field(default_factory=dict)
    epoch: int = 0

    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return len(self.addresses)

    @classmethod
    def even(cls, addresses: list[str], layer_rows: dict[int, int], chunk_rows: int, epoch: int = 0) -> "ShardMap":
        """Equal row ranges per shard, cut at chunk boundaries."""
        bounds = {}
        for layer, rows in layer_rows.items():
            chunks = -(-rows // chunk_rows)
            cuts = [min(rows, round(chunks * s / len(addresses)) * chunk_rows) for s in range(len(addresses))]
            bounds[layer] = cuts + [rows]
        return cls(list(addresses), bounds, epoch)

    def owned(self, shard: int) -> dict[int, tuple[int, int]]:
        """Rows [lo, hi) of each layer that one shard holds."""
        return {layer: (b[shard], b[shard + 1]) for layer, b in self.bounds.items()}

    def cuts(self, layer: int, sorted_ids: np.ndarray) -> np.ndarray:
        """Positions splitting sorted ids by shard, int64 [num_shards + 1]."""
        if self.num_shards == 1:
            return np.asarray([0, sorted_ids.size])
        if layer not in self.bounds:
            raise InvalidArgument(f"the shard map has no ranges for layer {layer}")
        edges = np.searchsorted(sorted_ids, np.asarray(self.bounds[layer][1:-1]), side="left")
        return np.concatenate([[0], edges, [sorted_ids.size]])

    def plan(self, layer: int, sorted_ids: np.ndarray, per_message: int) -> list[tuple[int, int, int]]:
        """(shard, start, stop): contiguous parts of sorted ids, per shard, at most per_message ids each."""
        cuts = self.cuts(layer, sorted_ids)
        parts = []
        for shard in range(self.num_shards):
            for start in range(int(cuts[shard]), int(cuts[shard + 1]), per_message):
                parts.append((shard, start, min(start + per_message, int(cuts[shard + 1]))))
        return parts

    def shard_of(self, layer: int, row_ids: np.ndarray) -> np.ndarray:
        """Shard index of every row id, int64 [N]."""
        if self.num_shards == 1:
            return np.zeros(np.shape(row_ids), dtype=np.int64)
        return np.searchsorted(np.asarray(self.bounds[layer][1:]), row_ids, side="right")
