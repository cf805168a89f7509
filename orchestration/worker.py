"""Model worker: a Trainer run as a Ray actor on a GPU node (or a CPU node when there are no GPUs).

The worker's Engram tables are the memory pool's (the directory gives it the shard map);
its prefetcher sends all Engram layers' lookups at the start of a step and each Engram
layer waits only for its own rows. Several workers train data-parallel: `setup` joins
them into one torch.distributed group (see model_worker/data_parallel.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from model_worker.device import cuda_unavailable_reason, resolve_device, use_device
from model_worker.train import TrainConfig, Trainer
from orchestration.pool_tables import tables_for

REPORT_EVERY_S = 0.5  # progress sent to the training job at most this often

log = logging.getLogger("engram.worker")


class TrainWorker:
    """Trains (and generates) with tables on the memory pool; one rank of a data-parallel group."""

    def __init__(self, config: dict, token: str | None = None, tokenizer_json: bytes | None = None, reporter=None):
        """tokenizer_json: the driver's tokenizer file, written here when its path does not exist on this node.
        reporter: an actor with report(progress) (the training job): rank 0 sends its progress there."""
        from memory_service.malloc_tuning import tune_glibc_malloc

        tune_glibc_malloc()  # step buffers stay mapped between steps (a Ray worker starts with glibc defaults)
        config = dict(config)
        if tokenizer_json is not None and (not config.get("tokenizer") or not os.path.exists(config["tokenizer"])):
            config["tokenizer"] = str(local_tokenizer_copy(tokenizer_json))
        self.config = TrainConfig(**config)
        self.token = token
        self.reporter = reporter
        self._reported = 0.0
        self._trainer: Trainer | None = None

    def rendezvous(self) -> str:
        """HOST:PORT on this worker's node where a data-parallel group can meet (ask rank 0)."""
        import ray

        from model_worker.data_parallel import free_port

        host = ray.util.get_node_ip_address()
        return f"{host}:{free_port(host)}"

    def device_for(self, requested: str = "auto") -> str:
        """The device this worker would compute on for `requested` (auto, cpu, cuda): the driver asks rank 0 and
        hands the answer to every rank. Refuses cuda this worker cannot use, naming the cause."""
        device = resolve_device(requested)
        if device.type == "cpu" and requested in (None, "auto"):
            reason = cuda_unavailable_reason()
            if _ray_gpu_ids():  # Ray gave this actor a GPU that torch cannot use: say so, in the worker's log
                log.warning("Ray assigned GPU ids %s to this worker but it runs on the CPU: %s", _ray_gpu_ids(), reason)
        return str(device)

    def setup(self, rank: int = 0, world_size: int = 1, master: str | None = None, state: dict | None = None,
              device: str | None = None) -> int:
        """Join the data-parallel group (every rank at once), build the Trainer, continue from `state`; returns the step.
        device: the driver's choice for the whole group (device_for on rank 0); a rank that cannot use it fails here,
        before any collective, with the cause."""
        import dataclasses

        from model_worker.data_parallel import DataParallel

        if device is not None:
            self.config = dataclasses.replace(self.config, device=device)
        chosen = resolve_device(self.config.device)  # raises now, naming the cause, instead of hanging the group
        use_device(chosen)  # before joining: NCCL binds to the current GPU
        parallel = DataParallel.join(master, rank, world_size, chosen) if world_size > 1 else None
        tables = tables_for(self.config.memory, self.config.table or f"engram-{self.config.preset}", self.token,
                            self.config.version)
        self._trainer = Trainer(self.config, tables, progress=False, log=lambda *a: None, token=self.token,
                                parallel=parallel, on_step=self._report if rank == 0 and self.reporter else None)
        if state is not None:
            self._trainer.load_state(state)
        return self._trainer.step

    def _report(self, step: int, steps: int, loss: float, tokens_per_s: float) -> None:
        """Send rank 0's progress to the reporter (fire and forget, throttled)."""
        now = time.monotonic()
        if now - self._reported >= REPORT_EVERY_S or step == steps:
            self._reported = now
            self.reporter.report.remote({"step": step, "steps": steps, "loss": loss, "tokens_per_s": tokens_per_s,
                                         "val_loss": self._trainer.history["val"][-1][1] if self._trainer.history["val"] else None})

    @property
    def trainer(self) -> Trainer:
        """The Trainer (a lone worker builds it on first use)."""
        if self._trainer is None:
            self.setup()
        return self._trainer

    def run(self, stop_after: int | None = None, save_at_stop: bool = True) -> dict:
        """Train; returns the summary (with the loss history and where this worker ran)."""
        started = time.perf_counter()
        summary = self.trainer.run(stop_after=stop_after, save_at_stop=save_at_stop)
        summary["wall_seconds"] = time.perf_counter() - started
        summary["history"] = self.trainer.history
        summary["node_id"] = node_id()
        summary["rank"] = self.trainer.parallel.rank
        return summary

    def state(self) -> dict:
        """The run's state (dense model, optimizer, step, RNGs, history) for a re-formed group."""
        return self.trainer.state()

    def step(self) -> int:
        """Optimizer steps done."""
        return self.trainer.step

    def leave(self) -> None:
        """Leave the data-parallel group (before this actor is killed)."""
        self.trainer.wait_for_push()
        self.trainer.parallel.leave()

    def generate(self, prompt: str, max_new_tokens: int = 80, temperature: float = 0.8, seed: int = 0) -> str:
        """A completion through the pool, by the decoding engine (each new token fetches only its own rows)."""
        from model_worker.engine import DecodingEngine

        engine = DecodingEngine(self.trainer.model, self.trainer.fetcher, max_batch=1, prefetch=self.trainer.config.prefetch)
        return engine.complete(self.trainer.corpus.tokenizer(), prompt, max_new_tokens, temperature, seed=seed)

    def where(self) -> str:
        """Ray node id of this worker."""
        return node_id()


def local_tokenizer_copy(tokenizer_json: bytes) -> Path:
    """The driver's tokenizer, saved under this node's cache (named by content, written once)."""
    from model_worker.data import cache_dir

    path = cache_dir() / f"tokenizer-shipped-{hashlib.sha256(tokenizer_json).hexdigest()[:16]}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(tokenizer_json)
        tmp.replace(path)
    return path


def _ray_gpu_ids() -> list:
    """GPU ids Ray assigned to this actor ([] outside Ray)."""
    try:
        import ray

        return list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return []


def node_id() -> str | None:
    """Ray node id of the current process (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        return None


def worker_options(ray) -> dict:
    """Actor options for a model worker: one GPU when the cluster has GPUs, else one CPU."""
    has_gpu = any(n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0 for n in ray.nodes())
    return {"num_gpus": 1, "num_cpus": 0} if has_gpu else {"num_cpus": 1}
