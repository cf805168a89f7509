"""In-process Engram tables: numpy arrays in this process's RAM, row-wise Adam beside them.

The reference implementation of `TableBackend`: the remote memory service must give
the same rows and the same updates for the same calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memory_service.backend import TableBackend, check_gradients, check_row_ids
from memory_service.errors import InvalidArgument
from memory_service.hashing import NgramHasher
from memory_service.row_init import init_rows
from memory_service.row_optim import RowAdamConfig, check_learning_rate, row_adam_update
from memory_service.spec import EngramSpec


class LocalTable(TableBackend):
    """All layers' tables as arrays: rows [R, head_dim] (spec dtype), Adam m, v [R, head_dim], steps [R]."""

    def __init__(self, spec: EngramSpec, layer_rows: dict[int, int], init_std: float = 1.0,
                 init_seed: int = 0, optimizer: RowAdamConfig | None = None):
        self.spec = spec
        self.optimizer = optimizer or RowAdamConfig()
        self._rows, self._m, self._v, self._steps = {}, {}, {}, {}
        for layer_id, num_rows in layer_rows.items():
            self._rows[layer_id] = init_rows(num_rows, spec.head_dim, layer_id, 0, num_rows, init_std, init_seed, spec.dtype)
            self._m[layer_id] = np.zeros((num_rows, spec.head_dim), dtype=np.float32)
            self._v[layer_id] = np.zeros((num_rows, spec.head_dim), dtype=np.float32)
            self._steps[layer_id] = np.zeros(num_rows, dtype=np.int64)

    @classmethod
    def for_hasher(cls, hasher: NgramHasher, **kwargs) -> "LocalTable":
        """Tables sized for every layer of a hasher."""
        return cls(hasher.spec, {l: hasher.layer_num_rows(l) for l in hasher.spec.layer_ids}, **kwargs)

    def _layer(self, layer_id: int) -> np.ndarray:
        try:
            return self._rows[layer_id]
        except KeyError:
            raise InvalidArgument(f"no table for layer {layer_id}; tables exist for layers {sorted(self._rows)}") from None

    def num_rows(self, layer_id: int) -> int:
        """Rows in one layer's table."""
        return int(self._layer(layer_id).shape[0])

    def table(self, layer_id: int) -> np.ndarray:
        """The layer's whole row array (a view; for tests, import and export)."""
        return self._layer(layer_id)

    def lookup(self, layer_id: int, row_ids: np.ndarray) -> np.ndarray:
        """Rows for int64 ids [N] -> float32 [N, head_dim] (one vectorised take)."""
        table = self._layer(layer_id)
        ids = check_row_ids(row_ids, table.shape[0], layer_id)
        out = np.take(table, ids, axis=0)
        return out.astype(np.float32, copy=False)

    def apply_gradients(self, layer_id: int, row_ids: np.ndarray, grads: np.ndarray, lr: float) -> None:
        """Row-wise Adam on the given unique rows."""
        table = self._layer(layer_id)
        ids = check_row_ids(row_ids, table.shape[0], layer_id)
        g = check_gradients(ids, grads, self.spec.head_dim)
        lr = check_learning_rate(lr)
        m, v, steps = self._m[layer_id], self._v[layer_id], self._steps[layer_id]
        table[ids], m[ids], v[ids], steps[ids] = row_adam_update(table[ids], m[ids], v[ids], steps[ids], g, lr, self.optimizer)

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write rows and optimizer state of every layer to one .npz file."""
        arrays = {}
        for layer_id in self._rows:
            arrays[f"rows/{layer_id}"] = self._rows[layer_id]
            arrays[f"m/{layer_id}"] = self._m[layer_id]
            arrays[f"v/{layer_id}"] = self._v[layer_id]
            arrays[f"steps/{layer_id}"] = self._steps[layer_id]
        path = Path(path)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, spec=np.frombuffer(self.spec.to_json().encode(), dtype=np.uint8), **arrays)
        tmp.replace(path)

    def load(self, path: str | Path) -> None:
        """Restore state written by save(); the file's spec must match this table's."""
        with np.load(Path(path)) as z:
            saved = EngramSpec.from_json(bytes(z["spec"]).decode())
            if saved.fingerprint() != self.spec.fingerprint():
                raise InvalidArgument(f"table file {path} was written for another spec "
                                      f"(fingerprint {saved.fingerprint()} != {self.spec.fingerprint()})")
            for layer_id in self._rows:
                for name, store in (("rows", self._rows), ("m", self._m), ("v", self._v), ("steps", self._steps)):
                    arr = z[f"{name}/{layer_id}"]
                    if arr.shape != store[layer_id].shape:
                        raise InvalidArgument(f"{name} of layer {layer_id} in {path} has shape {arr.shape}, "
                                              f"expected {store[layer_id].shape}")
                    store[layer_id][...] = arr
