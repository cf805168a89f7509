"""`engram bench generate`: what remote tables cost a decoding engine, against the same engine on in-process tables.

One model (a seeded preset, or a checkpoint's) decodes the same requests in four modes, taking
turns (round-robin) at each offered concurrency, so the machine's drift hits all of them alike:

- in_process: the tables in the worker's memory;
- pool: a Ray memory pool (2 shards on this machine), each step's rows fetched before its forward;
- pool_prefetch: the rows sent for at the start of the step, awaited by each Engram layer;
- pool_prefetch_cache: the same, with a row cache on the worker (row_cache.py).

Requests: prompts of 16-128 tokens cut from the built-in corpus's validation split, 64 new
tokens each (greedy), a fixed seed; at concurrency C the engine holds C slots and gets 2C
requests (at least 4), new ones each round (the same for every mode), so the cache sees fresh
traffic, not a replay; it stays warm across rounds and concurrencies, as a serving worker's
would. tokens/s counts new tokens over the wall time of the whole set. Prefetch wait: the time
a forward pass waited for rows (for `pool`, the whole blocking lookup).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import numpy as np

MODES = ("in_process", "pool", "pool_prefetch", "pool_prefetch_cache")


def _prompts(val_ids: np.ndarray, count: int, rng) -> list[np.ndarray]:
    """count prompts of 16-128 tokens from the validation tokens."""
    lengths = rng.integers(16, 129, count)
    starts = rng.integers(0, len(val_ids) - 129, count)
    return [np.asarray(val_ids[s:s + n], dtype=np.int64) for s, n in zip(starts, lengths)]


def bench_generate(preset: str = "small", concurrency: tuple[int, ...] = (1, 8, 32, 128), new_tokens: int = 64,
                   rounds: int = 1, cache_mb: int = 64, seed: int = 0, shards: int = 2, log=print) -> dict:
    """tokens/s per (mode, concurrency), the ratio to in_process at the same concurrency, cache hit rate and
    prefetch wait per step."""
    import os

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
        cached = CachedTables(behind_cache, RowCache(cache_mb << 20, list(spec.layer_ids), behind_cache.row_width,
                                                     behind_cache.dtype))
        fetchers = {"in_process": (EngramRowFetcher(local, compressor, hasher, device), False),
                    "pool": (EngramRowFetcher(remote(), compressor, hasher, device), False),
                    "pool_prefetch": (EngramRowFetcher(remote(), compressor, hasher, device), True),
                    "pool_prefetch_cache": (EngramRowFetcher(cached, compressor, hasher, device), True)}
        times = {(m, c): [] for m in MODES for c in concurrency}
        waits = {(m, c): [] for m in MODES for c in concurrency}
        hits = {c: [] for c in concurrency}
        for c in concurrency:
            engines = {m: DecodingEngine(model, fetcher, max_batch=c, prefetch=prefetch)
                       for m, (fetcher, prefetch) in fetchers.items()}
            for engine in engines.values():  # warm-up: allocator, first lookups
                engine.generate(warmups[c], 4)
            for r in range(rounds):
                order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]  # a different mode goes first each round
                for mode in order:
                    engine = engines[mode]
                    before = dict(engine.stats)
                    cache_before = cached.cache.stats()
                    started = time.perf_counter()
                    done = engine.generate(requests[(c, r)], new_tokens)
                    seconds = time.perf_counter() - started
                    made = sum(len(d.tokens) for d in done)
                    steps = engine.stats["steps"] - before["steps"]
                    times[(mode, c)].append(made / seconds)
                    waits[(mode, c)].append(1e3 * (engine.stats["wait_s"] - before["wait_s"]) / max(1, steps))
                    if mode == "pool_prefetch_cache":
                        after = cached.cache.stats()
                        probes = after["hits"] + after["misses"] - cache_before["hits"] - cache_before["misses"]
                        hits[c].append((after["hits"] - cache_before["hits"]) / max(1, probes))
                    log(f"  concurrency {c:4d}  {mode:20s} {made / seconds:9.1f} tokens/s")
    finally:
        for backend in backends:
            backend.close()
        if pool is not None:
            pool.shutdown()
        ray.shutdown()
    results = []
    for c in concurrency:
        base_tps = float(np.median(times[("in_process", c)]))
        for mode in MODES:
            tps = float(np.median(times[(mode, c)]))
            results.append({"mode": mode, "concurrency": c, "tokens_per_s": tps, "ratio": tps / base_tps,
                            "cache_hit_rate": float(np.median(hits[c])) if mode == "pool_prefetch_cache" else None,
                            "prefetch_wait_ms": float(np.median(waits[(mode, c)]))})
    lines = [f"generate ({preset}, {new_tokens} new tokens a request, prompts 16-128 tokens, device {device}, "
             f"{shards}-shard pool, cache {cache_mb} MiB, {rounds} round(s), round-robin)",
             f"  {'concurrency':>11s}  {'mode':20s} {'tokens/s':>9s}  {'ratio':>5s}  {'hit rate':>8s}  {'wait ms/step':>12s}"]
    for r in results:
        hit = "" if r["cache_hit_rate"] is None else f"{r['cache_hit_rate']:.2f}"
        lines.append(f"  {r['concurrency']:11d}  {r['mode']:20s} {r['tokens_per_s']:9.1f}  {r['ratio']:5.3f}  {hit:>8s}  "
                     f"{r['prefetch_wait_ms']:12.2f}")
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
