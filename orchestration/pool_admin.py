"""PoolAdmin: table administration of a Ray memory pool, through its directory and shard actors (`--ray`).

Every change goes to every shard as a Ray actor call and, where readers must switch at
once (create, swap, roll back, drop), to the directory as one epoch step: clients read
the directory's map and active version, and a shard refuses requests of an older epoch.
Shards of a pool hold the same version numbers; the directory's active version and swap
history are the pool's.
"""

from __future__ import annotations

import numpy as np

from memory_service.admin.table_admin import TableAdmin, TableInfo
from memory_service.client import MemoryClient
from memory_service.errors import AlreadyExists, EngramError, FailedPrecondition, InvalidArgument, NotFound, shown
from memory_service.shard_map import ShardMap
from memory_service.spec import EngramSpec
from memory_service.table_meta import DEFAULT_CHUNK_ROWS, TableMeta, check_table_name, layer_rows_for_spec
from orchestration.pool import RAY_TIMEOUT_S, MemoryPool


def ray_get(refs, timeout: float = RAY_TIMEOUT_S):
    """ray.get with a timeout; an error of ours raised inside an actor is raised here as itself."""
    import ray

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, EngramError):
            raise cause from e
        raise


class PoolAdmin(TableAdmin):
    """The TableAdmin of a memory pool."""

    def __init__(self, pool: MemoryPool, token: str | None = None, deadline_s: float = 60.0):
        self.pool = pool
        self.token = token or pool.config.token
        self.deadline_s = deadline_s
        self.where = f"memory pool {pool.config.name!r}"

    def _directory(self) -> dict:
        return ray_get(self.pool.directory.state.remote())

    def _require(self, table: str, state: dict | None = None) -> dict:
        """The directory's record of a table (NotFound if the pool has none)."""
        tables = (state or self._directory())["tables"]
        if table not in tables:
            raise NotFound(f"the {self.where} has no table {shown(table)}", reason="TABLE_NOT_FOUND")
        return tables[table]

    def list_tables(self) -> list[TableInfo]:
        """Every table of the pool, by name."""
        return [self.info(name) for name in sorted(self._directory()["tables"])]

    def info(self, table: str) -> TableInfo:
        """A table as shard 0 holds it, with the directory's active version, swap history and shard map."""
        state = self._directory()
        record = self._require(table, state)
        meta = TableMeta.from_json(ray_get(self.pool.shards[0].table_meta.remote(table)))
        placement = {"addresses": state["addresses"], "epoch": state["epoch"], "bounds": record["bounds"]}
        return TableInfo.from_meta(meta, active=record["active"], history=record.get("history", []), placement=placement)

    def create_table(self, table: str, spec: EngramSpec, compression_map: np.ndarray | None = None,
                     init_std: float = 1.0, init_seed: int = 0, chunk_rows: int = 0) -> TableInfo:
        """Split the rows into equal ranges over the shards (each shard materializes only its rows); version 1 active."""
        check_table_name(table)
        state = self._directory()
        if table in state["tables"]:
            raise AlreadyExists(f"table {shown(table)} already exists on the {self.where}")
        chunk_rows = chunk_rows or DEFAULT_CHUNK_ROWS
        layer_rows = layer_rows_for_spec(spec)
        bounds = ShardMap.even(state["addresses"], layer_rows, chunk_rows).bounds
        ray_get(self.pool.directory.set_table.remote(table, bounds, 1, layer_rows, chunk_rows))
        self.pool.push_ownership()
        cmap = None if compression_map is None else np.ascontiguousarray(compression_map, dtype="<i8").tobytes()
        try:
            ray_get([s.create_table.remote(table, spec.to_json(), cmap, init_std, init_seed, chunk_rows) for s in self.pool.shards])
        except Exception:
            ray_get(self.pool.directory.drop_table.remote(table))  # a refused table leaves nothing behind
            self.pool.push_ownership()  # the shards follow the directory's epoch
            ray_get([s.drop_table_if_present.remote(table) for s in self.pool.shards])
            raise
        return self.info(table)

    def create_version(self, table: str, copy_of: int | None = None, init_std: float | None = None,
                       init_seed: int = 0) -> int:
        """A new (inactive) version on every shard; returns its number."""
        record = self._require(table)
        if copy_of == 0:
            copy_of = record["active"]  # the pool's active version, whatever a shard thinks
        if copy_of is None and init_std is None:
            init_std = 0.0  # empty
        versions = set(ray_get([s.create_version.remote(table, copy_of, init_std, init_seed) for s in self.pool.shards]))
        if len(versions) != 1:
            raise FailedPrecondition(f"shards disagree on the new version of {shown(table)}: {sorted(versions)}",
                                     reason="VERSIONS_DIVERGED")
        return versions.pop()

    def swap(self, table: str, version: int, remember: bool = True) -> tuple[int, int]:
        """Make `version` active on every shard as one directory step (one epoch); returns (active, previous)."""
        previous = self._require(table)["active"]
        if version < 1:
            raise InvalidArgument("swap needs a version number (>= 1)")
        for shard, versions in enumerate(ray_get([s.versions.remote(table) for s in self.pool.shards])):
            if version not in versions:
                raise NotFound(f"shard {shard} has no version {version} of {shown(table)} (it has {versions})",
                               reason="VERSION_NOT_FOUND")
        ray_get([s.swap.remote(table, version) for s in self.pool.shards])
        ray_get(self.pool.directory.set_active.remote(table, version, remember))
        self.pool.push_ownership()
        return version, previous

    def rollback(self, table: str) -> tuple[int, int]:
        """Re-activate the version active before the last swap, on every shard; returns (active, previous)."""
        self._require(table)
        previous = ray_get(self.pool.directory.previous_active.remote(table))
        if previous is None:
            raise FailedPrecondition(f"table {shown(table)} has no earlier active version to roll back to",
                                     reason="NO_EARLIER_VERSION")
        active, was = self.swap(table, previous, remember=False)
        ray_get(self.pool.directory.forget_previous.remote(table))
        return active, was

    def drop_version(self, table: str, version: int) -> None:
        """Delete an inactive version on every shard."""
        if version == self._require(table)["active"]:
            raise FailedPrecondition(f"version {version} of {shown(table)} is active; swap to another version first",
                                     reason="VERSION_ACTIVE")
        ray_get([s.drop_version.remote(table, version) for s in self.pool.shards])
        ray_get(self.pool.directory.forget_version.remote(table, version))  # rollback never returns to it

    def drop_table(self, table: str) -> None:
        """Delete a table from every shard, then from the directory."""
        self._require(table)
        ray_get([s.drop_table_if_present.remote(table) for s in self.pool.shards])
        ray_get(self.pool.directory.drop_table.remote(table))
        self.pool.push_ownership()

    def data_client(self, table: str, version: int = 0, spec: EngramSpec | None = None) -> MemoryClient:
        """A MemoryClient of the table that follows the directory (pinned to `version` when given)."""
        self._require(table)
        return self.pool.client(table, token=self.token, deadline_s=self.deadline_s, version=version, spec=spec)
