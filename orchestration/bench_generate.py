"""`engram bench generate`: what remote tables cost a decoding engine, against the same engine on in-process tables.

One model (a seeded preset) decodes the same requests in four modes at each offered concurrency:

- in_process: the tables in the worker's memory;
- pool: a Ray memory pool (2 shards on this machine), each step's rows fetched before its forward;
- pool_prefetch: the rows sent for at the start of the step (one call per shard for both Engram
  layers), each layer's awaited where the model first uses them;
- pool_prefetch_cache: the same, with a row cache on the worker (row_cache.py).

Requests: prompts of 16-128 tokens cut from the built-in corpus's validation split, 64 new
tokens each (greedy), a fixed seed; at concurrency C each mode's engine holds C slots and gets
2C requests (at least 4), new ones each round (the same for every mode), so the cache sees fresh
traffic, not a replay; it stays warm across rounds and concurrencies, as a serving worker's would.

The modes take turns step by step (_interleaved_round): one decoding step of each engine in
turn, in a new seeded random order every turn, so every mode meets the machine as it is at that
moment (this machine's speed drifts by 10-40% within a minute, measured as CPU ms per step of the
same model). A mode's tokens/s is its new tokens over the sum of its own steps' wall time; the
ratio is paired, each round's tokens/s over in_process's in that round, the median over rounds.
Prefetch wait: the time a forward pass waited for rows (for `pool`, the whole blocking lookup).
CPU ms a step: the worker process's (model, client, cache) and the shard processes' (Linux /proc).
The row cache counts time (its staleness bound, its version check) over its own mode's steps only,
as if that mode ran alone.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import numpy as np

MODES = ("in_process", "pool", "pool_prefetch", "pool_prefetch_cache")


def _prompts(val_ids: np.ndarray, count: int, rng) -> list[np.ndarray]:
    """count prompts of 16-128 tokens from the validation tokens."""
    lengths = rng.integers(16, 129, count)
    starts = rng.integers(0, len(val_ids) - 129, count)
    return [np.asarray(val_ids[s:s + n], dtype=np.int64) for s, n in zip(starts, lengths)]


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (Linux /proc; nan elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class _StepClock:
    """Seconds spent inside one mode's steps only: the row cache's clock in an interleaved run, so its staleness
    bound and version check count the time of its own traffic, as they would if it ran alone."""

    def __init__(self):
        self.total, self.since = 0.0, None

    def __call__(self) -> float:
        return self.total + (time.perf_counter() - self.since if self.since is not None else 0.0)

    def start(self) -> None:
        self.since = time.perf_counter()

    def stop(self) -> None:
        self.total, self.since = self(), None


def _interleaved_round(engines: dict, prompts: list, new_tokens: int, shard_pids: list[int], cache, clock: _StepClock,
                       rng) -> dict:
    """Every mode decodes the same prompts, one engine step per mode in turn (in a new random order each turn), so
    all modes meet the same machine at the same time and none always follows the same other; each mode's time is the
    sum of its own steps."""
    measured = {mode: {"tokens": 0, "seconds": 0.0, "steps": 0, "wait_s": 0.0, "worker_cpu_s": 0.0, "shard_cpu_s": 0.0,
                       "hits": 0, "probes": 0} for mode in engines}
    futures = {mode: [engine.submit(p, new_tokens) for p in prompts] for mode, engine in engines.items()}
    modes = list(engines)
    while True:
        running = [modes[i] for i in rng.permutation(len(modes)) if not all(f.done() for f in futures[modes[i]])]
        if not running:
            break
        for mode in running:
            engine, m = engines[mode], measured[mode]
            wait_before, cache_before = engine.stats["wait_s"], cache.stats()
            cpu_before = (time.process_time(), _cpu_seconds(shard_pids))
            if mode == "pool_prefetch_cache":
                clock.start()
            started = time.perf_counter()
            m["tokens"] += engine.step()
            m["seconds"] += time.perf_counter() - started
            if mode == "pool_prefetch_cache":
                clock.stop()
            cpu_after = (time.process_time(), _cpu_seconds(shard_pids))
            m["steps"] += 1
            m["wait_s"] += engine.stats["wait_s"] - wait_before
            m["worker_cpu_s"] += cpu_after[0] - cpu_before[0]
            m["shard_cpu_s"] += cpu_after[1] - cpu_before[1]
            cache_after = cache.stats()
            m["hits"] += cache_after["hits"] - cache_before["hits"]
            m["probes"] += cache_after["hits"] + cache_after["misses"] - cache_before["hits"] - cache_before["misses"]
    for fs in futures.values():
        for f in fs:
            f.result()  # a failed request fails the benchmark
    return measured


def bench_generate(preset: str = "small", concurrency: tuple[int, ...] = (1, 8, 32, 128), new_tokens: int = 64,
                   rounds: int = 1, cache_mb: int = 64, seed: int = 0, shards: int = 2, log=print) -> dict:
    """tokens/s per (mode, concurrency), the ratio to in_process at the same concurrency, cache hit rate and
    prefetch wait per step."""
    import torch

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from memory_service.compression import CompressedTokenizer
    from memory_service.hashing import NgramHasher
    from memory_service.local_table import LocalTable
    from memory_service.table_meta import layer_rows_for_spec
    from model_worker.data import load_corpus
    from model_worker.device import pick_device
    from model_worker.engine import DecodingEngine
    from model_worker.engram_rows import EngramRowFetcher
    from model_worker.model import EngramMoEModel
    from model_worker.presets import build_preset
    from model_worker.row_cache import CachedTables, RowCache
    from orchestration.pool import MemoryPool, PoolConfig
    from orchestration.pool_admin import PoolAdmin
    from orchestration.pool_tables import tables_for

    corpus = load_corpus(log=log)
    compressor = CompressedTokenizer.from_tokenizer_file(corpus.tokenizer_path)
    base = build_preset(preset, corpus.vocab_size, corpus.pad_id)
    if 128 + new_tokens > base.max_seq_len:
        raise ValueError(f"preset {preset} holds {base.max_seq_len} positions: 128-token prompts + {new_tokens} do not fit")
    spec = base.engram.with_compression(compressor.lookup_table, len(compressor))
    config = dataclasses.replace(base, engram=spec)
    hasher = NgramHasher.from_compressor(spec, compressor)
    device = pick_device()
    torch.manual_seed(seed)
    model = EngramMoEModel(config).to(device).eval()
    rng = np.random.default_rng(seed)
    # each round its own requests (the same for every mode), and the warm-up others again: nothing is replayed
    requests = {(c, r): _prompts(corpus.val_ids, max(4, 2 * c), rng) for c in concurrency for r in range(rounds)}
    warmups = {c: _prompts(corpus.val_ids, min(c, 4), rng) for c in concurrency}

    ray.init(address="local", num_cpus=max(2, shards + 1), resources={"engram_memory": shards}, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    pool = None
    backends = []
    try:
        pool = MemoryPool(PoolConfig(name="bench-generate", num_shards=shards, base_dir=tempfile.mkdtemp(prefix="engram-bench-gen-"),
                                     token="bench", host="127.0.0.1")).start()
        PoolAdmin(pool).create_table("bench", spec, compressor.lookup_table, init_std=1.0, init_seed=seed)
        tables = tables_for("pool:bench-generate", "bench", token="bench")

        def remote():
            backends.append(tables.open(spec, compressor.lookup_table, create=False))
            return backends[-1]

        local = LocalTable(spec, layer_rows_for_spec(spec), init_std=1.0, init_seed=seed)  # the pool's rows
        behind_cache = remote()
        clock = _StepClock()  # the cache's time: its own steps only (see _interleaved_round)
        cached = CachedTables(behind_cache, RowCache(cache_mb << 20, list(spec.layer_ids), behind_cache.row_width,
                                                     behind_cache.dtype, clock=clock))
        fetchers = {"in_process": (EngramRowFetcher(local, compressor, hasher, device), False),
                    "pool": (EngramRowFetcher(remote(), compressor, hasher, device), False),
                    "pool_prefetch": (EngramRowFetcher(remote(), compressor, hasher, device), True),
                    "pool_prefetch_cache": (EngramRowFetcher(cached, compressor, hasher, device), True)}
        shard_pids = [d["pid"] for d in pool.state()["shards"]]
        cpu = {(m, c): [] for m in MODES for c in concurrency}  # (worker, shards) CPU ms a step
        times = {(m, c): [] for m in MODES for c in concurrency}
        waits = {(m, c): [] for m in MODES for c in concurrency}
        hits = {c: [] for c in concurrency}
        for c in concurrency:
            engines = {m: DecodingEngine(model, fetcher, max_batch=c, prefetch=prefetch)
                       for m, (fetcher, prefetch) in fetchers.items()}
            for engine in engines.values():  # warm-up: allocator, first lookups
                engine.generate(warmups[c], 4)
            for r in range(rounds):
                measured = _interleaved_round(engines, requests[(c, r)], new_tokens, shard_pids, cached.cache, clock,
                                              np.random.default_rng([seed, c, r]))
                for mode, m in measured.items():
                    steps = max(1, m["steps"])
                    times[(mode, c)].append(m["tokens"] / m["seconds"])
                    waits[(mode, c)].append(1e3 * m["wait_s"] / steps)
                    cpu[(mode, c)].append((1e3 * m["worker_cpu_s"] / steps, 1e3 * m["shard_cpu_s"] / steps))
                    if mode == "pool_prefetch_cache":
                        hits[c].append(m["hits"] / max(1, m["probes"]))
                    log(f"  concurrency {c:4d}  {mode:20s} {times[(mode, c)][-1]:9.1f} tokens/s  CPU ms/step: worker "
                        f"{cpu[(mode, c)][-1][0]:.1f}, shards {cpu[(mode, c)][-1][1]:.1f}  ({m['steps']} steps)")
    finally:
        for backend in backends:
            backend.close()
        if pool is not None:
            pool.shutdown()
        ray.shutdown()
    results = []
    for c in concurrency:
        for mode in MODES:
            tps = float(np.median(times[(mode, c)]))
            # paired: each round's tokens/s over in_process's in the same round (this machine drifts between rounds)
            ratio = float(np.median(np.array(times[(mode, c)]) / np.array(times[("in_process", c)])))
            results.append({"mode": mode, "concurrency": c, "tokens_per_s": tps, "ratio": ratio,
                            "cache_hit_rate": float(np.median(hits[c])) if mode == "pool_prefetch_cache" else None,
                            "prefetch_wait_ms": float(np.median(waits[(mode, c)])),
                            "worker_cpu_ms": float(np.median([w for w, _ in cpu[(mode, c)]])),
                            "shard_cpu_ms": float(np.median([s for _, s in cpu[(mode, c)]]))})
    lines = [f"generate ({preset}, {new_tokens} new tokens a request, prompts 16-128 tokens, device {device}, "
             f"{shards}-shard pool, cache {cache_mb} MiB, {rounds} round(s), modes interleaved step by step)",
             f"  {'concurrency':>11s}  {'mode':20s} {'tokens/s':>9s}  {'ratio':>5s}  {'hit rate':>8s}  {'wait ms/step':>12s}  "
             f"{'CPU ms/step: worker':>19s}  {'shards':>6s}"]
    for r in results:
        hit = "" if r["cache_hit_rate"] is None else f"{r['cache_hit_rate']:.2f}"
        lines.append(f"  {r['concurrency']:11d}  {r['mode']:20s} {r['tokens_per_s']:9.1f}  {r['ratio']:5.3f}  {hit:>8s}  "
                     f"{r['prefetch_wait_ms']:12.2f}  {r['worker_cpu_ms']:19.1f}  {r['shard_cpu_ms']:6.1f}")
    return {"preset": preset, "device": str(device), "new_tokens": new_tokens, "results": results, "lines": lines}


def plot_generate(result: dict, path: str) -> None:
    """tokens/s against concurrency, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in MODES:
        points = [(r["concurrency"], r["tokens_per_s"]) for r in result["results"] if r["mode"] == mode]
        ax.plot(*zip(*points), "o-", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("offered concurrency (requests in the batch)")
    ax.set_ylabel("new tokens / s")
    ax.set_title(f"engram bench generate ({result['preset']}, {result['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
