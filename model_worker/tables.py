"""Where a model's Engram tables live: a TableSource opens them once the model's spec is known.

The trainer and the generator take a TableSource from whoever starts them and never
look at what it is. Here: the in-process LocalTable and one memory service
(`grpc://HOST:PORT`, the table created there with the same seeded init when missing).
A Ray memory pool is opened by orchestration (orchestration/pool_tables.py), which
hands its own TableSource in: this package imports nothing of orchestration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from memory_service.backend import TableBackend
from memory_service.errors import NotFound
from memory_service.local_table import LocalTable
from memory_service.spec import EngramSpec
from memory_service.table_meta import layer_rows_for_spec


class TableSource(ABC):
    """A place that holds (or will hold) the Engram tables of one model."""

    description: str  # for logs and summaries: "in-process", "grpc://host:port/table", "pool:default/table"
    memory: str | None  # the --memory form of this place (None: in-process), recorded in checkpoints
    table: str | None  # the table name there (None: in-process)

    @abstractmethod
    def open(self, spec: EngramSpec, compression_map: np.ndarray, init_std: float = 1.0, init_seed: int = 0,
             create: bool = True, log=print) -> TableBackend:
        """A backend for the spec's tables (created with seeded rows when missing and `create`)."""


class InProcessTables(TableSource):
    """Tables in this process's RAM (LocalTable)."""

    description, memory, table = "in-process", None, None

    def open(self, spec: EngramSpec, compression_map: np.ndarray, init_std: float = 1.0, init_seed: int = 0,
             create: bool = True, log=print) -> TableBackend:
        """A fresh seeded LocalTable (a checkpoint's rows are loaded into it by the caller)."""
        return LocalTable(spec, layer_rows_for_spec(spec), init_std=init_std, init_seed=init_seed)


class ServiceTables(TableSource):
    """A table on one memory service (`engram serve`), read and written through a MemoryClient."""

    def __init__(self, address: str, table: str, token: str | None = None, version: int = 0):
        """version: read and write that version (0: the active one)."""
        if not table:
            raise ValueError("a table name is needed with a memory service address")
        self.memory, self.table, self.token, self.version = address, table, token, version
        self.description = f"{address}/{table}" + (f" (version {version})" if version else "")

    def open(self, spec: EngramSpec, compression_map: np.ndarray, init_std: float = 1.0, init_seed: int = 0,
             create: bool = True, log=print) -> TableBackend:
        """A MemoryClient of the table (refused when its spec differs from this model's)."""
        from memory_service.admin import ServiceAdmin
        from memory_service.client import MemoryClient

        try:
            return MemoryClient(self.memory, self.table, token=self.token, spec=spec, version=self.version)
        except NotFound:
            if not create or self.version:
                raise
        log(f"creating table {self.table!r} on {self.memory} (seeded init, std {init_std}, seed {init_seed})")
        admin = ServiceAdmin(self.memory, token=self.token)
        try:
            admin.create_table(self.table, spec, compression_map, init_std=init_std, init_seed=init_seed)
        finally:
            admin.close()
        return MemoryClient(self.memory, self.table, token=self.token, spec=spec)


def table_source(memory: str | None, table: str | None = None, token: str | None = None, version: int = 0) -> TableSource:
    """The TableSource of a --memory value this package can open: None (in-process) or grpc://HOST:PORT."""
    if not memory:
        if version:
            raise ValueError("a table version is chosen on a memory service (--memory grpc://HOST:PORT or pool)")
        return InProcessTables()
    if memory == "pool" or memory.startswith("pool:"):
        raise ValueError(f"--memory {memory}: a Ray memory pool is opened by orchestration (use the engram command, "
                         "or pass orchestration.pool_tables.PoolTables)")
    return ServiceTables(memory, table, token, version)
