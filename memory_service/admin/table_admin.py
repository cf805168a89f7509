"""Table administration: one interface for one memory service and for a Ray memory pool.

`TableAdmin` names every table operation a user has (list, info, create, create a
version, swap, roll back, drop, import, export). Two implementations exist:
`ServiceAdmin` (service_admin.py) calls one service over gRPC; `PoolAdmin`
(orchestration/pool_admin.py) acts on every shard of a pool through its directory, each
change one epoch step. The `engram table` commands pick one from --address or --ray and
never look further; the data-plane client (MemoryClient) does not administer.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from memory_service.client import MemoryClient
from memory_service.errors import InvalidArgument
from memory_service.fp8_rows import QuantizationError, quantize
from memory_service.row_dtypes import is_floating, is_trainable, row_width
from memory_service.spec import EngramSpec
from memory_service.table_meta import TableMeta

IMPORT_BLOCK_ROWS = 1 << 18  # rows read from a table file and sent per step of an import or export
IMPORT_BLOCKS_IN_FLIGHT = 2  # blocks read ahead of the oldest one not yet acknowledged (memory: 3 blocks)


@dataclass(frozen=True)
class VersionInfo:
    """One version of a table."""

    version: int
    source: str  # "init", "copy of 3", "empty", ...
    created_unix: float


@dataclass(frozen=True)
class TableInfo:
    """What a user sees of a table, wherever it lives."""

    name: str
    spec: EngramSpec
    active_version: int
    versions: tuple[VersionInfo, ...]
    swap_history: tuple[int, ...]  # earlier active versions, newest last
    layer_rows: dict[int, int]
    chunk_rows: int
    dtype: str
    has_compression_map: bool
    placement: dict = field(default_factory=dict)  # where the rows are: {"addresses", "epoch", "bounds": {layer: cuts}}

    @property
    def fingerprint(self) -> str:
        """The spec's fingerprint (travels in every data-plane RPC)."""
        return self.spec.fingerprint()

    @property
    def head_dim(self) -> int:
        """Values per row."""
        return self.spec.head_dim

    @property
    def row_width(self) -> int:
        """Elements of a stored row: head_dim, or an FP8 record's bytes."""
        return row_width(self.spec.dtype, self.spec.head_dim)

    @classmethod
    def from_meta(cls, meta: TableMeta, active: int | None = None, history: list[int] | None = None,
                  placement: dict | None = None) -> "TableInfo":
        """From a store's metadata (a pool passes its directory's active version, swap history and shard map)."""
        return cls(name=meta.name, spec=meta.spec, active_version=meta.active if active is None else active,
                   versions=tuple(VersionInfo(v, info["source"], info["created"]) for v, info in sorted(meta.versions.items())),
                   swap_history=tuple(meta.history if history is None else history), layer_rows=dict(meta.layer_rows),
                   chunk_rows=meta.chunk_rows, dtype=meta.dtype.name, has_compression_map=meta.has_compression,
                   placement=placement or {})

    def to_dict(self) -> dict:
        """JSON-able form (what `engram table info` prints)."""
        return {"name": self.name, "fingerprint": self.fingerprint, "active_version": self.active_version,
                "versions": [{"version": v.version, "source": v.source, "created_unix": round(v.created_unix, 3)}
                             for v in self.versions],
                "swap_history": list(self.swap_history), "layer_rows": {str(k): v for k, v in sorted(self.layer_rows.items())},
                "head_dim": self.head_dim, "row_format": self.spec.dtype, "row_nbytes": self.spec.row_nbytes,
                "dtype": self.dtype, "chunk_rows": self.chunk_rows,
                "has_compression_map": self.has_compression_map, "spec": json.loads(self.spec.to_json()),
                "placement": self.placement}


class TableAdmin(ABC):
    """Table administration of one memory service or one memory pool."""

    where: str  # what is administered, for messages ("grpc://127.0.0.1:50051", "pool 'default'")

    @abstractmethod
    def list_tables(self) -> list[TableInfo]:
        """Every table, by name."""

    @abstractmethod
    def info(self, table: str) -> TableInfo:
        """One table (NotFound if absent)."""

    @abstractmethod
    def create_table(self, table: str, spec: EngramSpec, compression_map: np.ndarray | None = None,
                     init_std: float = 1.0, init_seed: int = 0, chunk_rows: int = 0) -> TableInfo:
        """A new table whose version 1 (active) holds seeded N(0, init_std^2) rows, zeros when init_std is 0."""

    @abstractmethod
    def create_version(self, table: str, copy_of: int | None = None, init_std: float | None = None,
                       init_seed: int = 0) -> int:
        """A new inactive version: a copy of `copy_of` (0: the active one, rows and optimizer state), seeded rows
        (init_std), or, with neither, zeros; returns its number."""

    @abstractmethod
    def swap(self, table: str, version: int) -> tuple[int, int]:
        """Make a version active everywhere at once; returns (active, previous)."""

    @abstractmethod
    def rollback(self, table: str) -> tuple[int, int]:
        """Re-activate the version active before the last swap; returns (active, previous)."""

    @abstractmethod
    def drop_version(self, table: str, version: int) -> None:
        """Delete an inactive version."""

    @abstractmethod
    def drop_table(self, table: str) -> None:
        """Delete a table with all its versions."""

    @abstractmethod
    def data_client(self, table: str, version: int = 0, spec: EngramSpec | None = None) -> MemoryClient:
        """A data-plane client of a table (pinned to `version`, 0: the active one; refused when the table's spec is not
        `spec`, if given); the caller closes it."""

    def close(self) -> None:
        """Release connections (no-op by default)."""

    # ------------------------------------------------------------------ built on the operations above
    def import_rows(self, table: str, layer: int, rows, version: int = 0, activate: bool = False, progress=None,
                    quantization: QuantizationError | None = None) -> int:
        """Write a whole layer's rows [num_rows, head_dim] into `version`; returns the version written, made active
        with activate=True. An FP8 table takes its records [num_rows, row_width] (uint8), or float rows, quantized
        here a block at a time (their error added to `quantization` when given). version 0: a new one, empty when
        the table has no other layer (it costs nothing, and the imported rows start with no optimizer state), else a
        copy of the active one, so the other layers stay.

        rows: anything with .shape and row slices (a memory-mapped .npy, table_io.RowSource): read a block at a time,
        so a table far bigger than RAM imports in bounded memory. An inactive version takes whole chunks straight
        into its chunks (LoadRows: each row written once); the active one goes through row writes. progress(rows)
        is called as blocks land."""
        info = self.info(table)
        if layer not in info.layer_rows:
            raise InvalidArgument(f"table {table!r} has no layer {layer}; its layers are {sorted(info.layer_rows)}")
        expected = (info.layer_rows[layer], info.row_width)
        quantize_rows = not is_trainable(info.spec.dtype) and is_floating(rows.dtype)
        if quantize_rows:
            expected = (info.layer_rows[layer], info.head_dim)
        if tuple(rows.shape) != expected:
            raise InvalidArgument(f"the rows are {list(rows.shape)}, layer {layer} of {table!r} needs {list(expected)}")
        if not is_trainable(info.spec.dtype) and not quantize_rows and np.dtype(rows.dtype) != np.uint8:
            raise InvalidArgument(f"table {table!r} stores {info.spec.dtype} records: import float rows (quantized "
                                  f"here) or uint8 records, not {np.dtype(rows.dtype).name}")
        new = not version
        if new:
            version = self.create_version(table, copy_of=0 if len(info.layer_rows) > 1 else None)
        client = self.data_client(table, version)
        sender = ThreadPoolExecutor(IMPORT_BLOCKS_IN_FLIGHT, thread_name_prefix="engram-import")
        in_flight: deque = deque()  # (future, rows) of blocks sent and not yet acknowledged
        try:
            bulk = version != info.active_version and info.chunk_rows * client.row_nbytes <= client.max_payload_bytes
            step = max(1, IMPORT_BLOCK_ROWS // info.chunk_rows) * info.chunk_rows  # whole chunks per block
            for start in range(0, rows.shape[0], step):
                # the next block is read while the one before it is sent and written
                block = np.asarray(rows[start:start + step])  # [<= step, head_dim or row_width]
                if quantize_rows:
                    values, block = block, quantize(block)  # [<= step, row_width] records
                    if quantization is not None:
                        quantization.add(values, block)
                block = block.astype(client.dtype, copy=False)
                if bulk:
                    in_flight.append((sender.submit(client.load_rows, layer, start, block, version), block.shape[0]))
                else:
                    in_flight.append((sender.submit(client.write_rows, layer, np.arange(start, start + block.shape[0]),
                                                    block), block.shape[0]))
                while len(in_flight) > IMPORT_BLOCKS_IN_FLIGHT or (in_flight and start + step >= rows.shape[0]):
                    future, count = in_flight.popleft()
                    future.result()
                    if progress is not None:
                        progress(count)
        except BaseException:
            for future, _ in in_flight:  # nothing may still be writing into the version dropped below
                future.cancel()
                wait([future])
            if new:  # a refused import leaves no half-written version behind
                self.drop_version(table, version)
            raise
        finally:
            sender.shutdown(wait=True)
            client.close()
        if activate:
            self.swap(table, version)
        return version

    def export_rows(self, table: str, layer: int, version: int = 0) -> np.ndarray:
        """A whole layer's stored rows [num_rows, row_width] of a version (0: the active one), in the table dtype."""
        client = self.data_client(table, version)
        try:
            num_rows = client.num_rows(layer)
            out = np.empty((num_rows, client.row_width), dtype=client.dtype)
            for start in range(0, num_rows, IMPORT_BLOCK_ROWS):
                stop = min(start + IMPORT_BLOCK_ROWS, num_rows)
                client.lookup_raw(layer, np.arange(start, stop, dtype=np.int64), out=out[start:stop])
            return out
        finally:
            client.close()
