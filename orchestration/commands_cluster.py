"""`engram cluster up|status|down`, `engram shards scale`, and table commands routed through the directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from orchestration.commands_model import token_from

LOCAL_ADDRESS_FILE = "~/.cache/engram/ray_address"
# A local head started by `engram cluster up` listens on loopback only: Ray resolves its nodes to
# 127.0.0.1 and skips its own token auth (the memory service's token still guards writes).
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def connect_ray(address: str | None):
    """ray.init against an existing cluster (--address, $RAY_ADDRESS, or the one engram cluster up started).

    A no-op when this process is already connected (a Ray worker or a driver that called ray.init).
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return sys.modules["ray"]
    address = address or os.environ.get("RAY_ADDRESS") or _saved_address()
    if not address:
        raise ValueError("no Ray cluster: pass --address HOST:PORT (or run engram cluster up)")
    if address.startswith("127.0.0.1") or address.startswith("localhost"):
        os.environ.update(LOCAL_RAY_ENV)
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray


def _saved_address() -> str | None:
    path = os.path.expanduser(LOCAL_ADDRESS_FILE)
    return open(path).read().strip() if os.path.exists(path) else None


def cluster(args) -> int:
    """engram cluster up|status|down."""
    from orchestration.pool import MemoryPool, PoolConfig

    if args.action == "up":
        address = args.address
        if address is None:  # start a local head with the memory resource, on loopback
            env = dict(os.environ, **LOCAL_RAY_ENV)
            resources = json.dumps({args.memory_resource: max(args.shards, 1) * 2})
            subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--port", str(args.ray_port),
                            "--resources", resources, "--include-dashboard=false", "--disable-usage-stats"],
                           check=True, env=env, stdout=subprocess.DEVNULL)
            address = f"127.0.0.1:{args.ray_port}"
            os.makedirs(os.path.dirname(os.path.expanduser(LOCAL_ADDRESS_FILE)), exist_ok=True)
            with open(os.path.expanduser(LOCAL_ADDRESS_FILE), "w") as f:
                f.write(address)
        connect_ray(address)
        pool = MemoryPool(PoolConfig(name=args.pool, num_shards=args.shards, base_dir=args.pool_dir or "",
                                     memory_resource=args.memory_resource, token=token_from(args), detached=True)).start()
        print(json.dumps({"ray_address": address, "pool": args.pool, "shards": pool.state()["addresses"]}, indent=2))
        return 0
    ray = connect_ray(args.address)
    if args.action == "status":
        state = MemoryPool.attach(args.pool).state()
        print(json.dumps(state, indent=2, default=str))
    elif args.action == "down":
        MemoryPool.attach(args.pool).shutdown()
        ray.shutdown()
        if args.stop_ray:
            subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop"], check=False, stdout=subprocess.DEVNULL)
            path = os.path.expanduser(LOCAL_ADDRESS_FILE)
            if os.path.exists(path):
                os.remove(path)
        print(f"pool {args.pool!r} stopped")
    return 0


def shards(args) -> int:
    """engram shards scale N."""
    from orchestration.pool import MemoryPool

    connect_ray(args.address)
    pool = MemoryPool.attach(args.pool)
    result = pool.scale(args.num_shards, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result))
    return 0


def pool_table(args) -> int:
    """engram pool-table swap|rollback|info|list|new-version: table versions across every shard of a pool."""
    from orchestration.pool import MemoryPool

    connect_ray(args.address)
    pool = MemoryPool.attach(args.pool)
    if args.action == "list":
        print(json.dumps(pool.tables()))
    elif args.action == "info":
        shard_map, active = pool.shard_map(args.table)
        print(json.dumps({"table": args.table, "active_version": active, "epoch": shard_map.epoch,
                          "addresses": shard_map.addresses, "bounds": shard_map.bounds}, indent=2))
    elif args.action == "new-version":
        print(pool.create_version(args.table, copy_of=args.copy_of))
    elif args.action == "swap":
        print(f"{args.table}: active version {args.version} on every shard (epoch {pool.swap(args.table, args.version)})")
    elif args.action == "rollback":
        version, epoch = pool.rollback(args.table)
        print(f"{args.table}: rolled back to version {version} on every shard (epoch {epoch})")
    return 0
