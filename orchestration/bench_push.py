"""`engram bench push`: what a gradient push costs over the wire as the table grows, folds included.

Two `engram serve` processes hold the same kind of table at two sizes: the baseline (2^20
rows) and the size asked for. The same pushes (uniform random rows, row-wise Adam) go to
both, taking turns, so the machine's drift hits both alike; each push is timed from the
client over gRPC, and the stores fold their recent rows into the chunks as they go
(`folds` counts them). Meanwhile a reader looks rows up on the bigger table; its
latencies are split by what ran beside them (nothing, a push, a push that folded), which
is how "folding never stalls lookups" is checked. At the end: disk bytes per row, against
the bytes a row and its optimizer record need.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

WARM_BLOCK_BYTES = 64 << 20


def _allocated_bytes(path: Path) -> int:
    """Bytes the files under path take on disk (allocated blocks, not apparent sizes)."""
    return sum(f.stat().st_blocks * 512 for f in Path(path).rglob("*") if f.is_file())


def _warm(path: Path) -> None:
    """Read a store's data file once, so the page cache holds it (the VM evicts idle cache after ~30-60 s)."""
    with open(Path(path) / "data.mdb", "rb", buffering=0) as f:
        while f.read(WARM_BLOCK_BYTES):
            pass


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50_ms": None, "p99_ms": None}
    array = np.asarray(values) * 1e3
    return {"count": len(values), "p50_ms": float(np.percentile(array, 50)), "p99_ms": float(np.percentile(array, 99))}


def bench_push(num_rows: int = 1 << 23, dim: int = 64, dtype: str = "float16", push_rows: int = 5400, pushes: int = 30,
               baseline_rows: int = 1 << 20, lookup_ids: int = 4096, log=print) -> dict:
    """Per-push cost (mean, folds included) at num_rows against baseline_rows, lookup latency beside pushes and folds,
    and disk bytes per row."""
    from memory_service.client import MemoryClient
    from memory_service.row_optim import record_dtype
    from memory_service.spec import EngramSpec
    from memory_service.store import TableStore
    from orchestration.local_server import start_server

    token = "bench"
    root = Path(tempfile.mkdtemp(prefix="engram-bench-push-"))
    sizes = {"baseline": baseline_rows, "target": num_rows}
    servers, clients = {}, {}
    try:
        for name, rows in sizes.items():
            spec = EngramSpec(engram_vocab_size=(rows,), max_ngram_size=2, n_embed_per_ngram=dim, n_head_per_ngram=1,
                              layer_ids=(0,), pad_id=0, dtype=dtype)
            log(f"creating a {rows:,} x {dim} {dtype} table ...")
            store = TableStore(root / name)
            store.create_table("t", spec, init_std=1.0, init_seed=0)
            store.close()
            _warm(root / name)
            servers[name] = start_server(root / name, token=token)
            clients[name] = MemoryClient(servers[name][1], "t", token=token, deadline_s=600)
        table_rows = {name: client.num_rows(0) for name, client in clients.items()}
        rng = np.random.default_rng(0)

        def push(name: str) -> tuple[float, bool]:
            client = clients[name]
            ids = np.unique(rng.integers(0, table_rows[name], push_rows))
            grads = rng.standard_normal((ids.size, dim)).astype(np.float32)
            folds = client.stats()[0]["folds"]
            started = time.perf_counter()
            client.apply_gradients(0, ids, grads, lr=0.01)
            took = time.perf_counter() - started
            return took, client.stats()[0]["folds"] > folds

        log("warming up: pushes until both stores folded once ...")
        warm_up = 0
        while min(c.stats()[0]["folds"] for c in clients.values()) < 1 and warm_up < 100:
            for name in sizes:
                push(name)
            warm_up += 1

        reader = MemoryClient(servers["target"][1], "t", deadline_s=600)
        lookups: list[tuple[float, float]] = []
        stop = threading.Event()

        def read_loop(seconds: float | None = None) -> None:
            reader_rng = np.random.default_rng(1)
            until = time.perf_counter() + seconds if seconds else None
            while not stop.is_set() and (until is None or time.perf_counter() < until):
                ids = np.unique(reader_rng.integers(0, table_rows["target"], lookup_ids))
                started = time.perf_counter()
                reader.lookup_batch(0, ids)
                lookups.append((started, time.perf_counter()))

        log("lookups alone ...")
        read_loop(seconds=5.0)
        alone = [end - start for start, end in lookups]
        lookups.clear()
        thread = threading.Thread(target=read_loop)
        thread.start()
        log(f"{pushes} timed pushes per table, taking turns, lookups running beside them ...")
        times = {name: [] for name in sizes}
        windows: list[tuple[float, float, bool]] = []  # target pushes: (start, end, folded)
        for i in range(pushes):
            for name in (list(sizes) if i % 2 else list(sizes)[::-1]):
                began = time.perf_counter()
                took, folded = push(name)
                times[name].append(took)
                if name == "target":
                    windows.append((began, began + took, folded))
        stop.set()
        thread.join()
        folds = {name: int(client.stats()[0]["folds"]) for name, client in clients.items()}
        during = {"push": [], "fold": [], "none": []}
        for start, end in lookups:
            beside = [folded for (a, b, folded) in windows if a < end and start < b]
            during["fold" if any(beside) else "push" if beside else "none"].append(end - start)
        for client in list(clients.values()) + [reader]:
            client.close()
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=120)
    disk = {name: _allocated_bytes(root / name) for name in sizes}
    shutil.rmtree(root, ignore_errors=True)
    row_nbytes = dim * np.dtype(dtype).itemsize
    record_nbytes = record_dtype(dim).itemsize
    mean = {name: float(np.mean(t)) for name, t in times.items()}
    result = {
        "table_rows": table_rows, "dim": dim, "dtype": dtype, "push_rows": push_rows, "pushes": pushes, "warm_up": warm_up,
        "mean_ms": {k: v * 1e3 for k, v in mean.items()},
        "median_ms": {k: float(np.median(t)) * 1e3 for k, t in times.items()},
        "p99_ms": {k: float(np.percentile(t, 99)) * 1e3 for k, t in times.items()},
        "cost_ratio": mean["target"] / mean["baseline"], "folds": folds,
        "disk_bytes_per_row": {k: disk[k] / table_rows[k] for k in sizes},
        "row_plus_record_bytes": row_nbytes + record_nbytes,
        "lookups": {"alone": _percentiles(alone), **{f"beside_{k}": _percentiles(v) for k, v in during.items()}},
    }
    lines = [f"push bench: {pushes} pushes of ~{push_rows:,} uniform rows (row-wise Adam) to each of two tables, "
             f"taking turns, over gRPC, after {warm_up} warm-up rounds (until both folded)"]
    for name in sizes:
        lines.append(f"  {table_rows[name]:>13,} rows   mean {result['mean_ms'][name]:7.1f} ms   median "
                     f"{result['median_ms'][name]:7.1f} ms   p99 {result['p99_ms'][name]:7.1f} ms   {folds[name]} folds   "
                     f"disk {result['disk_bytes_per_row'][name]:6.0f} B/row")
    lines.append(f"  cost per push, {table_rows['target']:,} rows / {table_rows['baseline']:,}: {result['cost_ratio']:.2f}x "
                 f"(means, folds included); a row + its Adam record is {row_nbytes + record_nbytes} B")
    lk = result["lookups"]
    lines.append(f"  lookups of {lookup_ids:,} ids on the bigger table, p50 / p99 ms: alone "
                 f"{lk['alone']['p50_ms']:.1f} / {lk['alone']['p99_ms']:.1f}" + "".join(
                     f";  beside {k} {lk['beside_' + k]['p50_ms']:.1f} / {lk['beside_' + k]['p99_ms']:.1f} "
                     f"({lk['beside_' + k]['count']})" for k in ("push", "fold") if lk["beside_" + k]["count"]))
    result["lines"] = lines
    return result

