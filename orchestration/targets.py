"""What a command acts on: one memory service (--address) or a Ray memory pool (--ray), and the token.

This is the only place that decides between the two: `open_admin(args)` returns a
TableAdmin and `open_data_client(args)` a MemoryClient, and the table and query commands
work through those interfaces alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from memory_service.admin.table_admin import TableAdmin
from memory_service.client import MemoryClient


def token_from(args) -> str | None:
    """The write/admin token: --token, else $ENGRAM_TOKEN."""
    return getattr(args, "token", None) or os.environ.get("ENGRAM_TOKEN") or None


def open_admin(args) -> TableAdmin:
    """The TableAdmin of `--ray RAY_ADDRESS [--pool NAME]` (a pool, through its directory) or of `--address HOST:PORT`."""
    if getattr(args, "ray", None):
        from orchestration.pool import MemoryPool
        from orchestration.pool_admin import PoolAdmin
        from orchestration.ray_cluster import connect_ray

        connect_ray(args.ray)
        return PoolAdmin(MemoryPool.attach(args.pool), token=token_from(args), deadline_s=args.deadline)
    from memory_service.admin import ServiceAdmin

    tls = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return ServiceAdmin(args.address, token=token_from(args), deadline_s=args.deadline, tls_root_cert=tls)


def open_data_client(args, table: str, version: int = 0) -> MemoryClient:
    """A MemoryClient of a table on `--address` or on the pool of `--ray` (pinned to `version`, 0: the active one)."""
    if getattr(args, "ray", None):
        admin = open_admin(args)
        return admin.data_client(table, version)
    tls = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return MemoryClient(args.address, table, token=token_from(args), deadline_s=args.deadline, tls_root_cert=tls,
                        version=version)
