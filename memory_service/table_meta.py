"""Metadata of one stored table set: spec, sizes, versions, active version, swap history.

Kept as a small JSON document in the store's `meta` database (row data never is:
rows are raw little-endian chunks). Changing the active version is one write of this
document, so a swap or rollback is atomic.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import numpy as np

from memory_service.errors import FailedPrecondition, InvalidArgument, NotFound, shown
from memory_service.fp8_rows import check_records
from memory_service.hashing import head_sizes_for_spec
from memory_service.row_dtypes import all_finite, is_trainable, row_dtype, row_width
from memory_service.row_optim import record_dtype
from memory_service.spec import EngramSpec

TABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_CHUNK_ROWS = 1024  # rows per stored chunk (one LMDB value) unless a table says otherwise
META_PREFIX = b"table:"  # key prefix of table metadata in a store's meta database


def check_table_name(name: str) -> str:
    """Table names are 1-128 characters of letters, digits, '.', '_' and '-'."""
    if not isinstance(name, str) or not TABLE_NAME.match(name):
        raise InvalidArgument(f"invalid table name {shown(name)}: use 1-128 letters, digits, '.', '_' or '-', starting "
                              "with a letter or digit", reason="INVALID_TABLE_NAME")
    return name


def meta_key(name: str) -> bytes:
    """Key of a table's metadata document."""
    return META_PREFIX + name.encode()


def layer_rows_for_spec(spec: EngramSpec) -> dict[int, int]:
    """Rows of each layer's table: the sum of its heads' primes."""
    return {layer: sum(sum(order) for order in sizes) for layer, sizes in head_sizes_for_spec(spec).items()}


@dataclass
class TableMeta:
    """Everything the store knows about one table set besides its rows."""

    name: str
    table_id: int
    spec: EngramSpec
    chunk_rows: int
    layer_rows: dict[int, int]
    active: int = 1
    versions: dict[int, dict] = field(default_factory=dict)  # version -> {"source", "created"}
    history: list[int] = field(default_factory=list)  # earlier active versions, newest last
    next_version: int = 1
    has_compression: bool = False
    opt_chunk_rows: int = 0  # rows per optimizer-state chunk (0: chunk_rows)

    @property
    def dtype(self) -> np.dtype:
        """Element dtype of a stored row (uint8 for FP8 records)."""
        return row_dtype(self.spec.dtype).newbyteorder("<")

    @property
    def head_dim(self) -> int:
        """Values per row (the model's view)."""
        return self.spec.head_dim

    @property
    def row_width(self) -> int:
        """Elements of one stored row: head_dim, or an FP8 record's bytes."""
        return row_width(self.spec.dtype, self.spec.head_dim)

    @property
    def trainable(self) -> bool:
        """Whether gradients may update the rows (not FP8 records)."""
        return is_trainable(self.spec.dtype)

    @property
    def row_nbytes(self) -> int:
        """Bytes of one stored row."""
        return self.row_width * self.dtype.itemsize

    def check_rows(self, values, count: int | None = None) -> np.ndarray:
        """Stored rows [n, row_width] (n = count when given) in the table's element dtype, every value finite (FP8
        records: no NaN code or scale); InvalidArgument (nothing stored) otherwise."""
        values = np.asarray(values)
        width = self.row_width
        if values.ndim != 2 or values.shape[1] != width or (count is not None and values.shape[0] != count):
            rows = "n" if count is None else count
            raise InvalidArgument(f"rows must be [{rows}, {width}]{' (FP8 records)' if not self.trainable else ''}, "
                                  f"got {list(values.shape)}")
        if values.dtype != self.dtype:
            raise InvalidArgument(f"rows must be {self.dtype.name} (the table dtype), got {values.dtype.name}")
        if self.trainable:
            if not all_finite(values):
                raise InvalidArgument("rows contain NaN or Inf; refusing to store them", reason="NON_FINITE_VALUE")
        else:
            check_records(values, self.head_dim)
        return values

    def num_chunks(self, layer: int) -> int:
        """Chunks of a layer's table (the last one padded to chunk_rows)."""
        return -(-self.layer_rows[layer] // self.chunk_rows)

    @property
    def opt_record(self) -> np.dtype:
        """The optimizer record of one row."""
        return record_dtype(self.head_dim, self.spec.optimizer_state)

    @property
    def opt_rows(self) -> int:
        """Rows per optimizer-state chunk."""
        return self.opt_chunk_rows or self.chunk_rows

    def num_opt_chunks(self, layer: int) -> int:
        """Optimizer-state chunks of a layer."""
        return -(-self.layer_rows[layer] // self.opt_rows)

    def resolve_version(self, version: int) -> int:
        """0 -> the active version; otherwise the version itself, which must exist (NotFound)."""
        v = self.active if version == 0 else int(version)
        if v not in self.versions:
            raise NotFound(f"table {shown(self.name)} has no version {v}; versions are {sorted(self.versions)}",
                           reason="VERSION_NOT_FOUND")
        return v

    def check_request(self, layer: int, fingerprint: str | None) -> int:
        """Rows of `layer`, after checking a request's spec fingerprint (None: not given) and layer."""
        if fingerprint is not None and fingerprint != self.spec.fingerprint():
            raise FailedPrecondition(f"spec fingerprint {shown(fingerprint)} does not match table {shown(self.name)} "
                                     f"({self.spec.fingerprint()}): client and table disagree on hashing or layout",
                                     reason="SPEC_MISMATCH")
        if layer not in self.layer_rows:
            raise InvalidArgument(f"table {shown(self.name)} has no layer {layer}; its layers are {sorted(self.layer_rows)}",
                                  reason="LAYER_NOT_FOUND")
        return self.layer_rows[layer]

    def add_version(self, source: str) -> int:
        """Register a new version number (not yet active)."""
        v = self.next_version
        self.next_version += 1
        self.versions[v] = {"source": source, "created": time.time()}
        return v

    def to_json(self) -> bytes:
        """Serialised form for the meta database."""
        return json.dumps({
            "name": self.name, "table_id": self.table_id, "spec": json.loads(self.spec.to_json()),
            "chunk_rows": self.chunk_rows, "layer_rows": {str(k): v for k, v in self.layer_rows.items()},
            "active": self.active, "versions": {str(k): v for k, v in self.versions.items()},
            "history": self.history, "next_version": self.next_version, "has_compression": self.has_compression,
            "opt_chunk_rows": self.opt_chunk_rows,
        }, sort_keys=True).encode()

    @classmethod
    def from_json(cls, blob: bytes) -> "TableMeta":
        """Inverse of to_json."""
        d = json.loads(bytes(blob))
        return cls(
            name=d["name"], table_id=d["table_id"], spec=EngramSpec.from_dict(d["spec"]), chunk_rows=d["chunk_rows"],
            layer_rows={int(k): v for k, v in d["layer_rows"].items()}, active=d["active"],
            versions={int(k): v for k, v in d["versions"].items()}, history=list(d["history"]),
            next_version=d["next_version"], has_compression=d["has_compression"], opt_chunk_rows=d.get("opt_chunk_rows", 0),
        )
