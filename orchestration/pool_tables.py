"""The Engram tables of a model on a Ray memory pool, as a model worker's TableSource.

Model workers never import orchestration: whoever starts one (the CLI, a TrainWorker
actor, the demo) resolves `--memory` here and hands the TableSource in.
"""

from __future__ import annotations

import numpy as np

from memory_service.backend import TableBackend
from memory_service.errors import NotFound
from memory_service.spec import EngramSpec
from model_worker.tables import TableSource, table_source


def is_pool(memory: str | None) -> bool:
    """Whether a --memory value names a Ray memory pool ("pool" or "pool:NAME")."""
    return bool(memory) and (memory == "pool" or memory.startswith("pool:"))


class PoolTables(TableSource):
    """A table on the memory pool of the Ray cluster this process runs in (or joins)."""

    def __init__(self, memory: str, table: str, token: str | None = None, version: int = 0):
        """memory: "pool" or "pool:NAME"; version: read and write that version (0: the pool's active one)."""
        self.memory, self.table, self.token, self.version = memory, table, token, version
        self.pool_name = memory.partition(":")[2] or "default"
        self.description = f"pool:{self.pool_name}/{table}" + (f" (version {version})" if version else "")

    def open(self, spec: EngramSpec, compression_map: np.ndarray, init_std: float = 1.0, init_seed: int = 0,
             create: bool = True, log=print) -> TableBackend:
        """A MemoryClient that follows the pool's directory (the table created with seeded rows when missing)."""
        from orchestration.pool import MemoryPool
        from orchestration.pool_admin import PoolAdmin
        from orchestration.ray_cluster import connect_ray

        connect_ray(None)  # a CLI process joins the cluster (RAY_ADDRESS or engram cluster up's); no-op inside Ray
        pool = MemoryPool.attach(self.pool_name)
        if self.table not in pool.tables():
            if not create or self.version:
                raise NotFound(f"the memory pool {self.pool_name!r} has no table {self.table!r}", reason="TABLE_NOT_FOUND")
            log(f"creating table {self.table!r} on the memory pool (seeded init, std {init_std}, seed {init_seed})")
            PoolAdmin(pool, token=self.token).create_table(self.table, spec, compression_map, init_std=init_std,
                                                            init_seed=init_seed)
        return pool.client(self.table, token=self.token, spec=spec, version=self.version)


def tables_for(memory: str | None, table: str | None = None, token: str | None = None, version: int = 0) -> TableSource:
    """The TableSource of any --memory value: in-process, grpc://HOST:PORT, or pool[:NAME]."""
    if is_pool(memory):
        return PoolTables(memory, table, token, version)
    return table_source(memory, table, token, version)
