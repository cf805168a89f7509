"""`engram cluster up|status|down`, `engram shards scale`, `engram workers scale|status`."""

from __future__ import annotations

import json
import sys

from orchestration.commands_memory import token_from
from orchestration.ray_cluster import connect_ray, start_local_head, stop_local_head

RAY_CALL_TIMEOUT_S = 120


def cluster(args) -> int:
    """engram cluster up|status|down."""
    from orchestration.pool import MemoryPool, PoolConfig

    if args.action == "up":
        address = args.address
        if address is None:  # start a local head with the memory resource, on loopback
            address = start_local_head(args.ray_port, {args.memory_resource: max(args.shards, 1) * 2})
        connect_ray(address)
        pool = MemoryPool(PoolConfig(name=args.pool, num_shards=args.shards, base_dir=args.pool_dir or "",
                                     memory_resource=args.memory_resource, token=token_from(args), detached=True,
                                     host=args.host or ("auto" if args.address else "127.0.0.1"),
                                     metrics_port=args.metrics_port,
                                     allow_unauthenticated=args.allow_unauthenticated)).start()
        print(json.dumps({"ray_address": address, "pool": args.pool, "shards": pool.state()["addresses"]}, indent=2))
        return 0
    ray = connect_ray(args.address)
    if args.action == "status":
        state = MemoryPool.attach(args.pool).state()
        if state.get("config", {}).get("token"):
            state["config"]["token"] = "(set)"  # never printed
        print(json.dumps(state, indent=2, default=str))
    elif args.action == "down":
        MemoryPool.attach(args.pool).shutdown()
        ray.shutdown()
        if args.stop_ray:
            stop_local_head()
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


def workers(args) -> int:
    """engram workers scale M | status: the data-parallel workers of a pool's training job."""
    from orchestration.workers import attach_job

    ray = connect_ray(args.address)
    job = attach_job(args.pool)
    if args.action == "scale":
        if args.num_workers is None:
            raise ValueError("engram workers scale needs the number of workers")
        status = ray.get(job.scale.remote(args.num_workers), timeout=RAY_CALL_TIMEOUT_S)
        print(f"training job on pool {args.pool!r}: {status['workers']} workers now, {args.num_workers} from the next "
              f"segment (step {status['step']} of {status['steps']})", file=sys.stderr)
    else:
        status = ray.get(job.status.remote(), timeout=RAY_CALL_TIMEOUT_S)
    print(json.dumps(status))
    return 0
