"""The Engram tables of a model on a Ray memory pool, as a model worker's TableSource (through the pool's TableAdmin).

Model workers never import orchestration: whoever starts one (the CLI, a TrainWorker
actor, the demo) resolves `--memory` here and hands the TableSource in.
"""

from __future__ import annotations

from model_worker.tables import AdminTables, TableSource, table_source


def is_pool(memory: str | None) -> bool:
    """Whether a --memory value names a Ray memory pool ("pool" or "pool:NAME")."""
    return bool(memory) and (memory == "pool" or memory.startswith("pool:"))


def pool_admin(pool_name: str, token: str | None = None):
    """The PoolAdmin of a pool of the Ray cluster this process runs in (or joins: $RAY_ADDRESS, engram cluster up's)."""
    from orchestration.pool import MemoryPool
    from orchestration.pool_admin import PoolAdmin
    from orchestration.ray_cluster import connect_ray

    connect_ray(None)  # a no-op inside Ray
    return PoolAdmin(MemoryPool.attach(pool_name), token=token)


def tables_for(memory: str | None, table: str | None = None, token: str | None = None, version: int = 0) -> TableSource:
    """The TableSource of any --memory value: in-process, grpc://HOST:PORT, or pool[:NAME]."""
    if is_pool(memory):
        pool_name = memory.partition(":")[2] or "default"
        return AdminTables(memory, table, lambda: pool_admin(pool_name, token), version)
    return table_source(memory, table, token, version)
