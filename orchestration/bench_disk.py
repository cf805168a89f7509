"""`engram bench disk`: lookups from a table bigger than this machine's RAM, cold and warm.

The store memory-maps its file: a lookup of a row whose page is not in the page cache
waits for the disk (rows are scattered), so a table that does not fit in RAM serves at
the speed of random reads until its hot rows are cached. Today the first lookup of a
chunk also reads the whole chunk (py-lmdb touches every page of a value it returns,
one fault at a time), so cold lookups cost about 32 page reads a row. This bench
creates (or reuses, with --path) a table of the size asked for, serves it from an
`engram serve` process, and times batches of lookups:

- cold: right after the table file's pages are dropped from the page cache;
- warm: after one sequential read of the whole file (what `engram serve --warm` does):
  the cache then holds as much of the table as fits, the rest still comes from disk;
- Zipf ids after that: the hot rows a language model's n-grams hit stay cached.

The rows returned are checked against the seeded initial rows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

WARM_BLOCK_BYTES = 64 << 20


def _meminfo(field: str) -> int:
    """A /proc/meminfo figure in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _drop_cached_pages(path: Path) -> None:
    """Ask the kernel to drop a file's clean cached pages (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_through(path: Path) -> float:
    """Read a file once sequentially (into the page cache as far as it fits); returns MiB/s."""
    started, total = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(WARM_BLOCK_BYTES):
            total += len(chunk)
    return total / 2**20 / (time.perf_counter() - started)


def bench_disk(num_rows: int = 1 << 28, dim: int = 64, dtype: str = "float16", batch: int = 16384,
               seconds: float = 20.0, path: str | None = None, log=print) -> dict:
    """Rows/s of lookups (uniform and Zipf ids, over gRPC) from a table that may not fit in RAM, cold and warm."""
    from memory_service.client import MemoryClient
    from memory_service.row_init import INIT_BLOCK_ROWS, init_rows
    from memory_service.spec import EngramSpec
    from memory_service.store import TableStore
    from memory_service.table_meta import layer_rows_for_spec
    from orchestration.bench import zipf_ids
    from orchestration.local_server import start_server

    spec = EngramSpec(engram_vocab_size=(num_rows,), max_ngram_size=2, n_embed_per_ngram=dim, n_head_per_ngram=1,
                      layer_ids=(0,), pad_id=0, dtype=dtype)
    rows_in_table = layer_rows_for_spec(spec)[0]
    own_dir = path is None
    path = Path(path or tempfile.mkdtemp(prefix="engram-bench-disk-"))
    name = f"bench-{rows_in_table}x{dim}-{dtype}"
    created_s = None
    store = TableStore(path)
    try:
        if name not in {m.name for m in store.list_tables()}:
            log(f"creating a {rows_in_table:,} x {dim} {dtype} table ({rows_in_table * spec.row_nbytes / 2**30:.1f} GiB) "
                f"in {path} ...")
            started = time.perf_counter()
            store.create_table(name, spec, init_std=1.0, init_seed=0)
            created_s = time.perf_counter() - started
    finally:
        store.close()
    data_file = path / "data.mdb"
    table_bytes = rows_in_table * spec.row_nbytes
    result = {"table_rows": rows_in_table, "dim": dim, "dtype": dtype, "batch": batch, "table_bytes": table_bytes,
              "file_bytes": data_file.stat().st_size, "ram_bytes": _meminfo("MemTotal"),
              "available_bytes": _meminfo("MemAvailable"), "create_s": created_s}
    proc, address = start_server(str(path))
    try:
        client = MemoryClient(address, name, deadline_s=600)
        rng = np.random.default_rng(0)

        def timed(kind: str, make_ids) -> dict:
            done, times, started = 0, [], time.perf_counter()
            while time.perf_counter() - started < seconds:
                ids = make_ids()
                began = time.perf_counter()
                rows, _ = client.lookup_raw(0, ids)
                times.append(time.perf_counter() - began)
                done += ids.size
            block = int(rng.integers(0, max(1, rows_in_table // INIT_BLOCK_ROWS)))  # one seeded block, checked row for row
            ids = np.arange(block * INIT_BLOCK_ROWS, min(rows_in_table, (block + 1) * INIT_BLOCK_ROWS))
            expected = init_rows(rows_in_table, dim, 0, int(ids[0]), int(ids[-1]) + 1, 1.0, 0, dtype)
            assert np.array_equal(client.lookup_raw(0, ids)[0], expected), "served rows differ from the seeded rows"
            out = {"rows_per_s": done / sum(times), "batches": len(times),
                   "batch_p50_ms": float(np.median(times)) * 1e3, "batch_p99_ms": float(np.percentile(times, 99)) * 1e3}
            log(f"  {kind:24s} {out['rows_per_s'] / 1e6:7.3f} M rows/s   a batch of {batch:,}: p50 "
                f"{out['batch_p50_ms']:.1f} ms, p99 {out['batch_p99_ms']:.1f} ms")
            return out

        def uniform():
            return rng.integers(0, rows_in_table, batch)

        def zipf():
            return zipf_ids(rows_in_table, batch, 1.1, rng)

        log(f"lookups of {batch:,} ids, {seconds:.0f} s each (table {table_bytes / 2**30:.1f} GiB, RAM "
            f"{result['ram_bytes'] / 2**30:.1f} GiB, {result['available_bytes'] / 2**30:.1f} GiB available):")
        _drop_cached_pages(data_file)
        result["cold_uniform"] = timed("cold, uniform ids", uniform)
        _drop_cached_pages(data_file)
        result["cold_zipf"] = timed("cold, Zipf ids", zipf)
        log("reading the table file once (what engram serve --warm does) ...")
        result["warm_read_mib_s"] = _read_through(data_file)
        result["warm_uniform"] = timed("warm, uniform ids", uniform)
        result["warm_zipf"] = timed("warm, Zipf ids", zipf)
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if own_dir:
            shutil.rmtree(path, ignore_errors=True)
    fits = table_bytes <= result["available_bytes"]
    result["lines"] = [
        f"disk lookup bench: {rows_in_table:,} rows x {dim} {dtype} = {table_bytes / 2**30:.1f} GiB "
        f"({'fits in' if fits else 'bigger than'} the {result['available_bytes'] / 2**30:.1f} GiB of available RAM), "
        f"batches of {batch:,} ids over gRPC" + (f"; created in {created_s:.0f} s" if created_s else ""),
        *(f"  {k.replace('_', ', '):14s} {result[k]['rows_per_s'] / 1e6:7.3f} M rows/s   batch p50 "
          f"{result[k]['batch_p50_ms']:.1f} ms, p99 {result[k]['batch_p99_ms']:.1f} ms"
          for k in ("cold_uniform", "cold_zipf", "warm_uniform", "warm_zipf")),
        f"  warming read the file at {result['warm_read_mib_s']:.0f} MiB/s"]
    return result
