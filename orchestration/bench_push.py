"""`engram bench push`: what a gradient push costs over the wire as the table grows, compaction included.

Two `engram serve` processes hold the same kind of table at two sizes: the baseline (2^20
rows) and the size asked for. The same pushes (uniform random rows, row-wise Adam) go to
both, in blocks taking turns, so the machine's drift hits both alike; a block's time
runs from its first push to the end of the compaction it started (flushes to sorted
runs, merges, folds into the chunks: compaction.py), so each table pays for its own, and
the timed pushes span at least one whole compaction cycle (to a fold) of the bigger table.
Then a reader looks rows up on the bigger table, first alone, then while pushes and
their compaction run beside it (to the next fold); its latencies are split by what ran
meanwhile (a compaction or only pushes), which is how "compaction never stalls lookups"
is checked. At the end: disk bytes per row once nearly every row of the baseline table
was trained, against the bytes a row and its optimizer record need.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

WARM_BLOCK_BYTES = 64 << 20
STEP_SECONDS = ("flush_s", "merge_s", "fold_s")  # compaction time by step (server counters)
BLOCK_PUSHES = 6  # pushes to one table before the other's turn; a block ends when its table's compaction is done


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


def _train_every_row(client, num_rows: int, dim: int, rng, push_rows: int, coverage: float = 0.97) -> float:
    """Push until most rows have optimizer state (what a long training run leaves); returns the fraction trained."""
    trained = np.zeros(num_rows, dtype=bool)
    while trained.mean() < coverage:
        ids = np.unique(rng.integers(0, num_rows, push_rows))
        client.apply_gradients(0, ids, rng.standard_normal((ids.size, dim)).astype(np.float32), lr=0.01)
        trained[ids] = True
    _settle(client)
    return float(trained.mean())


def _settle(client) -> None:
    """Until the store's compaction in progress (it runs in the background) is done."""
    while True:
        stats = client.stats()[0]
        if stats["compactions"] >= stats["compactions_started"]:
            return
        time.sleep(0.005)


def bench_push(num_rows: int = 1 << 23, dim: int = 64, dtype: str = "float16", push_rows: int = 5400, pushes: int = 30,
               baseline_rows: int = 1 << 20, optimizer_state: str = "exact", lookup_ids: int = 4096, log=print) -> dict:
    """Per-push cost (mean, compaction included) at num_rows against baseline_rows, lookup latency beside pushes and
    compactions, and disk bytes per row."""
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
                              layer_ids=(0,), pad_id=0, dtype=dtype, optimizer_state=optimizer_state)
            log(f"creating a {rows:,} x {dim} {dtype} table ({optimizer_state} optimizer state) ...")
            store = TableStore(root / name)
            store.create_table("t", spec, init_std=1.0, init_seed=0)
            store.close()
            _warm(root / name)
            servers[name] = start_server(root / name, token=token)
            clients[name] = MemoryClient(servers[name][1], "t", token=token, deadline_s=600)
        table_rows = {name: client.num_rows(0) for name, client in clients.items()}
        rng = np.random.default_rng(0)

        def push(name: str) -> float:
            client = clients[name]
            ids = np.unique(rng.integers(0, table_rows[name], push_rows))
            grads = rng.standard_normal((ids.size, dim)).astype(np.float32)
            started = time.perf_counter()
            client.apply_gradients(0, ids, grads, lr=0.01)
            return time.perf_counter() - started


        def folds(name: str) -> int:
            return int(clients[name].stats()[0]["folds"])

        log("warming up: pushes until both tables folded their runs into the chunks once ...")
        warm_up = 0
        while min(folds(name) for name in sizes) < 1:
            for name in sizes:
                if folds(name) < 1:
                    push(name)
                    _settle(clients[name])
            warm_up += 1

        log(f"timed: blocks of {BLOCK_PUSHES} pushes per table, taking turns, until the bigger table folded again and at "
            f"least {pushes} pushes each ...")
        times = {name: [] for name in sizes}  # per push, over a block and the compaction it started
        latencies = {name: [] for name in sizes}  # each push alone
        target_folds = folds("target")
        before = {name: client.stats()[0] for name, client in clients.items()}
        i = 0
        while i * BLOCK_PUSHES < pushes or folds("target") <= target_folds:  # a whole compaction cycle of the big table
            i += 1
            for name in (list(sizes) if i % 2 else list(sizes)[::-1]):
                began = time.perf_counter()
                latencies[name].extend(push(name) for _ in range(BLOCK_PUSHES))
                _settle(clients[name])  # the compaction the block started counts for its table
                times[name].append((time.perf_counter() - began) / BLOCK_PUSHES)
        cycles = {name: {k: int(client.stats()[0][k]) for k in ("flushes", "merges", "folds")}
                  for name, client in clients.items()}
        seconds = {name: {k: client.stats()[0][k] - before[name][k] for k in STEP_SECONDS}
                   for name, client in clients.items()}

        # Lookup latency on the bigger table: alone, then while pushes and their compaction (to a fold) run beside.
        reader = MemoryClient(servers["target"][1], "t", deadline_s=600)
        lookups: list[tuple[float, float, bool]] = []  # (start, end, a compaction ran meanwhile)
        stop = threading.Event()

        def read_loop(seconds: float | None = None) -> None:
            reader_rng = np.random.default_rng(1)
            until = time.perf_counter() + seconds if seconds else None
            while not stop.is_set() and (until is None or time.perf_counter() < until):
                ids = np.unique(reader_rng.integers(0, table_rows["target"], lookup_ids))
                done_before = reader.stats()[0]["compactions"]
                started = time.perf_counter()
                reader.lookup_batch(0, ids)
                ended = time.perf_counter()
                lookups.append((started, ended, reader.stats()[0]["compactions_started"] > done_before))

        log("lookups alone, then beside pushes and compaction until the bigger table folds again ...")
        read_loop(seconds=5.0)
        alone = [end - start for start, end, _ in lookups]
        lookups.clear()
        thread = threading.Thread(target=read_loop)
        thread.start()
        target_folds = folds("target")
        while folds("target") <= target_folds:
            push("target")
        _settle(clients["target"])
        stop.set()
        thread.join()
        during = {"compaction": [], "push": []}
        for start, end, compacting in lookups:
            during["compaction" if compacting else "push"].append(end - start)

        log(f"training every row of the {table_rows['baseline']:,}-row table once or more (pushes of {push_rows:,} rows), "
            f"for its bytes per row ...")
        covered = _train_every_row(clients["baseline"], table_rows["baseline"], dim, rng, push_rows=push_rows)
        for client in list(clients.values()) + [reader]:
            client.close()
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=120)
    disk = {name: _allocated_bytes(root / name) for name in sizes}
    shutil.rmtree(root, ignore_errors=True)
    row_nbytes = dim * np.dtype(dtype).itemsize
    record_nbytes = record_dtype(dim, optimizer_state).itemsize
    mean = {name: float(np.mean(t)) for name, t in times.items()}
    result = {
        "table_rows": table_rows, "dim": dim, "dtype": dtype, "optimizer_state": optimizer_state, "push_rows": push_rows,
        "pushes": len(latencies["target"]), "warm_up": warm_up,
        "mean_ms": {k: v * 1e3 for k, v in mean.items()},
        "push_p50_ms": {k: float(np.median(t)) * 1e3 for k, t in latencies.items()},
        "push_p99_ms": {k: float(np.percentile(t, 99)) * 1e3 for k, t in latencies.items()},
        "cost_ratio": mean["target"] / mean["baseline"], "compactions": cycles,
        "compaction_ms_per_push": {name: {k[:-2]: v * 1e3 / len(latencies[name]) for k, v in s.items()}
                                   for name, s in seconds.items()},
        "disk_bytes_per_row": {k: disk[k] / table_rows[k] for k in sizes}, "baseline_rows_trained": covered,
        "row_plus_record_bytes": row_nbytes + record_nbytes,
        "lookups": {"alone": _percentiles(alone), **{f"beside_{k}": _percentiles(v) for k, v in during.items()}},
    }
    timed = len(latencies["target"])
    lines = [f"push bench: {timed} pushes of ~{push_rows:,} uniform rows (row-wise Adam) to each of two tables over gRPC, "
             f"in blocks of {BLOCK_PUSHES} taking turns (a block's time includes the compaction it started), spanning a "
             f"whole compaction cycle of the bigger table (to its next fold), after {warm_up} warm-up rounds"]
    for name in sizes:
        lines.append(f"  {table_rows[name]:>13,} rows   {result['mean_ms'][name]:7.1f} ms per push (compaction included)   "
                     f"one push p50 {result['push_p50_ms'][name]:6.1f} ms, p99 {result['push_p99_ms'][name]:6.1f} ms   "
                     f"{cycles[name]['flushes']} flushes, {cycles[name]['merges']} merges, {cycles[name]['folds']} folds")
        per = result["compaction_ms_per_push"][name]
        lines.append(f"  {'':>13}        compaction per push: flush {per['flush']:.1f} ms, merge {per['merge']:.1f} ms, "
                     f"fold {per['fold']:.1f} ms")
    lines.append(f"  cost per push, {table_rows['target']:,} rows / {table_rows['baseline']:,}: {result['cost_ratio']:.2f}x "
                 f"(means, compaction included)")
    per_row = result["disk_bytes_per_row"]
    lines.append(f"  disk: {per_row['baseline']:.0f} B/row with {covered:.0%} of the rows trained (a row and its "
                 f"{optimizer_state} Adam record: "
                 f"{row_nbytes + record_nbytes} B, so {per_row['baseline'] / (row_nbytes + record_nbytes):.2f}x); "
                 f"{per_row['target']:.0f} B/row on the bigger table after the timed pushes")
    lk = result["lookups"]
    lines.append(f"  lookups of {lookup_ids:,} ids on the bigger table, p50 / p99 ms: alone "
                 f"{lk['alone']['p50_ms']:.1f} / {lk['alone']['p99_ms']:.1f}" + "".join(
                     f";  beside {k} {lk['beside_' + k]['p50_ms']:.1f} / {lk['beside_' + k]['p99_ms']:.1f} "
                     f"({lk['beside_' + k]['count']})" for k in ("push", "compaction") if lk["beside_" + k]["count"]))
    result["lines"] = lines
    return result

