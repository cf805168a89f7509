"""`engram serve | table ... | query`: the memory-service commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from orchestration.commands_model import token_from

IMPORT_BLOCK_ROWS = 1 << 20  # rows read from a table file and sent per step of an import


def serve(args) -> int:
    """engram serve: one store as a standalone gRPC server until SIGTERM/SIGINT."""
    from memory_service.server import serve as run_server

    def ready(port):
        print(f"engram memory service on {args.host}:{port} (store {args.path}); Ctrl-C to stop", flush=True)

    run_server(args.path, args.host, args.port, token_from(args), args.tls_cert, args.tls_key, ready=ready,
               metrics_port=args.metrics_port, max_delta_rows=args.max_delta_rows)
    return 0


def _client(args, table: str | None = None, connect: bool = True):
    from memory_service.client import AdminClient, MemoryClient

    name = table if table is not None else args.table
    tls = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    cls = MemoryClient if connect else AdminClient
    return cls(args.address, name, token=token_from(args), deadline_s=args.deadline, tls_root_cert=tls)


class ServiceTables:
    """Table operations on one memory service (--address)."""

    def __init__(self, args):
        self.args = args

    def client(self):
        """A MemoryClient for args.table."""
        return _client(self.args)

    def create(self, spec, compression_map, init_std: float, init_seed: int, chunk_rows: int):
        """Create args.table; returns a client for it."""
        admin = _client(self.args, connect=False)
        admin.create_table(spec, compression_map, init_std=init_std, init_seed=init_seed, chunk_rows=chunk_rows)
        return admin

    def create_version(self, client) -> int:
        """A new version copied from the active one."""
        return client.create_version(copy_of=0)

    def swap(self, client, version: int) -> tuple[int, int]:
        """Activate a version; (active, previous)."""
        return client.swap(version)

    def drop_table(self, client) -> None:
        """Delete the table."""
        client.drop_table()


class PoolTables(ServiceTables):
    """The same operations on every shard of a Ray memory pool, through its directory (--ray)."""

    def __init__(self, args):
        from orchestration.commands_cluster import connect_ray
        from orchestration.pool import MemoryPool

        super().__init__(args)
        connect_ray(args.ray)
        self.pool = MemoryPool.attach(args.pool)

    def client(self):
        if self.args.table not in self.pool.tables():
            from memory_service.errors import NotFound

            raise NotFound(f"the memory pool {self.args.pool!r} has no table {self.args.table!r}")
        return self.pool.client(self.args.table, token=token_from(self.args), deadline_s=self.args.deadline)

    def create(self, spec, compression_map, init_std: float, init_seed: int, chunk_rows: int):
        if self.args.table in self.pool.tables():
            from memory_service.errors import AlreadyExists

            raise AlreadyExists(f"table {self.args.table!r} already exists on the memory pool {self.args.pool!r}")
        self.pool.create_table(self.args.table, spec, compression_map, init_std=init_std, init_seed=init_seed,
                               chunk_rows=chunk_rows or 4096)
        return self.client()

    def create_version(self, client) -> int:
        return self.pool.create_version(self.args.table, copy_of=self.pool.shard_map(self.args.table)[1])

    def swap(self, client, version: int) -> tuple[int, int]:
        previous = self.pool.shard_map(self.args.table)[1]
        self.pool.swap(self.args.table, version)
        return version, previous

    def drop_table(self, client) -> None:
        self.pool.drop_table(self.args.table, token=token_from(self.args))


def _info_dict(info) -> dict:
    return {
        "name": info.name, "fingerprint": info.spec_fingerprint, "active_version": info.active_version,
        "versions": [{"version": v.version, "source": v.source, "created_unix": round(v.created_unix, 3)} for v in info.versions],
        "swap_history": list(info.swap_history), "layer_rows": {str(k): v for k, v in sorted(info.layer_rows.items())},
        "head_dim": info.head_dim, "chunk_rows": info.chunk_rows, "has_compression_map": info.has_compression_map,
        "spec": json.loads(info.spec_json),
    }


def _spec_for_create(args):
    """(spec, compression map) for `table create` from a checkpoint, a spec file or a preset."""
    from memory_service.compression import CompressedTokenizer
    from memory_service.spec import EngramSpec

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
        import dataclasses

        spec = dataclasses.replace(spec, dtype=args.dtype)
    if compressor is not None and not spec.compression_digest:
        spec = spec.with_compression(compressor.lookup_table, len(compressor))
    return spec, compressor


def table(args) -> int:
    """engram table create|import|export|info|list|swap|rollback|drop (--ray: through a pool's directory)."""
    action = args.action
    if getattr(args, "ray", None) and action in ("info", "list", "swap", "rollback"):
        from orchestration.commands_cluster import pool_table

        args.address = args.ray
        return pool_table(args)
    target = PoolTables(args) if getattr(args, "ray", None) else ServiceTables(args)
    if action == "list":
        tables = _client(args, "", connect=False).list_tables()
        out = [_info_dict(t) for t in tables]
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            for t in out:
                print(f"{t['name']}: active v{t['active_version']}, versions {[v['version'] for v in t['versions']]}, "
                      f"layers {t['layer_rows']}, head_dim {t['head_dim']}, fingerprint {t['fingerprint']}")
            if not out:
                print("no tables")
        return 0
    if action == "create":
        spec, compressor = _spec_for_create(args)
        init_std = 0.0 if args.from_checkpoint else args.init_std
        admin = target.create(spec, compressor.lookup_table if compressor is not None else None,
                              init_std, args.seed, args.chunk_rows)
        if args.from_checkpoint:
            from model_worker import checkpoint as ckpt

            tables = Path(args.from_checkpoint) / ckpt.TABLES_FILE
            with np.load(tables) as z:
                for layer in spec.layer_ids:
                    rows = z[f"rows/{layer}"]
                    for start in range(0, rows.shape[0], IMPORT_BLOCK_ROWS):
                        block = rows[start:start + IMPORT_BLOCK_ROWS]
                        admin.write_rows(layer, np.arange(start, start + block.shape[0]), block, version=1)
        info = admin.info()
        print(json.dumps(_info_dict(info), indent=2) if args.json else
              f"created table {info.name!r}: version 1 active, layers {dict(info.layer_rows)}, fingerprint {info.spec_fingerprint}")
        return 0

    client = target.client()
    if action == "info":
        info = _info_dict(client.info())
        print(json.dumps(info, indent=2))
    elif action == "swap":
        active, previous = client.swap(args.version)
        print(f"{args.table}: active version {active} (was {previous})")
    elif action == "rollback":
        active, previous = client.rollback()
        print(f"{args.table}: rolled back to version {active} (was {previous})")
    elif action == "drop":
        if args.version:
            client.drop_version(args.version)
            print(f"{args.table}: dropped version {args.version}")
        else:
            target.drop_table(client)
            print(f"dropped table {args.table!r}")
    elif action == "import":
        from memory_service.table_io import read_table_file

        rows = read_table_file(args.file, args.key)
        expected = (client.num_rows(args.layer), client.spec.head_dim)
        if tuple(rows.shape) != expected:
            raise ValueError(f"{args.file} holds rows {list(rows.shape)}, layer {args.layer} of {args.table!r} needs {list(expected)}")
        # a new version (a copy of the active one, so rows outside this layer stay) unless one is named
        version = args.version if args.version else target.create_version(client)
        for start in range(0, rows.shape[0], IMPORT_BLOCK_ROWS):
            block = np.asarray(rows[start:start + IMPORT_BLOCK_ROWS]).astype(client.dtype)
            client.write_rows(args.layer, np.arange(start, start + block.shape[0]), block, version=version)
        print(f"imported {rows.shape[0]} rows into {args.table!r} layer {args.layer}, version {version}")
        if args.activate:
            active, previous = target.swap(client, version)
            print(f"{args.table}: active version {active} (was {previous})")
    elif action == "export":
        from memory_service.table_io import write_table_file

        layers = [args.layer] if args.layer is not None else sorted(client.layer_rows)
        out = {}
        for layer in layers:
            parts = [client.read_layer(layer, args.version, s, min(s + IMPORT_BLOCK_ROWS, client.num_rows(layer)))
                     for s in range(0, client.num_rows(layer), IMPORT_BLOCK_ROWS)]
            out[layer] = np.concatenate(parts)
        write_table_file(args.out, out)
        print(f"exported layers {layers} of {args.table!r} to {args.out}")
    else:
        raise ValueError(f"unknown table action {action!r}")
    return 0


def _parse_ids(text: str) -> np.ndarray:
    try:
        return np.asarray([int(t) for t in text.replace(",", " ").split()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"ids must be integers separated by commas or spaces, got {text!r}") from None


def query(args) -> int:
    """engram query: rows for text, token ids or row ids, printed as a summary (or in full)."""
    client = _client(args)
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
    result = {"table": args.table, "layer": args.layer, "version": version, "shape": list(rows.shape),
              "dtype": rows.dtype.name, "row_ids": row_ids.tolist()}
    flat = rows.astype(np.float32)
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
