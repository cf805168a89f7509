"""ServiceAdmin: table administration of one memory service over gRPC (`engram table ... --address`).

Changes go to every address given (a service split over a static list of servers takes
the same call on each); reads ask the first. Admin calls need the service's token.
"""

from __future__ import annotations

import numpy as np

from memory_service.admin.table_admin import TableAdmin, TableInfo, VersionInfo
from memory_service.client import MemoryClient, ShardChannels
from memory_service.errors import FailedPrecondition
from memory_service.spec import EngramSpec
from memory_service.wire import encode_ids, enum_dtype
from protos import engram_pb2 as pb


def table_info(message: pb.TableInfo, addresses: list[str]) -> TableInfo:
    """TableInfo of a TableInfo message from a service at `addresses`."""
    return TableInfo(name=message.name, spec=EngramSpec.from_json(message.spec_json), active_version=message.active_version,
                     versions=tuple(VersionInfo(v.version, v.source, v.created_unix) for v in message.versions),
                     swap_history=tuple(message.swap_history), layer_rows=dict(message.layer_rows),
                     chunk_rows=message.chunk_rows, dtype=enum_dtype(message.dtype).name,
                     has_compression_map=message.has_compression_map,
                     placement={"addresses": list(addresses), "epoch": 0, "bounds": {}})


class ServiceAdmin(TableAdmin):
    """The TableAdmin of a memory service at one address (or a static list of them)."""

    def __init__(self, addresses: str | list[str], token: str | None = None, deadline_s: float = 60.0,
                 tls_root_cert: bytes | None = None):
        self.channels = ShardChannels(addresses, token, deadline_s, tls_root_cert=tls_root_cert)
        self.where = ", ".join(f"grpc://{a}" for a in self.channels.shard_map.addresses)

    def list_tables(self) -> list[TableInfo]:
        """Every table on the (first) service."""
        reply = self.channels.call(0, "ListTables", pb.ListTablesRequest())
        return [table_info(t, self.channels.shard_map.addresses) for t in reply.tables]

    def info(self, table: str) -> TableInfo:
        """One table."""
        return table_info(self.channels.call(0, "GetTableInfo", pb.GetTableInfoRequest(table=table)),
                          self.channels.shard_map.addresses)

    def create_table(self, table: str, spec: EngramSpec, compression_map: np.ndarray | None = None,
                     init_std: float = 1.0, init_seed: int = 0, chunk_rows: int = 0) -> TableInfo:
        """Create the table on every address; version 1 active."""
        request = pb.CreateTableRequest(
            table=table, spec_json=spec.to_json(), init_std=init_std, init_seed=init_seed, chunk_rows=chunk_rows,
            compression_map=b"" if compression_map is None else encode_ids(compression_map))
        return table_info(self.channels.broadcast("CreateTable", request, retry=False)[0], self.channels.shard_map.addresses)

    def create_version(self, table: str, copy_of: int | None = None, init_std: float | None = None,
                       init_seed: int = 0) -> int:
        """A new inactive version on every address; returns its number."""
        if copy_of is not None:
            request = pb.CreateVersionRequest(table=table, copy_of=copy_of)
        elif init_std is not None:
            request = pb.CreateVersionRequest(table=table, init_std=init_std, init_seed=init_seed)
        else:
            request = pb.CreateVersionRequest(table=table, empty=True)
        versions = {r.version for r in self.channels.broadcast("CreateVersion", request, retry=False)}
        if len(versions) != 1:
            raise FailedPrecondition(f"servers disagree on the new version number: {sorted(versions)}",
                                     reason="VERSIONS_DIVERGED")
        return versions.pop()

    def swap(self, table: str, version: int) -> tuple[int, int]:
        """Activate a version; returns (active, previous)."""
        reply = self.channels.broadcast("Swap", pb.SwapRequest(table=table, version=version))[0]
        return reply.active_version, reply.previous_version

    def rollback(self, table: str) -> tuple[int, int]:
        """Re-activate the previous version; returns (active, previous)."""
        reply = self.channels.broadcast("Rollback", pb.RollbackRequest(table=table))[0]
        return reply.active_version, reply.previous_version

    def drop_version(self, table: str, version: int) -> None:
        """Delete an inactive version."""
        self.channels.broadcast("DropVersion", pb.DropVersionRequest(table=table, version=version))

    def drop_table(self, table: str) -> None:
        """Delete the table with all its versions."""
        self.channels.broadcast("DropTable", pb.DropTableRequest(table=table))

    def data_client(self, table: str, version: int = 0, spec: EngramSpec | None = None) -> MemoryClient:
        """A MemoryClient of the table on the same addresses, with the same token."""
        channels = self.channels
        return MemoryClient(channels.shard_map, table, token=channels.token, deadline_s=channels.deadline_s,
                            tls_root_cert=channels.tls_root_cert, version=version, spec=spec)

    def close(self) -> None:
        """Close the channels."""
        self.channels.close()
