"""The memory pool: shard actors on memory nodes, the directory, and the operations across them.

Driver-side API used by the CLI, the demo and the tests:

    pool = MemoryPool(PoolConfig(num_shards=2)).start()
    admin = PoolAdmin(pool)                     # table administration (orchestration/pool_admin.py)
    admin.create_table("engram-small", spec, compression_map)
    client = pool.client("engram-small")        # a MemoryClient that follows the directory
    admin.swap("engram-small", 2)               # every shard, one epoch
    pool.scale(3)                               # rows move while traffic continues

Shards run only on nodes offering the memory resource (a custom Ray resource, default
`engram_memory`), each pinned to its node (its LMDB files live there) and restarted by
Ray when it dies. All shards of a table hold the same version numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from memory_service.client import MemoryClient
from memory_service.errors import FailedPrecondition, NotFound, shown
from memory_service.shard_map import ShardMap
from orchestration.directory import Directory
from orchestration.shard import ShardServer

NAMESPACE = "engram"
RAY_TIMEOUT_S = 300

def directory_name(pool: str) -> str:
    """Ray actor name of a pool's directory."""
    return f"engram-{pool}-directory"

def shard_name(pool: str, shard: int) -> str:
    """Ray actor name of a pool's shard."""
    return f"engram-{pool}-shard-{shard}"

class PoolError(FailedPrecondition):
    """The pool could not be started or changed (no Ray, no memory nodes): a user's setup to fix, said in one line."""

    reason = "POOL_UNAVAILABLE"

@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """Shape and placement of a memory pool."""

    name: str = "default"
    """Pool name (actor names and `--memory pool:NAME`); several pools can share a cluster."""
    num_shards: int = 2
    """Shard actors (one LMDB store and gRPC server each)."""
    base_dir: str = ""
    """Directory on each memory node for the shards' stores (default ~/.cache/engram/pool)."""
    memory_resource: str = "engram_memory"
    """Custom Ray resource that marks memory nodes; each shard takes one unit."""
    host: str = "127.0.0.1"
    """Address shards bind and advertise: 127.0.0.1 on one machine; "auto" makes each shard use its node's address."""
    token: str | None = None
    """Token for writes and admin calls."""
    metrics_port: int | None = None
    """Each shard serves Prometheus /metrics on this port + its shard id (0: any free port; None: off)."""
    detached: bool = False
    """Keep shards and the directory alive after this driver exits (engram cluster up, --keep-serving)."""
    allow_unauthenticated: bool = False
    """Let shards bound to a non-loopback host serve without a token (writes and admin open to the network)."""

    def resolved_base_dir(self) -> str:
        """base_dir, or the default under the user's cache."""
        return self.base_dir or str(Path.home() / ".cache" / "engram" / "pool")

def _ray():
    import ray

    if not ray.is_initialized():
        raise PoolError("Ray is not initialised: call ray.init() (or engram cluster up) first")
    return ray

def memory_nodes(resource: str) -> list[dict]:
    """Alive Ray nodes offering the memory resource."""
    ray = _ray()
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(resource, 0) > 0]

class MemoryPool:
    """Shard actors + directory actor, and the cross-shard operations."""

    def __init__(self, config: PoolConfig | None = None):
        self.config = config or PoolConfig()
        self.directory = None
        self.shards: list = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "MemoryPool":
        """Create (or attach to) the directory and the shard actors; returns self."""
        ray = _ray()

        cfg = self.config
        lifetime = {"lifetime": "detached"} if cfg.detached else {}
        self.directory = ray.remote(Directory).options(
            name=directory_name(cfg.name), namespace=NAMESPACE, get_if_exists=True, num_cpus=0, **lifetime).remote()
        nodes = memory_nodes(cfg.memory_resource)
        if not nodes:
            raise PoolError(f"no Ray node offers the {cfg.memory_resource!r} resource: start memory nodes with "
                            f"--resources '{{\"{cfg.memory_resource}\": 4}}' (engram cluster up does this locally)")
        self.shards = [self._start_shard(shard, nodes[shard % len(nodes)]["NodeID"]) for shard in range(cfg.num_shards)]
        addresses = ray.get([s.address.remote() for s in self.shards], timeout=RAY_TIMEOUT_S)
        ray.get(self.directory.set_config.remote(dataclasses.asdict(cfg)), timeout=RAY_TIMEOUT_S)
        state = ray.get(self.directory.state.remote(), timeout=RAY_TIMEOUT_S)
        if state["addresses"] != addresses:
            ray.get(self.directory.set_shards.remote(addresses), timeout=RAY_TIMEOUT_S)
            self.push_ownership()
        return self

    def _start_shard(self, shard: int, node_id: str):
        """A shard actor pinned to a memory node (its store lives there), restarted by Ray when it dies."""
        ray = _ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        cfg = self.config
        lifetime = {"lifetime": "detached"} if cfg.detached else {}
        return ray.remote(ShardServer).options(
            name=shard_name(cfg.name, shard), namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
            resources={cfg.memory_resource: 1}, max_restarts=-1, max_task_retries=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False), **lifetime,
        ).remote(shard, str(Path(cfg.resolved_base_dir()) / cfg.name), cfg.host, cfg.token, cfg.metrics_port,
                 cfg.allow_unauthenticated)

    @classmethod
    def attach(cls, name: str = "default") -> "MemoryPool":
        """The pool `name` already running in this Ray cluster (started by another driver or actor)."""
        ray = _ray()
        pool = cls(PoolConfig(name=name, detached=True))  # a pool found in the cluster outlives this driver
        try:
            pool.directory = ray.get_actor(directory_name(name), namespace=NAMESPACE)
        except ValueError:
            raise NotFound(f"no memory pool named {name!r} runs in this Ray cluster: start one (engram cluster up)",
                           reason="POOL_NOT_FOUND") from None
        state = ray.get(pool.directory.state.remote(), timeout=RAY_TIMEOUT_S)
        addresses = state["addresses"]
        pool.shards = [ray.get_actor(shard_name(name, i), namespace=NAMESPACE) for i in range(len(addresses))]
        if state.get("config"):  # the pool's own settings (token, host, stores): shards started by a scale get them too
            pool.config = dataclasses.replace(PoolConfig(**state["config"]), detached=True)
        pool.config = dataclasses.replace(pool.config, num_shards=len(addresses))
        return pool

    def shutdown(self) -> None:
        """Kill the shard and directory actors (their stores stay on disk)."""
        ray = _ray()
        for actor in self.shards + ([self.directory] if self.directory is not None else []):
            ray.kill(actor, no_restart=True)
        self.shards, self.directory = [], None

    # ------------------------------------------------------------------ maps
    def state(self) -> dict:
        """The directory's state plus each shard's description."""
        ray = _ray()
        state = ray.get(self.directory.state.remote(), timeout=RAY_TIMEOUT_S)
        state["shards"] = ray.get([s.describe.remote() for s in self.shards], timeout=RAY_TIMEOUT_S)
        return state

    def shard_map(self, name: str) -> tuple[ShardMap, int]:
        """(ShardMap, active version) of a table, from the directory."""
        ray = _ray()
        m = ray.get(self.directory.shard_map.remote(name), timeout=RAY_TIMEOUT_S)
        if m is None:
            raise NotFound(f"the memory pool {self.config.name!r} has no table {shown(name)}", reason="TABLE_NOT_FOUND")
        return ShardMap(m["addresses"], {int(k): v for k, v in m["bounds"].items()}, m["epoch"]), m["active"]

    def push_ownership(self) -> int:
        """Tell every shard the current epoch and the rows it owns in every table."""
        ray = _ray()
        state = ray.get(self.directory.state.remote(), timeout=RAY_TIMEOUT_S)
        calls = []
        for shard, actor in enumerate(self.shards):  # shards past the map's end own nothing (being removed)
            owned = {name: {int(l): (b[shard], b[shard + 1]) if shard + 1 < len(b) else (0, 0) for l, b in t["bounds"].items()}
                     for name, t in state["tables"].items()}
            calls.append(actor.set_owned.remote(state["epoch"], owned))
        ray.get(calls, timeout=RAY_TIMEOUT_S)
        return state["epoch"]

    def client(self, name: str, **kwargs) -> MemoryClient:
        """A MemoryClient for a table that re-reads the directory when its map goes stale (kwargs: MemoryClient's)."""
        shard_map, _ = self.shard_map(name)
        kwargs.setdefault("token", self.config.token)
        return MemoryClient(shard_map, name, map_provider=lambda: self.shard_map(name), **kwargs)

    def tables(self) -> list[str]:
        """Names of the pool's tables."""
        return sorted(_ray().get(self.directory.state.remote(), timeout=RAY_TIMEOUT_S)["tables"])

    def scale(self, num_shards: int, log=lambda *a: None) -> dict:
        """Change the number of shards while lookups and gradient pushes continue.

        New shards start empty; every row range that changes owner is frozen for writes
        on its old shard (writers get UNAVAILABLE and retry), copied with all versions and
        Adam state, then the directory flips the map (one epoch) and the shards adopt it.
        Clients holding the old map are refused (stale) and re-read the directory, so no
        request fails for good and no acknowledged update is lost.
        """
        ray = _ray()
        if num_shards < 1:
            raise ValueError(f"a pool needs at least one shard, got {num_shards}")
        old = len(self.shards)
        state = ray.get(self.directory.state.remote(), timeout=RAY_TIMEOUT_S)
        if num_shards > old:
            nodes = memory_nodes(self.config.memory_resource)
            if not nodes:
                raise PoolError(f"no Ray node offers the {self.config.memory_resource!r} resource")
            epoch = state["epoch"]
            for shard in range(old, num_shards):
                actor = self._start_shard(shard, nodes[shard % len(nodes)]["NodeID"])
                ray.get(actor.set_owned.remote(epoch, {t: {int(l): (0, 0) for l in v["bounds"]} for t, v in state["tables"].items()}),
                        timeout=RAY_TIMEOUT_S)
                for name in state["tables"]:
                    ray.get(actor.adopt_table.remote(name, self.shards[0].blueprint.remote(name)), timeout=RAY_TIMEOUT_S)
                self.shards.append(actor)
        addresses = ray.get([s.address.remote() for s in self.shards[:num_shards]], timeout=RAY_TIMEOUT_S)
        moves, new_bounds = [], {}
        for name, table in state["tables"].items():
            layer_rows = {int(k): v for k, v in table["layer_rows"].items()}
            new_bounds[name] = ShardMap.even(addresses, layer_rows, table["chunk_rows"]).bounds
            for layer, old_b in table["bounds"].items():
                new_b = new_bounds[name][int(layer)]
                for dst in range(num_shards):
                    for src in range(old):
                        lo, hi = max(new_b[dst], old_b[src]), min(new_b[dst + 1], old_b[src + 1])
                        if lo < hi and src != dst:
                            moves.append((name, int(layer), src, dst, lo, hi))
        ray.get([self.shards[src].freeze.remote(name, layer, lo, hi) for name, layer, src, dst, lo, hi in moves], timeout=RAY_TIMEOUT_S)
        moved = 0
        for name, layer, src, dst, lo, hi in moves:
            moved += ray.get(self.shards[dst].import_chunks.remote(name, layer, self.shards[src].export_chunks.remote(
                                 name, layer, lo, hi), lo, hi),
                             timeout=RAY_TIMEOUT_S)
            log(f"moved rows [{lo}, {hi}) of {name} layer {layer}: shard {src} -> {dst}")
        ray.get(self.directory.set_shards.remote(addresses), timeout=RAY_TIMEOUT_S)
        for name, table in state["tables"].items():
            ray.get(self.directory.set_table.remote(name, new_bounds[name], table["active"], table["layer_rows"], table["chunk_rows"]),
                    timeout=RAY_TIMEOUT_S)
        epoch = self.push_ownership()
        ray.get([s.unfreeze.remote(name) for s in self.shards for name in state["tables"]], timeout=RAY_TIMEOUT_S)
        ray.get([s.drop_unowned.remote(name) for s in self.shards[:num_shards] for name in state["tables"]], timeout=RAY_TIMEOUT_S)
        removed = self.shards[num_shards:]
        if removed:
            ray.get([s.destroy.remote() for s in removed], timeout=RAY_TIMEOUT_S)
            for actor in removed:
                ray.kill(actor, no_restart=True)
        self.shards = self.shards[:num_shards]
        self.config = dataclasses.replace(self.config, num_shards=num_shards)
        return {"shards": num_shards, "epoch": epoch, "moves": len(moves), "chunks_moved": moved}

    def kill_shard(self, shard: int) -> None:
        """Kill a shard's process (Ray restarts it; for tests and chaos drills)."""
        _ray().kill(self.shards[shard], no_restart=False)
