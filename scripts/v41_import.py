"""Import throughput of V4.1-layout Engram tables: writes a synthetic checkpoint at V4.1's row format (head_dim 256,
24 heads a layer, 264-byte records) and a chosen size, then times `engram table import --checkpoint` into a fresh
memory service (or a 2-shard Ray memory pool, --pool) from a cold page cache.

    python scripts/v41_import.py --vocab 170000 --dir /tmp/v41-big          # ~4.1M rows a layer, 2.1 GB in all
    python scripts/v41_import.py --vocab 170000 --dir /tmp/v41-big --pool   # engram cluster up --shards 2, then the same
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_service.spec import EngramSpec  # noqa: E402
from memory_service.table_meta import layer_rows_for_spec  # noqa: E402
from memory_service.v4_checkpoint import export_layers  # noqa: E402
from orchestration.local_server import start_server  # noqa: E402


def synthetic(directory: Path, vocab: int) -> dict:
    """config.json and one shard per layer of random finite FP8 records (written a block at a time)."""
    spec = EngramSpec(engram_vocab_size=(vocab,) * 3, max_ngram_size=4, n_embed_per_ngram=8 * 256, n_head_per_ngram=8,
                      layer_ids=(1, 14), pad_id=2)
    rows = layer_rows_for_spec(spec)
    config = {"engram_layer_ids": [1, 14], "engram_num_embeddings": [rows[1], rows[14]], "engram_max_ngram_size": 4,
              "engram_n_heads": 8, "engram_head_dim": 256, "engram_vocab_size": vocab, "engram_pad_token_id": 2}
    if (directory / "config.json").is_file() and json.loads((directory / "config.json").read_text()) == config:
        return config

    def records(layer: int):
        def read(start: int, stop: int) -> np.ndarray:
            rng = np.random.default_rng([layer, start])
            out = rng.integers(0, 256, (stop - start, 264), dtype=np.uint8)
            out[:, :256][(out[:, :256] & 0x7F) == 0x7F] = 0x3F  # no NaN codes
            out[:, 256:] = rng.integers(100, 130, (stop - start, 8), dtype=np.uint8)
            return out
        return read

    export_layers(directory, {layer: (n, records(layer)) for layer, n in rows.items()}, 256)
    (directory / "config.json").write_text(json.dumps(config))
    return config


def drop_page_cache(directory: Path) -> None:
    for path in directory.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=170000, help="base table size per order (V4.1: 16000000)")
    parser.add_argument("--dir", default="/tmp/v41-import", help="where the checkpoint and the store go")
    parser.add_argument("--pool", action="store_true", help="import into a 2-shard memory pool on a local Ray head")
    parser.add_argument("--ray-port", type=int, default=6391, help="with --pool: the local Ray head's port")
    args = parser.parse_args()
    root = Path(args.dir)
    checkpoint = root / "checkpoint"
    started = time.perf_counter()
    config = synthetic(checkpoint, args.vocab)
    size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    print(f"checkpoint: {sum(config['engram_num_embeddings']):,} rows, {size / 1e9:.2f} GB "
          f"({time.perf_counter() - started:.0f} s to write or find)", flush=True)
    shutil.rmtree(root / "store", ignore_errors=True)
    cli = [sys.executable, "-m", "orchestration.cli"]
    env = dict(os.environ, ENGRAM_TOKEN="t")
    if args.pool:
        subprocess.run(cli + ["cluster", "up", "--ray-port", str(args.ray_port), "--pool", "v41", "--shards", "2",
                              "--pool-dir", str(root / "store")], check=True, capture_output=True, env=env)
        proc, where = None, ["--ray", f"127.0.0.1:{args.ray_port}", "--pool", "v41", "--table", "v41"]
    else:
        proc, address = start_server(str(root / "store"), token="t")
        where = ["--address", address, "--token", "t", "--table", "v41"]
    try:
        engram = cli + ["table"]
        subprocess.run(engram + ["create", *where, "--from-config", str(checkpoint)], check=True, capture_output=True,
                       env=env)
        drop_page_cache(checkpoint)
        out = subprocess.run(engram + ["import", *where, "--checkpoint", str(checkpoint), "--activate", "--json",
                                       "--no-progress"], check=True, capture_output=True, text=True, env=env).stdout
        report = json.loads(out)
        print(json.dumps(report))
        seconds_189 = 189 * 2**30 / (report["mb_per_s"] * 1e6)
        print(f"import into {'a 2-shard pool' if args.pool else 'one service'}: {report['mb_per_s']:.0f} MB/s from a cold "
              f"page cache; V4.1's 189 GiB at that rate: {seconds_189 / 60:.0f} min")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        else:
            subprocess.run(cli + ["cluster", "down", "--pool", "v41", "--stop-ray"], capture_output=True, env=env)


if __name__ == "__main__":
    main()
