"""A memory shard: one LMDB store served by the gRPC memory service, inside a Ray actor.

`ShardServer` is a plain class (unit-testable without Ray); the pool runs it as an
actor pinned to a memory node, with unlimited restarts. A restarted actor reopens the
same store directory and binds the same port (saved beside the store), so clients
that retried through the outage find it where it was, with every acknowledged write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from memory_service.server import build_server
from memory_service.spec import EngramSpec
from memory_service.store import TableStore

SHARD_FILE = "shard.json"


def _threads() -> list[int]:
    """Thread ids of this process (Linux; none elsewhere)."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []


def thread_niceness() -> int | None:
    """The highest nice value among this process's threads (None where it cannot be read)."""
    values = []
    for tid in _threads():
        try:
            values.append(os.getpriority(os.PRIO_PROCESS, tid))
        except OSError:  # the thread ended meanwhile
            continue
    return max(values) if values else None


def serve_at_normal_priority() -> int:
    """Undo Ray's worker niceness (15) for this process's threads; returns how many threads were raised.

    Ray starts actors at nice 15 so the driver stays responsive. A memory shard is a latency-critical server: at nice
    15 beside a model worker whose compute threads spin (OpenMP), it gets a few percent of a core, and every lookup
    waits for the model to block (measured: 5-8 ms a step instead of 0.1). Threads made later (the gRPC server's)
    inherit the creating thread's nice value. Lowering nice needs CAP_SYS_NICE (root in most containers); without
    it the shard stays at Ray's niceness (set RAY_worker_niceness=0 before `ray start` instead).
    """
    raised = 0
    for tid in _threads():
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > 0:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
                raised += 1
        except OSError:  # no permission, or the thread ended meanwhile
            continue
    return raised


def node_address() -> str:
    """The address Ray knows this node by."""
    import ray

    return ray.util.get_node_ip_address()


class ShardServer:
    """Store + gRPC server of shard `shard_id` under `base_dir/shard-<id>`."""

    def __init__(self, shard_id: int, base_dir: str, host: str = "127.0.0.1", token: str | None = None,
                 metrics_port: int | None = None, allow_unauthenticated: bool = False):
        """metrics_port: serve /metrics on metrics_port + shard_id (0: any free port; None: no metrics)."""
        from memory_service.malloc_tuning import tune_glibc_malloc

        tune_glibc_malloc()  # reply buffers stay mapped between lookups (a Ray worker starts with glibc defaults)
        serve_at_normal_priority()  # before the server's threads start, so they inherit it
        host = node_address() if host == "auto" else host  # "auto": this node's own address (multi-machine clusters)
        self.shard_id = shard_id
        self.path = Path(base_dir) / f"shard-{shard_id}"
        self.path.mkdir(parents=True, exist_ok=True)
        saved = self.path / SHARD_FILE
        port = json.loads(saved.read_text())["port"] if saved.exists() else 0
        self.store = TableStore(self.path / "lmdb")
        self.server, self.port, self.servicer = build_server(self.store, host, port, token,
                                                             allow_unauthenticated=allow_unauthenticated)
        self.server.start()
        self.host = host
        self.metrics = None
        if metrics_port is not None:
            from memory_service.metrics import MetricsServer

            self.metrics = MetricsServer(self.servicer.counters, host, metrics_port + shard_id if metrics_port else 0,
                                         labels={"shard": str(shard_id)})
        saved.write_text(json.dumps({"port": self.port, "host": host}))

    def address(self) -> str:
        """host:port clients connect to."""
        return f"{self.host}:{self.port}"

    def describe(self) -> dict:
        """Address, process, node and store size of this shard."""
        node = None
        try:
            import ray

            node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - outside Ray there is no node id
            pass
        metrics = f"{self.host}:{self.metrics.port}" if self.metrics is not None else None
        return {"shard": self.shard_id, "address": self.address(), "metrics": metrics, "pid": os.getpid(),
                "nice": thread_niceness(), "node_id": node,
                "path": str(self.path), "epoch": self.store.shard_state["epoch"], **self.servicer.counters()}

    def set_owned(self, epoch: int, owned: dict[str, dict[int, tuple[int, int]]]) -> None:
        """Adopt a shard map: its epoch and this shard's row ranges per table and layer."""
        self.store.set_shard_state(epoch, owned)

    def create_table(self, name: str, spec_json: str, compression_map: bytes | None, init_std: float,
                     init_seed: int, chunk_rows: int) -> dict:
        """Create a table holding only this shard's rows; returns its info."""
        cmap = np.frombuffer(compression_map, dtype="<i8") if compression_map else None
        meta = self.store.create_table(name, EngramSpec.from_json(spec_json), cmap, init_std, init_seed, chunk_rows)
        return {"layer_rows": meta.layer_rows, "chunk_rows": meta.chunk_rows, "active": meta.active}

    def create_version(self, name: str, copy_of: int | None = None, init_std: float | None = None, init_seed: int = 0) -> int:
        """A new version of this shard's rows (a copy, seeded rows, or zeros when neither is given)."""
        return self.store.create_version(name, copy_of=copy_of, init_std=init_std, init_seed=init_seed)

    def table_meta(self, name: str) -> bytes:
        """The table's metadata document as this shard stores it (TableMeta JSON)."""
        return self.store.table_info(name).to_json()

    def drop_version(self, name: str, version: int) -> None:
        """Delete an inactive version of this shard's rows."""
        self.store.drop_version(name, version)

    def drop_table_if_present(self, name: str) -> None:
        """Delete a table's rows and versions here (nothing when this shard has no such table)."""
        if name in {m.name for m in self.store.list_tables()}:
            self.store.drop_table(name)

    def swap(self, name: str, version: int) -> None:
        """Make a version this shard's active one (the directory's active version decides for clients)."""
        self.store.swap(name, version)

    def versions(self, name: str) -> list[int]:
        """Version numbers of a table on this shard."""
        return sorted(self.store.table_info(name).versions)

    def freeze(self, name: str, layer: int, start: int, stop: int) -> None:
        """Refuse writes (UNAVAILABLE, retried by clients) to rows [start, stop) while they move."""
        self.store.freeze(name, layer, start, stop)

    def unfreeze(self, name: str) -> None:
        """Accept writes to all owned rows again."""
        self.store.unfreeze(name)

    def blueprint(self, name: str) -> dict:
        """Spec, compression map, chunking and version numbers of a table here."""
        return self.store.blueprint(name)

    def adopt_table(self, name: str, blueprint: dict) -> None:
        """Hold a table (no rows yet) with the same spec and version numbers as the other shards."""
        self.store.adopt_table(name, blueprint)

    def export_chunks(self, name: str, layer: int, start: int, stop: int) -> list[tuple[bytes, bytes]]:
        """Raw chunks (every version, rows and Adam state) covering rows [start, stop)."""
        return self.store.export_chunks(name, layer, start, stop)

    def import_chunks(self, name: str, layer: int, chunks: list[tuple[bytes, bytes]], start: int, stop: int) -> int:
        """Store chunks of a layer moved from another shard."""
        return self.store.import_chunks(name, layer, chunks, start, stop)

    def drop_unowned(self, name: str) -> int:
        """Delete chunks this shard no longer owns."""
        return self.store.drop_unowned_chunks(name)

    def destroy(self) -> None:
        """Stop and delete this shard's store (its rows live on other shards after a scale-down)."""
        import shutil

        self.stop()
        shutil.rmtree(self.path, ignore_errors=True)

    def stop(self) -> None:
        """Stop serving and close the store."""
        self.server.stop(grace=2).wait()
        self.store.close()
