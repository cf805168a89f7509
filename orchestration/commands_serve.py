"""`engram serve-model [start] | scale N | status | down`: a model served by Ray Serve (orchestration/serve_model.py)."""

from __future__ import annotations

import json
import sys

from orchestration.commands_memory import token_from
from orchestration.ray_cluster import connect_ray


def serve_model(args) -> int:
    """engram serve-model [start] | scale N | status | down."""
    connect_ray(args.address)  # before Ray Serve is imported: a local head's settings must be in place first
    from orchestration.serve_model import deploy, down, scale, status

    if args.action == "start":
        if not args.checkpoint:
            raise ValueError("engram serve-model needs --checkpoint DIR (an engram train checkpoint)")
        url = deploy(args.checkpoint, args.memory, args.replicas, args.name, args.route_prefix, args.host, args.port,
                     args.version, token_from(args), args.device, args.max_batch, args.cache_mb, args.replica_cpus,
                     args.proxies, log=lambda m: print(m, file=sys.stderr))
        result = {**status(args.name), "url": url}
    elif args.action == "scale":
        if args.num_replicas is None:
            raise ValueError("engram serve-model scale needs the number of replicas")
        result = scale(args.num_replicas, args.name)
    elif args.action == "status":
        result = status(args.name)
    else:
        down(args.name)
        result = {"application": args.name, "status": "DELETED"}
    print(json.dumps(result, indent=2))
    return 0
