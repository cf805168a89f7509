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
from memory_service.row_dtypes import BFLOAT16, FLOAT_DTYPES, is_trainable
from memory_service.row_init import init_rows
from memory_service.row_optim import RowAdamConfig, check_learning_rate, record_dtype, row_adam_step
from memory_service.spec import EngramSpec


class LocalTable(TableBackend):
    """All layers' tables as arrays: rows [R, head_dim] (spec dtype) and optimizer records [R] (spec's optimizer_state)."""

    def __init__(self, spec: EngramSpec, layer_rows: dict[int, int], init_std: float = 1.0,
                 init_seed: int = 0, optimizer: RowAdamConfig | None = None):
        if not is_trainable(spec.dtype):
            raise ValueError(f"an in-process table trains its rows: {spec.dtype} rows are for serving from a memory "
                             f"service (use one of {FLOAT_DTYPES})")
        self.spec = spec
        self.optimizer = optimizer or RowAdamConfig()
        self._rows, self._opt = {}, {}
        for layer_id, num_rows in layer_rows.items():
            self._rows[layer_id] = init_rows(num_rows, spec.head_dim, layer_id, 0, num_rows, init_std, init_seed, spec.dtype)
            self._opt[layer_id] = np.zeros(num_rows, dtype=record_dtype(spec.head_dim, spec.optimizer_state))

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

    def optimizer_state(self, layer_id: int) -> np.ndarray:
        """The layer's optimizer records [R] (a view; fields m, v, step)."""
        self._layer(layer_id)
        return self._opt[layer_id]

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
        opt = self._opt[layer_id]
        table[ids], opt[ids] = row_adam_step(table[ids], opt[ids], g, lr, self.optimizer)

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write rows and optimizer state of every layer to one .npz file."""
        arrays = {}
        for layer_id in self._rows:  # .npz cannot name bfloat16: bf16 rows as their uint16 bits, records as raw bytes
            rows = self._rows[layer_id]
            arrays[f"rows/{layer_id}"] = rows.view(np.uint16) if rows.dtype == BFLOAT16 else rows
            arrays[f"opt/{layer_id}"] = self._opt[layer_id].view(np.uint8).reshape(len(self._opt[layer_id]), -1)
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
            if saved.optimizer_state != self.spec.optimizer_state:
                raise InvalidArgument(f"table file {path} keeps {saved.optimizer_state} optimizer state, this table "
                                      f"{self.spec.optimizer_state}")
            for layer_id, rows in self._rows.items():
                _fill(rows, saved_rows(z, saved, layer_id), f"rows of layer {layer_id} in {path}")
                opt = self._opt[layer_id]
                if f"opt/{layer_id}" in z:
                    _fill(opt.view(np.uint8).reshape(len(opt), -1), z[f"opt/{layer_id}"], f"optimizer state of {layer_id}")
                else:  # written before optimizer records: m, v and steps apart (exact state)
                    for field, name in (("m", "m"), ("v", "v"), ("step", "steps")):
                        _fill(opt[field], z[f"{name}/{layer_id}"], f"{name} of layer {layer_id} in {path}")


def saved_rows(npz, spec: EngramSpec, layer_id: int) -> np.ndarray:
    """A layer's rows [R, head_dim] in the spec's dtype from an open LocalTable.save file."""
    rows = npz[f"rows/{layer_id}"]
    return rows.view(BFLOAT16) if spec.dtype == BFLOAT16.name else rows


def _fill(target: np.ndarray, saved: np.ndarray, what: str) -> None:
    if saved.shape != target.shape or saved.dtype.itemsize != target.dtype.itemsize:
        raise InvalidArgument(f"{what} is {saved.dtype} {list(saved.shape)}, expected {target.dtype} {list(target.shape)}")
    target[...] = saved
