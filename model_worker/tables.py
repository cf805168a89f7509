"""Where a model's Engram tables live: a TableSource opens them once the model's spec is known.

The trainer and the generator take a TableSource from whoever starts them and never
look at what it is: the in-process LocalTable, or a table on the memory service opened
through a TableAdmin (created there with the same seeded init when missing). This
module builds the one for `grpc://HOST:PORT`; a Ray memory pool's TableAdmin comes from
orchestration (orchestration/pool_tables.py): this package imports nothing of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from memory_service.admin.table_admin import TableAdmin
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


class AdminTables(TableSource):
    """A table on a memory service or a pool, opened through its TableAdmin (and created there when missing)."""

    def __init__(self, memory: str, table: str, open_admin: Callable[[], TableAdmin], version: int = 0):
        """open_admin() -> the TableAdmin of the place (called when the tables are opened); version: read and write
        that version (0: the active one)."""
        if not table:
            raise ValueError(f"a table name is needed with --memory {memory}")
        self.memory, self.table, self.open_admin, self.version = memory, table, open_admin, version
        self.description = f"{memory}/{table}" + (f" (version {version})" if version else "")

    def open(self, spec: EngramSpec, compression_map: np.ndarray, init_std: float = 1.0, init_seed: int = 0,
             create: bool = True, log=print) -> TableBackend:
        """A MemoryClient of the table (refused when its spec differs from this model's)."""
        admin = self.open_admin()
        try:
            try:
                return admin.data_client(self.table, self.version, spec=spec)
            except NotFound as e:
                if not create or e.reason != "TABLE_NOT_FOUND":
                    raise
            log(f"creating table {self.table!r} on {admin.where} (seeded init, std {init_std}, seed {init_seed})")
            admin.create_table(self.table, spec, compression_map, init_std=init_std, init_seed=init_seed)
            return admin.data_client(self.table, self.version, spec=spec)
        finally:
            admin.close()


def table_source(memory: str | None, table: str | None = None, token: str | None = None, version: int = 0) -> TableSource:
    """The TableSource of a --memory value this package can open: None (in-process) or grpc://HOST:PORT."""
    if not memory:
        if version:
            raise ValueError("a table version is chosen on a memory service (--memory grpc://HOST:PORT or pool)")
        return InProcessTables()
    if memory == "pool" or memory.startswith("pool:"):
        raise ValueError(f"--memory {memory}: a Ray memory pool is opened by orchestration (use the engram command, "
                         "or pass orchestration.pool_tables.tables_for(...))")
    from memory_service.admin import ServiceAdmin

    return AdminTables(memory, table, lambda: ServiceAdmin(memory, token=token), version)
