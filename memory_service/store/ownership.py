"""Which rows a store owns when it is one shard of a pool, and which of them are frozen while they move.

A standalone store (`engram serve`) owns every row and has epoch 0. A shard of a pool
records (durably) the shard map's epoch and its row range per table and layer; requests
for other rows are refused as a stale map. While a scale moves a range to another
shard, writes to it are refused as retryable (ShardUnavailable) until the map flips.
"""

from __future__ import annotations

import json
import threading

import numpy as np

from memory_service.errors import ShardUnavailable, StaleShardMap, shown
from memory_service.store.layout import Databases

_SHARD_STATE = b"shard_state"


class Ownership:
    """The shard state of a store (epoch, owned ranges) and its frozen ranges."""

    def __init__(self, dbs: Databases, write_lock: threading.Lock):
        self.dbs = dbs
        self.write_lock = write_lock  # the store's writer lock: freezing waits for writes in progress
        with dbs.env.begin() as txn:
            blob = txn.get(_SHARD_STATE, db=dbs.meta)
        self.state = json.loads(bytes(blob)) if blob is not None else {"epoch": 0, "owned": {}}
        self.frozen: dict[str, dict[int, list[tuple[int, int]]]] = {}  # rows being moved to another shard: no writes

    @property
    def epoch(self) -> int:
        """The shard map epoch this store last adopted (0: not a shard of a pool)."""
        return int(self.state["epoch"])

    def set(self, epoch: int, owned: dict[str, dict[int, tuple[int, int]]]) -> None:
        """Record (durably) the shard map epoch and the row range this shard owns per table and layer (write lock held)."""
        state = {"epoch": int(epoch), "owned": {t: {str(l): [int(a), int(b)] for l, (a, b) in layers.items()}
                                                for t, layers in owned.items()}}
        with self.dbs.env.begin(write=True) as txn:
            txn.put(_SHARD_STATE, json.dumps(state).encode(), db=self.dbs.meta)
        self.state = state

    def owned_range(self, name: str, layer: int) -> tuple[int, int] | None:
        """Rows [lo, hi) of a layer this shard owns, or None when the store is not a shard of a pool."""
        layers = self.state["owned"].get(name)
        if layers is None:
            return None
        lo_hi = layers.get(str(layer))
        return (0, 0) if lo_hi is None else tuple(lo_hi)

    def check(self, name: str, layer: int, ids: np.ndarray, write: bool = False) -> None:
        """StaleShardMap when ids are not this shard's; ShardUnavailable (retry) for writes to rows being moved."""
        if ids.size == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        owned = self.owned_range(name, layer)
        if owned is not None and not (owned[0] <= low and high < owned[1]):
            raise StaleShardMap(f"stale shard map: rows [{low}, {high}] of {shown(name)} layer {layer} are not on this "
                                f"shard (it holds [{owned[0]}, {owned[1]}) at epoch {self.epoch}); refresh the map")
        if write:
            for start, stop in self.frozen.get(name, {}).get(layer, []):
                if low < stop and high >= start:
                    raise ShardUnavailable(f"rows [{start}, {stop}) of {shown(name)} layer {layer} are moving to another "
                                           "shard; retry", reason="ROWS_MOVING")

    def freeze(self, name: str, layer: int, start: int, stop: int) -> None:
        """Refuse writes to rows [start, stop) from now on; returns once writes in progress have committed."""
        with self.write_lock:  # a write either committed before this, or will see the freeze
            self.frozen.setdefault(name, {}).setdefault(layer, []).append((start, stop))

    def unfreeze(self, name: str) -> None:
        """Accept writes to every owned row of a table again."""
        with self.write_lock:
            self.frozen.pop(name, None)
