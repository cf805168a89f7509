"""The table interface the model worker talks to.

Two calls: fetch rows by id, push row gradients. The in-process `LocalTable`
implements it now; the gRPC client of the memory service implements the same calls,
so the training and generation code never knows where the rows live.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

import numpy as np

from memory_service.errors import FailedPrecondition, InvalidArgument
from memory_service.row_dtypes import all_finite, is_floating, row_width
from memory_service.spec import EngramSpec


class TableBackend(ABC):
    """Rows of every Engram layer's table, addressed by layer-local row ids."""

    spec: EngramSpec
    remote: bool = False
    """True when the rows live outside this process (a memory service): data-parallel workers share them (each
    pushes a disjoint slice of a step's rows), lookups are worth sending ahead (lookup_unique_async), and a
    checkpoint records where they are instead of saving them. False: this process holds its own replica."""

    @abstractmethod
    def num_rows(self, layer_id: int) -> int:
        """Rows in one layer's table."""

    @abstractmethod
    def lookup(self, layer_id: int, row_ids: np.ndarray) -> np.ndarray:
        """Rows for int64 ids [N] -> float32 [N, head_dim]."""

    @abstractmethod
    def apply_gradients(self, layer_id: int, row_ids: np.ndarray, grads: np.ndarray, lr: float) -> None:
        """Row-wise Adam step for unique int64 ids [N] with gradients [N, head_dim]; durable on return."""

    @property
    def row_width(self) -> int:
        """Elements of a stored row as lookup_unique_async returns it: head_dim values, or an FP8 record's bytes."""
        return row_width(self.spec.dtype, self.spec.head_dim)

    def lookup_unique_async(self, layer_id: int, unique_ids: np.ndarray, out: np.ndarray | None = None, version: int = 0):
        """Start a lookup of ascending unique ids; `.result()` gives (rows [U, head_dim] in the table dtype, version).

        Remote backends send it at once (prefetch) and write the rows into `out` when it is given ([U, head_dim] in
        the table dtype: e.g. pinned memory a GPU copy reads), from `version` when it is not 0 (a request pinned to
        the version it began on); this default (one version, in process) looks the rows up now and ignores both.
        """
        return _Done((self.lookup(layer_id, unique_ids), 0))

    def lookup_layers_async(self, parts: dict[int, np.ndarray], version: int = 0, outs: dict | None = None):
        """Start the lookups of several layers ({layer: ascending unique ids [U]}); `.result()` gives
        ({layer: rows [U, row width]}, version), every layer from that one version.

        Remote backends send them together (one call per shard for all layers); outs: {layer: buffer} as `out` of
        lookup_unique_async. This default starts each layer's lookup in turn."""
        outs = outs or {}
        return _EachLayer({layer: self.lookup_unique_async(layer, ids, out=outs.get(layer), version=version)
                           for layer, ids in parts.items()})

    def save(self, path) -> None:
        """Write every row and its optimizer state to a file (in-process backends; remote rows stay where they are)."""
        raise NotImplementedError(f"{type(self).__name__} keeps its rows on the memory service")

    def load(self, path) -> None:
        """Restore rows and optimizer state written by save() (in-process backends)."""
        raise NotImplementedError(f"{type(self).__name__} keeps its rows on the memory service")

    def close(self) -> None:
        """Release connections or files (no-op by default)."""


def check_row_ids(row_ids, num_rows: int, layer_id: int) -> np.ndarray:
    """Validate a 1-D int64 id array against a table size; returns it as int64."""
    ids = np.asarray(row_ids)
    if ids.ndim != 1:
        raise InvalidArgument(f"row ids must be a 1-D array, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgument(f"row ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_rows:
            bad = low if low < 0 else high
            raise InvalidArgument(f"row id {bad} is out of range for layer {layer_id} (table has {num_rows} rows)")
    return ids


def check_gradients(ids: np.ndarray, grads, head_dim: int) -> np.ndarray:
    """Validate gradients [N, head_dim] for unique ids [N]; returns them as float32."""
    g = np.asarray(grads)
    if g.shape != (ids.shape[0], head_dim):
        raise InvalidArgument(f"gradients must be [{ids.shape[0]}, {head_dim}] for {ids.shape[0]} ids, got {list(g.shape)}")
    if not is_floating(g.dtype):
        raise InvalidArgument(f"gradients must be floating point, got dtype {g.dtype}")
    if np.unique(ids).size != ids.size:
        raise InvalidArgument("gradient row ids must be unique (sum duplicate rows' gradients first)")
    if not all_finite(g):
        raise InvalidArgument("gradients contain NaN or Inf; refusing to corrupt the table")
    return g.astype(np.float32, copy=False)


class _Done:
    """A result that is already there (the shape of a pending lookup)."""

    def __init__(self, value):
        self._value = value

    def result(self):
        """The value."""
        return self._value


class _EachLayer:
    """Per-layer pending lookups seen as one multi-layer lookup (in-process tables: one version, 0, for every layer;
    a backend whose layers may answer from different versions implements lookup_layers_async itself)."""

    def __init__(self, pending: dict):
        self._pending = pending

    def result(self) -> tuple[dict[int, np.ndarray], int]:
        """({layer: rows}, the version) once every layer's rows are there."""
        rows, versions = {}, set()
        for layer, pending in self._pending.items():
            rows[layer], version = pending.result()
            versions.add(version)
        if len(versions) > 1:
            raise FailedPrecondition(f"the layers of one lookup came from versions {sorted(versions)}",
                                     reason="VERSION_MIXED")
        return rows, versions.pop() if versions else 0


class LayerOf:
    """One layer of a multi-layer lookup, shaped as a single-layer one: `.result()` -> (rows [U, width], version)."""

    def __init__(self, pending, layer: int):
        self.pending, self.layer = pending, layer

    def result(self) -> tuple[np.ndarray, int]:
        """That layer's rows and the version (waits for the whole lookup)."""
        rows, version = self.pending.result()
        return rows[self.layer], version


class Once:
    """A computation several consumers wait on (the layers of one multi-layer lookup): it runs once, on the first
    call of result(); later calls get its value, or its error again without running it (and its retries) again."""

    def __init__(self, compute):
        self._compute, self._done, self._value, self._error = compute, False, None, None
        self._lock = threading.Lock()

    def result(self):
        """The computation's value (runs it the first time); raises its error to every caller."""
        with self._lock:
            if self._error is not None:
                raise self._error
            if not self._done:
                try:
                    self._value = self._compute()
                except Exception as e:  # an interrupt is not remembered: the next call runs it again
                    self._error = e
                    raise
                self._done = True
            return self._value
