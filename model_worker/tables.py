"""Where a model's Engram tables live: in this process, or on the memory service.

`open_tables` gives the trainer and the generator a TableBackend for a spec: the
in-process LocalTable by default, or a MemoryClient for `grpc://HOST:PORT` (creating
the table there, with the same seeded init as the local one, when it does not exist).
"""

from __future__ import annotations

from memory_service.backend import TableBackend
from memory_service.compression import CompressedTokenizer
from memory_service.hashing import NgramHasher
from memory_service.local_table import LocalTable


def open_tables(hasher: NgramHasher, compressor: CompressedTokenizer, memory: str | None = None,
                table: str | None = None, token: str | None = None, init_std: float = 1.0, init_seed: int = 0,
                create: bool = True, log=print) -> TableBackend:
    """A backend holding the spec's tables: LocalTable, the named table on one memory service
    (grpc://HOST:PORT), or on the cluster's Ray memory pool ("pool")."""
    if not memory:
        return LocalTable.for_hasher(hasher, init_std=init_std, init_seed=init_seed)
    if memory == "pool" or memory.startswith("pool:"):  # a Ray memory pool of the cluster this process runs in
        from orchestration.commands_cluster import connect_ray
        from orchestration.pool import MemoryPool

        connect_ray(None)  # a CLI process joins the cluster (RAY_ADDRESS or engram cluster up's); no-op inside Ray
        pool = MemoryPool.attach(memory.partition(":")[2] or "default")
        if table not in pool.tables():
            if not create:
                raise ValueError(f"the memory pool has no table {table!r}")
            log(f"creating table {table!r} on the memory pool (seeded init, std {init_std}, seed {init_seed})")
            pool.create_table(table, hasher.spec, compressor.lookup_table, init_std=init_std, init_seed=init_seed)
        return pool.client(table, token=token)
    from memory_service.client import AdminClient, MemoryClient
    from memory_service.errors import NotFound

    if not table:
        raise ValueError("a table name is needed with a memory service address")
    try:
        return MemoryClient(memory, table, token=token, spec=hasher.spec)
    except NotFound:
        if not create:
            raise
    log(f"creating table {table!r} on {memory} (seeded init, std {init_std}, seed {init_seed})")
    admin = AdminClient(memory, table, token=token)
    try:
        admin.create_table(hasher.spec, compressor.lookup_table, init_std=init_std, init_seed=init_seed)
    finally:
        admin.close()
    return MemoryClient(memory, table, token=token, spec=hasher.spec)
