"""`engram bench lookup --format fp8`: FP8 records (264 bytes a row) against bf16 rows (512 bytes) of 256 values.

One store serves two tables of the same rows, in one run: a bf16 table of seeded rows and
the FP8 table of those rows quantized. The same id batches (uniform and Zipf) go to both,
round-robin, through the same client path (dedup, all parts in flight); a third mode adds
the worker's dequantization of the FP8 records to bf16 (torch's float8 dtypes, here on the
CPU). Rows/s, bytes/s, and each mode's ratio to bf16 come from the same rounds.
"""

from __future__ import annotations

import shutil
import tempfile

import numpy as np

from orchestration.bench import paired_ratio, round_times, zipf_ids

HEAD_DIM = 256


def bench_lookup_fp8(num_rows: int = 1 << 21, batch: int = 65536, repeats: int = 15, path: str | None = None,
                     zipf_exponent: float = 1.1, log=print) -> dict:
    """Rows/s and bytes/s of lookups on bf16 rows and on FP8 records of the same rows, same ids, one run."""
    import torch

    from memory_service.client import MemoryClient
    from memory_service.fp8_rows import dequantize, dequantize_torch
    from memory_service.spec import EngramSpec
    from memory_service.store import TableStore
    from memory_service.table_meta import layer_rows_for_spec
    from orchestration.local_server import start_server

    specs = {fmt: EngramSpec(engram_vocab_size=(num_rows,), max_ngram_size=2, n_embed_per_ngram=HEAD_DIM,
                             n_head_per_ngram=1, layer_ids=(0,), pad_id=0, dtype=fmt)
             for fmt in ("bfloat16", "fp8_e4m3_b32")}
    rows_in_table = layer_rows_for_spec(specs["bfloat16"])[0]
    own_dir = path is None
    path = path or tempfile.mkdtemp(prefix="engram-bench-fp8-")
    store = TableStore(path)
    names = {fmt: f"bench-{rows_in_table}x{HEAD_DIM}-{fmt}" for fmt in specs}
    for fmt, spec in specs.items():
        if names[fmt] not in {m.name for m in store.list_tables()}:
            log(f"creating {rows_in_table:,} x {HEAD_DIM} {fmt} table in {path} ...")
            store.create_table(names[fmt], spec, init_std=1.0, init_seed=0)  # FP8: the same draws, quantized
    store.close()
    proc, address = start_server(path)
    try:
        clients = {fmt: MemoryClient(address, name, deadline_s=120) for fmt, name in names.items()}
        rng = np.random.default_rng(0)
        batches = {"uniform": rng.integers(0, rows_in_table, size=batch), "zipf": zipf_ids(rows_in_table, batch, zipf_exponent, rng)}
        buffers = {fmt: np.empty((batch, c.row_width), dtype=c.dtype) for fmt, c in clients.items()}
        log("warming the page cache ...")
        for client in clients.values():
            client.lookup_raw(0, np.arange(0, rows_in_table, 31, dtype=np.int64))
        results = {}
        for kind, ids in batches.items():
            bf16_rows, _ = clients["bfloat16"].lookup_raw(0, ids[:1000])
            records, _ = clients["fp8_e4m3_b32"].lookup_raw(0, ids[:1000])
            agree = np.abs(dequantize(records, HEAD_DIM) - bf16_rows.astype(np.float32)).max()

            def bf16(ids=ids):
                clients["bfloat16"].lookup_batch(0, ids, out=buffers["bfloat16"])

            def fp8(ids=ids):
                clients["fp8_e4m3_b32"].lookup_batch(0, ids, out=buffers["fp8_e4m3_b32"])

            def fp8_dequantized(ids=ids):  # ... and widened to bf16 as a worker does before the model uses them
                rows, _, _ = clients["fp8_e4m3_b32"].lookup_batch(0, ids, out=buffers["fp8_e4m3_b32"])
                dequantize_torch(rows, HEAD_DIM, torch.bfloat16)

            rounds = round_times({"bf16": bf16, "fp8": fp8, "fp8_dequantized_bf16": fp8_dequantized}, repeats)
            unique = int(np.unique(ids).size)
            row_bytes = {"bf16": HEAD_DIM * 2, "fp8": clients["fp8_e4m3_b32"].row_nbytes,
                         "fp8_dequantized_bf16": clients["fp8_e4m3_b32"].row_nbytes}
            best = {k: min(v) for k, v in rounds.items()}
            results[kind] = {
                "unique_ids": unique, "max_abs_difference_from_bf16": float(agree),
                "rows_per_s": {k: batch / t for k, t in best.items()},
                "mb_per_s": {k: unique * row_bytes[k] / t / 1e6 for k, t in best.items()},
                "ratio_to_bf16": {k: paired_ratio(rounds["bf16"], rounds[k]) for k in rounds},
            }
        for client in clients.values():
            client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if own_dir:
            shutil.rmtree(path, ignore_errors=True)
    lines = [f"lookup bench, row formats: {rows_in_table:,} rows x {HEAD_DIM} values, bf16 (512 B a row) vs FP8 records "
             f"({HEAD_DIM + HEAD_DIM // 32} B), batches of {batch:,} ids, {repeats} rounds after a warm-up",
             "  rows/s: batch ids over the best round; MB/s: unique rows' bytes over it; ratio: median over rounds of "
             "bf16's time / the mode's"]
    for kind, r in results.items():
        lines.append(f"  {kind} ({r['unique_ids']:,} unique ids; FP8 within {r['max_abs_difference_from_bf16']:.3g} of bf16)")
        for mode in ("bf16", "fp8", "fp8_dequantized_bf16"):
            lines.append(f"    {mode:22s} {r['rows_per_s'][mode] / 1e6:6.2f} M rows/s  {r['mb_per_s'][mode]:7.0f} MB/s  "
                         f"x{r['ratio_to_bf16'][mode]:.2f}")
    return {"table_rows": rows_in_table, "head_dim": HEAD_DIM, "batch": batch, "rounds": repeats, "results": results,
            "lines": lines}
