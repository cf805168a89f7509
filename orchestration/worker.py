"""Model worker: a Trainer run as a Ray actor on a GPU node (or a CPU node when there are no GPUs).

The worker's Engram tables are the memory pool's (the directory gives it the shard map);
its prefetcher sends all Engram layers' lookups at the start of a step and each Engram
layer waits only for its own rows.
"""

from __future__ import annotations

import time

from model_worker.train import Trainer, TrainConfig


class TrainWorker:
    """Trains (and generates) with tables on the memory pool."""

    def __init__(self, config: dict, token: str | None = None):
        self.config = TrainConfig(**config)
        self.trainer = Trainer(self.config, progress=False, log=lambda *a: None, token=token)

    def run(self, stop_after: int | None = None) -> dict:
        """Train; returns the summary (with the loss history and where this worker ran)."""
        started = time.perf_counter()
        summary = self.trainer.run(stop_after=stop_after)
        summary["wall_seconds"] = time.perf_counter() - started
        summary["history"] = self.trainer.history
        summary["node_id"] = node_id()
        return summary

    def generate(self, prompt: str, max_new_tokens: int = 80, temperature: float = 0.8, seed: int = 0) -> str:
        """A completion through the pool (KV cache; each new token fetches only its own rows)."""
        from model_worker.generate import Generator

        generator = Generator(self.trainer.model, self.trainer.fetcher, self.trainer.corpus.tokenizer())
        return generator.generate(prompt, max_new_tokens, temperature, seed=seed)

    def where(self) -> str:
        """Ray node id of this worker."""
        return node_id()


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
