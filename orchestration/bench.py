"""`engram bench ...`: throughput figures with a baseline measured in the same run.

The machine is shared and noisy, so every benchmark reports a ratio against a baseline
timed in the same process right beside it, after a warm-up; absolute numbers drift.
"""

from __future__ import annotations

import time

import numpy as np

from memory_service.hashing import NgramHasher
from memory_service.spec import EngramSpec


def round_times(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Every round's time of each function, timed round-robin (a, b, c, a, b, c, ...) so drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def best_times(fns: dict, repeats: int) -> dict[str, float]:
    """Fastest time of each function, timed round-robin."""
    return {name: min(t) for name, t in round_times(fns, repeats).items()}


def paired_ratio(baseline: list[float], candidate: list[float]) -> float:
    """Median over rounds of baseline time / candidate time: each pair ran side by side, so drift cancels."""
    return float(np.median(np.asarray(baseline) / np.asarray(candidate)))


def best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls (after one warm-up call), in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def hash_per_head_baseline(hasher: NgramHasher, ids: np.ndarray) -> dict[int, np.ndarray]:
    """Straightforward hashing: padded shifts per order, one modulo and one array per head, then a stack."""
    spec = hasher.spec
    batch, time_len = ids.shape
    out = {}
    for layer_id in spec.layer_ids:
        mult = hasher.multipliers(layer_id)
        shifts = [ids] + [np.pad(ids, ((0, 0), (k, 0)), constant_values=hasher.pad_id)[:, :time_len]
                          for k in range(1, spec.max_ngram_size)]
        heads = []
        for n, primes in zip(range(2, spec.max_ngram_size + 1), hasher.head_sizes(layer_id)):
            mix = shifts[0] * mult[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * mult[k])
            heads.extend(mix % p for p in primes)
        out[layer_id] = np.stack(heads, axis=2)
    return out


def bench_hash(num_tokens: int = 262144, repeats: int = 5) -> dict:
    """Hash num_tokens compressed ids for two layers (reference-sized config): ours vs the per-head baseline."""
    spec = EngramSpec(engram_vocab_size=(129280 * 5, 129280 * 5), max_ngram_size=3, n_embed_per_ngram=512,
                      n_head_per_ngram=8, layer_ids=(1, 15), pad_id=2, seed=0)
    compressed_vocab = 99_000  # about a 128k vocabulary after the paper's 23% reduction
    hasher = NgramHasher(spec, compressed_vocab)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, compressed_vocab, size=(num_tokens // 4096 or 1, min(num_tokens, 4096)), dtype=np.int64)
    tokens = ids.size
    times = best_times({"ours": lambda: hasher.hash(ids), "baseline": lambda: hash_per_head_baseline(hasher, ids)}, repeats)
    ours, baseline = times["ours"], times["baseline"]
    same = all(np.array_equal(a, b) for a, b in zip(hasher.hash(ids).values(), hash_per_head_baseline(hasher, ids).values()))
    result = {
        "tokens": tokens, "layers": len(spec.layer_ids), "heads_per_layer": spec.num_heads,
        "ours_s": ours, "baseline_s": baseline,
        "ours_tokens_per_s": tokens / ours, "baseline_tokens_per_s": tokens / baseline,
        "speedup_vs_baseline": baseline / ours, "identical": same,
    }
    result["lines"] = [
        f"hash {tokens:,} tokens x {len(spec.layer_ids)} layers x {spec.num_heads} heads",
        f"  ours      {ours * 1e3:8.2f} ms   {tokens / ours / 1e6:8.2f} M tokens/s",
        f"  baseline  {baseline * 1e3:8.2f} ms   {tokens / baseline / 1e6:8.2f} M tokens/s   (per-head modulo + stack)",
        f"  ours / baseline speed: {baseline / ours:.2f}x   identical ids: {same}",
    ]
    return result


# ---------------------------------------------------------------------- lookup
def zipf_ids(num_rows: int, size: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf-distributed row ids: rank r has weight r^-exponent; ranks are scattered over the table."""
    ranks = (rng.zipf(exponent, size=size) - 1) % num_rows
    return rng.permutation(num_rows)[ranks]  # hot rows scattered over the table, not clustered at its start


def bench_lookup(num_rows: int = 1 << 24, dim: int = 64, dtype: str = "float16", batch: int = 262144,
                 repeats: int = 5, path: str | None = None, zipf_exponent: float = 1.1, log=print) -> dict:
    """Rows/s of (a) in-process gather, (b) gRPC echo of the same bytes, (c) client -> gRPC -> store; uniform and Zipf ids."""
    import shutil
    import tempfile

    from memory_service import native
    from memory_service.client import MemoryClient
    from memory_service.row_init import init_rows
    from memory_service.spec import EngramSpec
    from memory_service.store import TableStore
    from memory_service.table_meta import layer_rows_for_spec
    from memory_service.wire import MAX_PAYLOAD_BYTES
    from orchestration.local_server import start_server
    from protos import engram_pb2 as pb

    spec = EngramSpec(engram_vocab_size=(num_rows,), max_ngram_size=2, n_embed_per_ngram=dim, n_head_per_ngram=1,
                      layer_ids=(0,), pad_id=0, dtype=dtype)
    rows_in_table = layer_rows_for_spec(spec)[0]
    own_dir = path is None
    path = path or tempfile.mkdtemp(prefix="engram-bench-")
    store = TableStore(path)
    name = f"bench-{rows_in_table}x{dim}-{dtype}"
    if name not in {m.name for m in store.list_tables()}:
        log(f"creating {rows_in_table:,} x {dim} {dtype} table in {path} ...")
        store.create_table(name, spec, init_std=1.0, init_seed=0)
    store.close()
    table = init_rows(rows_in_table, dim, 0, 0, rows_in_table, 1.0, 0, dtype)  # (a)'s in-RAM copy, same values
    proc, address = start_server(path)
    try:
        client = MemoryClient(address, name, deadline_s=120)
        rng = np.random.default_rng(0)
        batches = {"uniform": rng.integers(0, rows_in_table, size=batch), "zipf": zipf_ids(rows_in_table, batch, zipf_exponent, rng)}
        row_nbytes = dim * np.dtype(dtype).itemsize
        per_message = MAX_PAYLOAD_BYTES // row_nbytes
        out = np.empty((batch, dim), dtype=dtype)
        id_bytes = bytes(8 * per_message)  # an echo request carries as many bytes as a lookup's row ids
        unique_out = np.empty((batch, dim), dtype=dtype)  # reused reply buffer, as a prefetcher keeps one
        log("warming the page cache ...")
        client.lookup_raw(0, np.arange(0, rows_in_table, 97, dtype=np.int64))
        results = {}
        for kind, ids in batches.items():
            unique = np.unique(ids).size
            got, _ = client.lookup_raw(0, ids)
            assert np.array_equal(got, table[ids]), "service rows differ from the table"

            def gather(ids=ids):
                np.take(table, ids, axis=0, out=out, mode="clip")

            def echo(unique=unique):  # the same bytes both ways in the same message plan as our path for `unique` rows
                counts = [min(per_message, unique - s) for s in range(0, unique, per_message)]
                calls = [(0, "Echo", pb.EchoRequest(size=n * row_nbytes, payload=id_bytes[:n * 8])) for n in counts]
                client.channels.call_all(calls)

            def ours(ids=ids):  # dedup + all parts in flight: unique rows and the inverse (what the model receives)
                client.lookup_batch(0, ids, out=unique_out)

            def ours_expanded(ids=ids):  # ... plus the expansion to batch order in host memory
                client.lookup_raw(0, ids, out=out)

            rounds = round_times({"a_inprocess": gather, "b_echo": echo, "c_ours": ours, "c_expanded": ours_expanded}, repeats)
            t = {k: min(v) for k, v in rounds.items()}
            results[kind] = {
                "unique_ids": unique, "rows_per_s": {k: batch / v for k, v in t.items()}, "seconds": t,
                "c_over_a": paired_ratio(rounds["a_inprocess"], rounds["c_ours"]),
                "c_over_b": paired_ratio(rounds["b_echo"], rounds["c_ours"]),
                "c_expanded_over_b": paired_ratio(rounds["b_echo"], rounds["c_expanded"]),
                "c_over_b_of_best_times": t["b_echo"] / t["c_ours"],
                "c_over_b_quartiles": [float(q) for q in np.percentile(np.asarray(rounds["b_echo"]) / np.asarray(rounds["c_ours"]),
                                                                       [25, 75])],
            }
        stats = client.stats()[0]
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if own_dir:
            shutil.rmtree(path, ignore_errors=True)
    lines = [f"lookup bench: {rows_in_table:,} rows x {dim} {dtype}, batches of {batch:,} ids, {repeats} rounds after a warm-up, "
             f"{'native' if native.available() else 'numpy'} dedup and gather",
             "  rows/s: the batch's ids over the best round's time; ratios: median over rounds of the two times in that round"]
    for kind, r in results.items():
        rps = r["rows_per_s"]
        lines.append(f"  {kind:8s} ({r['unique_ids']:,} unique ids)")
        lines.append(f"    a  in-process gather       {rps['a_inprocess'] / 1e6:7.2f} M rows/s")
        lines.append(f"    b  gRPC echo, same bytes   {rps['b_echo'] / 1e6:7.2f} M rows/s")
        q25, q75 = r["c_over_b_quartiles"]
        lines.append(f"    c  ours (unique + inverse) {rps['c_ours'] / 1e6:7.2f} M rows/s   c/a {r['c_over_a']:.2f}   "
                     f"c/b {r['c_over_b']:.2f}"
                     f" (rounds' middle half {q25:.2f}-{q75:.2f}; of best times {r['c_over_b_of_best_times']:.2f})")
        lines.append(f"    c' ours, expanded on host  {rps['c_expanded'] / 1e6:7.2f} M rows/s   c'/b {r['c_expanded_over_b']:.2f}")
    lines.append(f"  zipf vs uniform (ours): {results['zipf']['rows_per_s']['c_ours'] / results['uniform']['rows_per_s']['c_ours']:.2f}x")
    return {"table_rows": rows_in_table, "dim": dim, "dtype": dtype, "batch": batch, "rounds": repeats,
            "native_kernels": native.available(), "results": results,
            "server_rows_served": stats.get("rows_served", 0.0), "lines": lines}


# ---------------------------------------------------------------------- training step
def bench_step(preset: str = "small", steps: int = 12, warmup: int = 3, batch_size: int = 8, seq_len: int = 128,
               log=print, block: int = 3) -> dict:
    """Train-step time: in-process tables vs the memory service with and without prefetch, and async (server in its own process).

    Modes take turns in blocks of `block` steps (round-robin, so they share the machine's
    drift); a block's time includes waiting for an async push still in flight at its end,
    so async mode gets no free time from the other modes' turns.
    """
    import shutil
    import tempfile

    from model_worker.train import TrainConfig, Trainer
    from orchestration.local_server import start_server

    path = tempfile.mkdtemp(prefix="engram-bench-step-")
    proc, address = start_server(path, token="bench")
    results = {}
    try:
        common = dict(preset=preset, steps=warmup + steps, batch_size=batch_size, seq_len=seq_len, eval_every=10_000,
                      ckpt_every=10_000, eval_batches=1)
        modes = {"in_process": {}, "service_prefetch": {"memory": f"grpc://{address}", "table": "p", "prefetch": True},
                 "service_no_prefetch": {"memory": f"grpc://{address}", "table": "q", "prefetch": False},
                 "service_prefetch_async": {"memory": f"grpc://{address}", "table": "r", "prefetch": True, "mode": "async"}}
        trainers = {}
        for mode, extra in modes.items():
            config = TrainConfig(out_dir=tempfile.mkdtemp(prefix=f"engram-{mode}-"), **common, **extra)
            trainer = Trainer(config, progress=False, log=lambda *a: None, token="bench")
            trainers[mode] = trainer
        times = {mode: [] for mode in modes}
        waits = {mode: [] for mode in modes}
        from model_worker.data import sample_batch

        for trainer in trainers.values():  # warm-up
            for _ in range(warmup):
                trainer.train_step(*sample_batch(trainer.corpus.train_ids, batch_size, seq_len, trainer.rng))
            trainer.wait_for_push()
        for _ in range(max(1, steps // block)):  # round-robin over blocks of steps
            for mode, trainer in trainers.items():
                batches = [sample_batch(trainer.corpus.train_ids, batch_size, seq_len, trainer.rng) for _ in range(block)]
                started = time.perf_counter()
                for inputs, targets in batches:
                    waits[mode].append(trainer.train_step(inputs, targets)["wait"])
                trainer.wait_for_push()
                trainer.synchronize()  # a GPU's queued work belongs to the block that queued it
                times[mode].append((time.perf_counter() - started) / block)
        for mode in modes:
            results[mode] = {"step_ms": 1e3 * float(np.median(times[mode])), "prefetch_wait_ms": 1e3 * float(np.median(waits[mode]))}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(path, ignore_errors=True)
    base = results["in_process"]["step_ms"]
    device = str(trainers["in_process"].device)
    lines = [f"train step ({preset}, batch {batch_size} x {seq_len}, median of {len(times['in_process'])} blocks of {block} steps "
             f"after {warmup} warm-up, round-robin; device {device})"]
    for mode, r in results.items():
        lines.append(f"  {mode:22s} {r['step_ms']:8.1f} ms/step   x{r['step_ms'] / base:5.2f} of in-process   "
                     f"prefetch wait {r['prefetch_wait_ms']:6.1f} ms")
    return {"preset": preset, "device": device, "results": results, "lines": lines}
