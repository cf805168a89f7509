"""`engram serve | table ... | query`: the memory-service commands, on one service (--address) or a pool (--ray).

What a command acts on is decided in one place, `open_admin` and `open_data_client`
below: they return a TableAdmin or a MemoryClient, and the commands work through those
interfaces alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from memory_service.admin.table_admin import TableAdmin
from memory_service.client import MemoryClient


# ---------------------------------------------------------------------- what a command acts on
def token_from(args) -> str | None:
    """The write/admin token: --token, else $ENGRAM_TOKEN."""
    return getattr(args, "token", None) or os.environ.get("ENGRAM_TOKEN") or None


def open_admin(args) -> TableAdmin:
    """The TableAdmin of `--ray RAY_ADDRESS [--pool NAME]` (a pool, through its directory) or of `--address HOST:PORT`."""
    if getattr(args, "ray", None):
        from orchestration.pool import MemoryPool
        from orchestration.pool_admin import PoolAdmin
        from orchestration.ray_cluster import connect_ray

        connect_ray(args.ray)
        return PoolAdmin(MemoryPool.attach(args.pool), token=token_from(args), deadline_s=args.deadline)
    from memory_service.admin import ServiceAdmin

    tls = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return ServiceAdmin(args.address, token=token_from(args), deadline_s=args.deadline, tls_root_cert=tls)


def open_data_client(args, table: str, version: int = 0) -> MemoryClient:
    """A MemoryClient of a table on `--address` or on the pool of `--ray` (pinned to `version`, 0: the active one)."""
    if getattr(args, "ray", None):
        admin = open_admin(args)
        return admin.data_client(table, version)
    tls = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return MemoryClient(args.address, table, token=token_from(args), deadline_s=args.deadline, tls_root_cert=tls,
                        version=version)


# ---------------------------------------------------------------------- the commands
def serve(args) -> int:
    """engram serve: one store as a standalone gRPC server until SIGTERM/SIGINT."""
    from memory_service.server import serve as run_server

    def ready(port):
        print(f"engram memory service on {args.host}:{port} (store {args.path}); Ctrl-C to stop", flush=True)

    run_server(args.path, args.host, args.port, token_from(args), args.tls_cert, args.tls_key, ready=ready,
               metrics_port=args.metrics_port, max_delta_rows=args.max_delta_rows,
               allow_unauthenticated=args.allow_unauthenticated,
               warm_every_s=args.keep_warm if args.keep_warm is not None else (0 if args.warm else None))
    return 0


def _spec_for_create(args):
    """(spec, compression map) for `table create` from a checkpoint, a spec file or a preset."""
    from memory_service.compression import CompressedTokenizer
    from memory_service.spec import EngramSpec

    if args.from_config:
        from orchestration.commands_checkpoint import spec_for_config

        return spec_for_config(args)
    if args.from_checkpoint:
        from model_worker import checkpoint as ckpt

        directory = ckpt.require_checkpoint(args.from_checkpoint)
        state = json.loads((directory / ckpt.CONFIG_FILE).read_text())
        spec = ckpt.model_config_from_dict(state["model"]).engram
        return spec, CompressedTokenizer.load(directory / ckpt.COMPRESSION_FILE)
    if args.spec_json:
        spec = EngramSpec.from_json(Path(args.spec_json).read_text())
    else:
        from model_worker.data import load_corpus
        from model_worker.presets import build_preset

        corpus = load_corpus(tokenizer_path=args.tokenizer, log=lambda *a: print(*a, file=sys.stderr))
        args.tokenizer = str(corpus.tokenizer_path)
        spec = build_preset(args.preset, corpus.vocab_size, corpus.pad_id).engram
    compressor = None
    if args.compression_map:
        compressor = CompressedTokenizer.load(args.compression_map)
    elif args.tokenizer:
        compressor = CompressedTokenizer.from_tokenizer_file(args.tokenizer)
    if args.dtype:
        spec = dataclasses.replace(spec, dtype=args.dtype)
    if args.optimizer_state:
        spec = dataclasses.replace(spec, optimizer_state=args.optimizer_state)
    if compressor is not None and not spec.compression_digest:
        spec = spec.with_compression(compressor.lookup_table, len(compressor))
    return spec, compressor


def table(args) -> int:
    """engram table create|new-version|import|export|info|list|swap|rollback|drop, through one TableAdmin."""
    admin = open_admin(args)
    try:
        return TABLE_ACTIONS[args.action](admin, args)
    finally:
        admin.close()


def _list(admin: TableAdmin, args) -> int:
    out = [t.to_dict() for t in admin.list_tables()]
    if args.json:
        print(json.dumps(out, indent=2))
    for t in [] if args.json else out:
        print(f"{t['name']}: active v{t['active_version']}, versions {[v['version'] for v in t['versions']]}, "
              f"layers {t['layer_rows']}, head_dim {t['head_dim']}, fingerprint {t['fingerprint']}")
    if not out and not args.json:
        print(f"no tables on the {admin.where}")
    return 0


def _create(admin: TableAdmin, args) -> int:
    spec, compressor = _spec_for_create(args)
    init_std = 0.0 if args.from_checkpoint or args.from_config else args.init_std  # from a config: empty until imported
    info = admin.create_table(args.table, spec, compressor.lookup_table if compressor is not None else None,
                              init_std, args.seed, args.chunk_rows)
    if args.from_checkpoint:
        from memory_service.local_table import saved_rows
        from memory_service.spec import EngramSpec
        from model_worker import checkpoint as ckpt

        with np.load(Path(args.from_checkpoint) / ckpt.TABLES_FILE) as z:
            saved = EngramSpec.from_json(bytes(z["spec"]).decode())  # its row dtype, which the new table may not share
            for layer in spec.layer_ids:
                admin.import_rows(args.table, layer, saved_rows(z, saved, layer), version=1)  # cast to the table's
    print(json.dumps(info.to_dict(), indent=2) if args.json else
          f"created table {info.name!r} on the {admin.where}: version 1 active, layers {info.layer_rows}, "
          f"fingerprint {info.fingerprint}")
    return 0


def _new_version(admin: TableAdmin, args) -> int:
    if args.empty:
        version = admin.create_version(args.table)
        source = "empty"
    elif args.init_std is not None:
        version = admin.create_version(args.table, init_std=args.init_std, init_seed=args.seed)
        source = f"seeded rows (std {args.init_std}, seed {args.seed})"
    else:
        copy_of = args.copy_of or 0
        version = admin.create_version(args.table, copy_of=copy_of)
        source = f"a copy of version {copy_of}" if copy_of else "a copy of the active version"
    print(json.dumps({"table": args.table, "version": version}) if args.json else
          f"{args.table}: created version {version} ({source}); not active until `engram table swap --version {version}`")
    return 0


def _info(admin: TableAdmin, args) -> int:
    print(json.dumps(admin.info(args.table).to_dict(), indent=2))
    return 0


def _swap(admin: TableAdmin, args) -> int:
    active, previous = admin.swap(args.table, args.version)
    print(f"{args.table}: active version {active} (was {previous})")
    return 0


def _rollback(admin: TableAdmin, args) -> int:
    active, previous = admin.rollback(args.table)
    print(f"{args.table}: rolled back to version {active} (was {previous})")
    return 0


def _drop(admin: TableAdmin, args) -> int:
    if args.version:
        admin.drop_version(args.table, args.version)
        print(f"{args.table}: dropped version {args.version}")
    else:
        admin.drop_table(args.table)
        print(f"dropped table {args.table!r}")
    return 0


def _import(admin: TableAdmin, args) -> int:
    from memory_service.table_io import read_table_file

    if args.checkpoint:
        from orchestration.commands_checkpoint import import_checkpoint

        return import_checkpoint(admin, args)
    if args.layer is None:
        raise ValueError("--file needs --layer (the layer whose rows it holds)")

    rows = read_table_file(args.file, args.key)  # lazy: read a block at a time
    row_bytes = int(np.prod(rows.shape[1:])) * rows.dtype.itemsize
    started = time.perf_counter()
    with tqdm(total=rows.shape[0] * row_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="import",
              dynamic_ncols=True, disable=args.no_progress or None) as bar:
        version = admin.import_rows(args.table, args.layer, rows, version=args.version or 0, activate=args.activate,
                                    progress=lambda n: bar.update(n * row_bytes))
    seconds = time.perf_counter() - started
    print(f"imported {rows.shape[0]:,} rows ({rows.shape[0] * row_bytes / 2**20:,.0f} MiB) into {args.table!r} layer "
          f"{args.layer}, version {version}, in {seconds:.1f} s ({rows.shape[0] * row_bytes / 2**20 / seconds:,.0f} MiB/s)"
          + (" (now active)" if args.activate else ""))
    return 0


def _export(admin: TableAdmin, args) -> int:
    from memory_service.table_io import write_table_file

    if args.checkpoint:
        from orchestration.commands_checkpoint import export_checkpoint

        return export_checkpoint(admin, args)
    info = admin.info(args.table)
    if info.row_width != info.head_dim:
        raise ValueError(f"table {args.table!r} stores {info.spec.dtype} records: export them with --checkpoint DIR "
                         "(V4.1's layout: codes and scales as F8 tensors)")
    layers = [args.layer] if args.layer is not None else sorted(info.layer_rows)
    write_table_file(args.out, {layer: admin.export_rows(args.table, layer, args.version) for layer in layers})
    print(f"exported layers {layers} of {args.table!r} to {args.out}")
    return 0


def _quantize(admin: TableAdmin, args) -> int:
    from orchestration.commands_checkpoint import quantize_table

    return quantize_table(admin, args)


TABLE_ACTIONS = {"list": _list, "create": _create, "new-version": _new_version, "info": _info, "swap": _swap,
                 "rollback": _rollback, "drop": _drop, "import": _import, "export": _export, "quantize": _quantize}


def _parse_ids(text: str) -> np.ndarray:
    try:
        return np.asarray([int(t) for t in text.replace(",", " ").split()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"ids must be integers separated by commas or spaces, got {text!r}") from None


def query(args) -> int:
    """engram query: rows for text, token ids or row ids (of one service or a pool), printed as a summary or in full."""
    client = open_data_client(args, args.table, args.version)
    try:
        return _query(client, args)
    finally:
        client.close()


def _query(client, args) -> int:
    if args.row_ids is not None:
        ids = _parse_ids(args.row_ids)
        rows, version = client.lookup_raw(args.layer, ids)
        row_ids = ids
    else:
        if args.text is not None:
            from model_worker.data import load_tokenizer

            tokenizer_path = args.tokenizer or _default_tokenizer()
            tokens = load_tokenizer(tokenizer_path).encode(args.text, add_special_tokens=False).ids
            if not tokens:
                raise ValueError("the text encodes to no tokens")
        else:
            tokens = _parse_ids(args.token_ids)
        rows, row_ids, version = client.lookup_tokens(args.layer, np.asarray([tokens]), compressed=args.compressed)
        rows, row_ids = rows[0], row_ids[0]
    flat = client.values(rows)  # float32 [..., head_dim]: FP8 records dequantized
    result = {"table": args.table, "layer": args.layer, "version": version, "shape": list(flat.shape),
              "dtype": client.spec.dtype, "row_ids": row_ids.tolist()}
    if args.full:
        result["rows"] = flat.tolist()
    else:
        result["summary"] = {"mean": float(flat.mean()), "std": float(flat.std()), "min": float(flat.min()), "max": float(flat.max()),
                             "first_row_head": flat.reshape(-1, flat.shape[-1])[0, :8].round(4).tolist()}
    print(json.dumps(result, indent=None if args.full else 2))
    return 0


def _default_tokenizer() -> str:
    from model_worker.data import cache_dir

    candidates = sorted(cache_dir().glob("tokenizer-*.json"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError("no tokenizer given and none cached: pass --tokenizer tokenizer.json (or run engram train once)")
    return str(candidates[-1])
