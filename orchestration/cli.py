"""The `engram` command line.

    engram train | generate | compress        model side (commands_model.py)
    engram serve | table ... | query          memory service or pool (commands_memory.py)
    engram demo                               the whole system (demo.py)
    engram cluster | shards | workers         a Ray cluster's pool and training job (commands_cluster.py)
    engram serve-model [scale N|status|down]  a model served over HTTP by Ray Serve (commands_serve.py)
    engram experiment iso|allocation          model-quality experiments (experiments.py)
    engram bench hash|lookup|push|step        benchmarks with same-run baselines (bench.py)

Heavy imports happen inside each command so `engram --help` is instant. Errors a user
can cause print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from memory_service.errors import EngramError
from memory_service.row_dtypes import FLOAT_DTYPES, FP8_BLOCK_SCALED, ROW_DTYPES
from memory_service.row_optim import OPTIMIZER_STATES

# Sizes of each benchmark when not given (--rows, --batch, --repeats).
BENCH_DEFAULTS = {
    "hash": {"repeats": 5},
    "lookup": {"rows": 1 << 24, "batch": 262144, "repeats": 15},
    "lookup-fp8": {"rows": 1 << 21, "batch": 65536, "repeats": 15},  # two tables of 256-value rows: 1.5 GiB
    "push": {"rows": 1 << 23, "batch": 5400, "repeats": 30},
    "disk": {"rows": 1 << 28, "batch": 16384},
    "generate": {"repeats": 3},  # rounds: the median of three turns per mode (this machine's drift is +-10%)
}


def _bench(args) -> int:
    from orchestration import bench

    def log(*parts):
        print(*parts, file=sys.stderr)

    if args.format and args.what != "lookup":
        raise ValueError("--format compares row formats in `engram bench lookup` only")
    defaults = BENCH_DEFAULTS.get(f"{args.what}-{args.format}" if args.format else args.what, {})
    for name, value in defaults.items():  # each benchmark's own sizes, unless given
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.what == "hash":
        result = bench.bench_hash(args.tokens, args.repeats)
    elif args.what == "push":
        from orchestration.bench_push import bench_push

        result = bench_push(args.rows, args.dim, args.dtype, args.batch, args.repeats, args.baseline_rows,
                            args.optimizer_state, log=log)
    elif args.what == "disk":
        from orchestration.bench_disk import bench_disk

        result = bench_disk(args.rows, args.dim, args.dtype, args.batch, args.seconds, args.path, log=log)
    elif args.what == "step":
        result = bench.bench_step(args.preset, args.steps)
    elif args.what == "generate":
        from orchestration.bench_generate import bench_generate, plot_generate

        concurrency = tuple(int(c) for c in args.concurrency.split(","))
        result = bench_generate(args.preset, concurrency, args.new_tokens, args.repeats, args.cache_mb,
                                shards=args.generate_shards, log=log)
        if args.plot:
            plot_generate(result, args.plot)
    elif args.format == "fp8":
        from orchestration.bench_fp8 import bench_lookup_fp8

        result = bench_lookup_fp8(args.rows, args.batch, args.repeats, args.path, log=log)
    else:
        result = bench.bench_lookup(args.rows, args.dim, args.dtype, args.batch, args.repeats, args.path, log=log)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "lines"}, indent=2))
    else:
        print("\n".join(result["lines"]))
    return 0


def _lazy(module: str, name: str):
    def run(args):
        import importlib

        return getattr(importlib.import_module(f"orchestration.{module}"), name)(args)
    return run


def _service_args(p, table: bool = True, table_required: bool = True) -> None:
    p.add_argument("--address", default="127.0.0.1:50051", help="memory service HOST:PORT (or grpc://HOST:PORT)")
    p.add_argument("--token", help="token for writes and admin calls (default $ENGRAM_TOKEN)")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds per call")
    p.add_argument("--tls-ca", help="PEM root certificate: connect with TLS")
    if table:
        p.add_argument("--table", required=table_required, help="table name")
    p.add_argument("--ray", help="Ray cluster address: act on a memory pool's tables through its directory (instead of --address)")
    p.add_argument("--pool", default="default", help="pool name (with --ray)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _checkpoint_names(p) -> None:
    p.add_argument("--weight-pattern", default="layers.{layer}.engram.embed.weight",
                   help="with --checkpoint: name of a layer's F8_E4M3 codes")
    p.add_argument("--scale-pattern", default="layers.{layer}.engram.embed.scale",
                   help="with --checkpoint: name of a layer's F8_E8M0 scales")


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `engram` command."""
    parser = argparse.ArgumentParser(prog="engram", description="Engram memory service and Engram-MoE model")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an Engram-MoE model (built-in corpus: the Python standard library)")
    p.add_argument("--preset", default="tiny", help="model preset: tiny (seconds), small (minutes)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float, help="peak dense learning rate (Engram rows: x5)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run directory (default runs/<preset>)")
    p.add_argument("--data", help="corpus directory or file (default: the Python standard library)")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of training one")
    p.add_argument("--memory", help="grpc://HOST:PORT: keep the Engram tables on the memory service (default in-process)")
    p.add_argument("--table", help="table name on the memory service (default engram-<preset>; created if missing)")
    p.add_argument("--version", type=int, help="train this table version (engram table new-version) while the active one "
                   "keeps serving; default: the active version")
    p.add_argument("--table-dtype", choices=FLOAT_DTYPES, help="row dtype of the Engram tables (default: the preset's)")
    p.add_argument("--optimizer-state", choices=OPTIMIZER_STATES, help="row-wise Adam state: exact (default; m and v "
                   "per value, fp32: 8 x head_dim + 8 bytes a row) or compact (bf16 m, one v per row: 2 x head_dim + 8)")
    p.add_argument("--token", help="memory service token (default $ENGRAM_TOKEN)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    p.add_argument("--stop-after", type=int, help="stop (with a checkpoint) once this many steps are done")
    p.add_argument("--no-prefetch", action="store_true", help="fetch each step's rows before the forward pass (for comparison)")
    p.add_argument("--mode", choices=["sync", "async"], help="sync: lookups see every earlier update; async: the row push "
                   "overlaps the next step (staleness <= 1)")
    p.add_argument("--device", help="auto (default: CUDA when torch can use it), cpu, or cuda[:N] "
                   "(an error naming the cause, never a CPU fallback, when the GPU cannot be used)")
    p.add_argument("--workers", type=int, help="with --memory pool[:NAME]: data-parallel model workers as Ray actors "
                   "(scale them with engram workers scale)")
    p.add_argument("--address", help="Ray cluster address for --workers (default $RAY_ADDRESS or engram cluster up's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_lazy("commands_model", "train"))

    p = sub.add_parser("generate", help="continue a prompt from a checkpoint")
    p.add_argument("--checkpoint", help="checkpoint directory (default runs/<preset>/checkpoint)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", help="grpc://HOST:PORT holding the tables (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (no CPU fallback)")
    p.set_defaults(func=_lazy("commands_model", "generate"))

    p = sub.add_parser("compress", help="build a tokenizer's compression map and report the reduction")
    p.add_argument("--tokenizer", required=True, help="tokenizers tokenizer.json")
    p.add_argument("--out", help="write the map (.npy)")
    p.add_argument("--clean-up-spaces", action="store_true", help="apply transformers' clean_up_tokenization_spaces when decoding")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_lazy("commands_model", "compress"))

    p = sub.add_parser("serve", help="run one LMDB store as a gRPC memory service")
    p.add_argument("--path", required=True, help="store directory (an LMDB environment)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=50051, help="port (0 = any free port)")
    p.add_argument("--token", help="require this bearer token for writes and admin calls (default $ENGRAM_TOKEN)")
    p.add_argument("--tls-cert", help="PEM certificate chain (enables TLS with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--metrics-port", type=int, help="also serve Prometheus /metrics on this port (0 = any free port)")
    p.add_argument("--max-delta-rows", type=int,
                   help="recent pushed rows per layer kept beside the chunks before they are compacted (default 32768)")
    p.add_argument("--warm", action="store_true", help="read every table's active rows once at start (in the background), "
                   "so first lookups find them in the page cache")
    p.add_argument("--keep-warm", type=float, metavar="SECONDS", help="... and again every SECONDS (a host that evicts "
                   "idle page cache, like this VM after 30-60 s; only what fits in RAM stays)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a non-loopback --host without a token (anyone who reaches it can write and drop tables)")
    p.set_defaults(func=_lazy("commands_memory", "serve"))

    p = sub.add_parser("table", help="create, import, export, inspect and version tables")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("create", help="create a table set (version 1 active)")
    _service_args(a)
    a.add_argument("--from-checkpoint", help="spec, compression map and trained rows of an engram train checkpoint")
    a.add_argument("--from-config", help="a DeepSeek-V4.1-style config.json (or its checkpoint directory): the spec "
                   "from its engram_* keys, refused unless our layout gives its engram_num_embeddings; rows "
                   f"{FP8_BLOCK_SCALED} unless --dtype, empty until imported (--seed: hash seed, default 0)")
    a.add_argument("--spec-json", help="EngramSpec JSON file")
    a.add_argument("--preset", default="tiny", help="take the spec of a model preset (with --tokenizer or the cached one)")
    a.add_argument("--tokenizer", help="tokenizer.json: builds the compression map (enables token queries)")
    a.add_argument("--compression-map", help="compression map .npy (engram compress --out)")
    a.add_argument("--dtype", choices=ROW_DTYPES, help="row dtype")
    a.add_argument("--optimizer-state", choices=OPTIMIZER_STATES, help="row-wise Adam state kept per row (default exact)")
    a.add_argument("--init-std", type=float, default=1.0, help="seeded N(0, std^2) rows (0 = zeros)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--chunk-rows", type=int, default=0, help="rows per LMDB value (default 1024)")
    for action, text in (("info", "spec, versions and sizes of a table"), ("rollback", "re-activate the previous version")):
        a = actions.add_parser(action, help=text)
        _service_args(a)
    a = actions.add_parser("list", help="every table on the service")
    _service_args(a, table=False)
    a = actions.add_parser("new-version", help="a new inactive version: a copy (default: of the active one), seeded, or empty")
    _service_args(a)
    source = a.add_mutually_exclusive_group()
    source.add_argument("--copy-of", type=int, help="copy this version's rows and optimizer state (default: the active one)")
    source.add_argument("--empty", action="store_true", help="zero rows (for imports)")
    source.add_argument("--init-std", type=float, help="seeded N(0, std^2) rows")
    a.add_argument("--seed", type=int, default=0, help="with --init-std")
    a = actions.add_parser("swap", help="activate a version (atomically)")
    _service_args(a)
    a.add_argument("--version", type=int, required=True)
    a = actions.add_parser("drop", help="delete a version (or, without --version, the table)")
    _service_args(a)
    a.add_argument("--version", type=int)
    a = actions.add_parser("import", help="load a layer's rows from .npy, safetensors or a reference torch state dict, "
                           "or every Engram layer of a V4.1-layout checkpoint")
    _service_args(a)
    a.add_argument("--layer", type=int, help="with --file: the layer its rows are for")
    source = a.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", help="one layer's rows (.npy, .safetensors, .pt)")
    source.add_argument("--checkpoint", help="a checkpoint directory whose safetensors shards hold the Engram tables "
                        "(model.safetensors.index.json): every layer into one new version, FP8 records as they are")
    _checkpoint_names(a)
    a.add_argument("--key", help="tensor name in the file (default: the reference's multi_head_embedding.embedding.weight)")
    a.add_argument("--version", type=int, help="write into this version (default: a new version)")
    a.add_argument("--activate", action="store_true", help="swap to the imported version")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = actions.add_parser("export", help="write rows to .npy (one layer) or .safetensors, or an FP8 table in V4.1's "
                           "checkpoint layout")
    _service_args(a)
    a.add_argument("--layer", type=int)
    a.add_argument("--version", type=int, default=0)
    target = a.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help=".npy or .safetensors file")
    target.add_argument("--checkpoint", help="directory: one safetensors shard per layer (weight F8_E4M3, scale "
                        "F8_E8M0) and model.safetensors.index.json")
    _checkpoint_names(a)
    a = actions.add_parser("quantize", help=f"a float table's rows into a new version of an {FP8_BLOCK_SCALED} table "
                           "(created with the same hashing if absent); prints the error it introduces")
    _service_args(a)
    a.add_argument("--into", required=True, help="the FP8 table")
    a.add_argument("--version", type=int, default=0, help="version of --table to quantize (default: the active one)")
    a.add_argument("--activate", action="store_true", help="swap the FP8 table to the new version")
    a.add_argument("--tokenizer", help="with a new --into: tokenizer.json for its compression map (token lookups)")
    a.add_argument("--compression-map", help="with a new --into: compression map .npy")
    p.set_defaults(func=_lazy("commands_memory", "table"))

    p = sub.add_parser("query", help="look rows up on a running memory service")
    _service_args(p)
    p.add_argument("--layer", type=int, required=True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="text: tokenized here, compressed and hashed by the server")
    what.add_argument("--token-ids", help="token ids, comma or space separated")
    what.add_argument("--row-ids", help="row ids of the layer's table")
    p.add_argument("--compressed", action="store_true", help="--token-ids are already compressed")
    p.add_argument("--version", type=int, default=0, help="table version to read (default: the active one)")
    p.add_argument("--tokenizer", help="tokenizer.json for --text (default: the cached built-in one)")
    p.add_argument("--full", action="store_true", help="print every row, not a summary")
    p.set_defaults(func=_lazy("commands_memory", "query"))

    p = sub.add_parser("demo", help="the whole system: Ray memory pool + model worker, train, generate, summary")
    p.add_argument("--address", help="join an existing Ray cluster (default: start a local one)")
    p.add_argument("--shards", type=int, default=2, help="memory shards")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", default="engram-demo")
    p.add_argument("--token", help="token for writes and admin calls on the shards")
    p.add_argument("--out", help="run directory (default runs/demo)")
    p.add_argument("--pool-dir", help="where shards keep their stores (default: a temporary directory)")
    p.add_argument("--prompt", default="def main():")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--workers", type=int, default=1, help="data-parallel model workers")
    p.add_argument("--mode", choices=["sync", "async"], default="sync")
    p.add_argument("--keep-serving", action="store_true", help="leave the pool up after the run")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_lazy("demo", "run_demo"))

    p = sub.add_parser("cluster", help="start, inspect or stop the memory pool on a Ray cluster")
    p.add_argument("action", choices=["up", "status", "down"])
    p.add_argument("--address", help="Ray cluster address (up without it starts a local head on loopback)")
    p.add_argument("--pool", default="default", help="pool name")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--host", help="address shards bind and advertise: 127.0.0.1 (default for a local head) or auto "
                   "(each node's own address; the default with --address)")
    p.add_argument("--memory-resource", default="engram_memory", help="Ray resource that marks memory nodes")
    p.add_argument("--pool-dir", help="shard store directory on each memory node")
    p.add_argument("--ray-port", type=int, default=6380, help="port of a local head started by up")
    p.add_argument("--token", help="token the shards require for writes and admin calls")
    p.add_argument("--stop-ray", action="store_true", help="down: also stop the local Ray head")
    p.add_argument("--metrics-port", type=int, help="up: each shard serves Prometheus /metrics on this port + its id")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="up: let shards on a non-loopback host serve without --token (writes open to the network)")
    p.set_defaults(func=_lazy("commands_cluster", "cluster"))

    p = sub.add_parser("shards", help="change the number of memory shards while traffic continues")
    p.add_argument("action", choices=["scale"])
    p.add_argument("num_shards", type=int)
    p.add_argument("--address", help="Ray cluster address")
    p.add_argument("--pool", default="default")
    p.set_defaults(func=_lazy("commands_cluster", "shards"))

    p = sub.add_parser("workers", help="change the number of data-parallel model workers of a running training job")
    p.add_argument("action", choices=["scale", "status"])
    p.add_argument("num_workers", type=int, nargs="?")
    p.add_argument("--address", help="Ray cluster address")
    p.add_argument("--pool", default="default", help="the pool the job trains on")
    p.set_defaults(func=_lazy("commands_cluster", "workers"))

    p = sub.add_parser("serve-model", help="serve a trained model over HTTP (Ray Serve), its rows on a memory pool")
    p.add_argument("action", nargs="?", choices=["start", "scale", "status", "down"], default="start",
                   help="start (default): deploy --checkpoint; scale N: replicas; status; down: stop serving")
    p.add_argument("num_replicas", type=int, nargs="?", help="scale: the number of replicas")
    p.add_argument("--checkpoint", help="start: an engram train checkpoint directory (readable on every node)")
    p.add_argument("--memory", help="start: where the rows are, pool[:NAME] or grpc://HOST:PORT (default: where the "
                   "checkpoint says)")
    p.add_argument("--replicas", type=int, default=1, help="start: model replicas (scale them with serve-model scale N)")
    p.add_argument("--version", type=int, help="start: serve this table version (default: follow the active one, so "
                   "a swap reaches new requests)")
    p.add_argument("--name", default="engram", help="serving application name")
    p.add_argument("--route-prefix", default="/", help="start: URL prefix of the application")
    p.add_argument("--host", default="127.0.0.1", help="start: HTTP address (when this starts Ray Serve)")
    p.add_argument("--port", type=int, default=8000, help="start: HTTP port (when this starts Ray Serve)")
    p.add_argument("--proxies", choices=["head", "every"], default="head", help="start: HTTP proxy on the head node "
                   "only or on every node")
    p.add_argument("--device", default="auto", help="start: replicas compute on auto (CUDA when usable), cpu or cuda")
    p.add_argument("--max-batch", type=int, default=32, help="start: decoding slots (requests in the batch) a replica")
    p.add_argument("--cache-mb", type=int, default=64, help="start: row cache a replica, MiB (0: none)")
    p.add_argument("--replica-cpus", type=float, help="start: CPUs a replica reserves (default 1, or 0 with a GPU)")
    p.add_argument("--token", help="memory service token (default $ENGRAM_TOKEN)")
    p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS or engram cluster up's)")
    p.set_defaults(func=_lazy("commands_serve", "serve_model"))

    p = sub.add_parser("experiment", help="model quality: Engram-MoE vs the iso-parameter MoE, and the allocation sweep")
    p.add_argument("what", choices=["iso", "allocation"], help="iso: both models over several seeds; allocation: "
                   "val loss against rho, the share of sparse parameters in routed experts")
    p.add_argument("--preset", help="model preset (default tiny)")
    p.add_argument("--steps", type=int, help="steps a run (default 1500)")
    p.add_argument("--batch-size", type=int, help="sequences a step (default 16)")
    p.add_argument("--seq-len", type=int, help="tokens a sequence (default 128)")
    p.add_argument("--lr", type=float, help="peak dense learning rate, both models (default 3e-3; Engram rows x5)")
    p.add_argument("--eval-every", type=int, help="steps between val losses (default 100)")
    p.add_argument("--seeds", help="iso: comma-separated seeds (default 0,1,2)")
    p.add_argument("--rhos", help="allocation: comma-separated rho values in (0, 1] (default 1,0.875,0.75,0.625,0.5,0.375)")
    p.add_argument("--seed", type=int, default=0, help="allocation: the seed of every point")
    p.add_argument("--out-dir", default="docs/results", help="where the JSON report and the PNG go")
    p.add_argument("--runs-dir", help="where each run's checkpoint and curves go (default runs/experiments/<what>)")
    p.add_argument("--memory", help="grpc://HOST:PORT or pool[:NAME]: Engram tables there (one table a run, dropped after)")
    p.add_argument("--token", help="memory service token (default $ENGRAM_TOKEN)")
    p.add_argument("--address", help="Ray cluster address with --memory pool")
    p.add_argument("--data", help="corpus (default: the built-in one)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: trained on the corpus and cached)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_lazy("experiments", "command"))

    p = sub.add_parser("bench", help="benchmarks (ratios against a baseline measured in the same run)")
    p.add_argument("what", choices=["hash", "lookup", "push", "disk", "step", "generate"])
    p.add_argument("--preset", default="small", help="step: model preset")
    p.add_argument("--steps", type=int, default=12, help="step: timed steps per mode")
    p.add_argument("--tokens", type=int, default=262144, help="hash: tokens")
    p.add_argument("--rows", type=int, help="lookup, push, disk: rows of the table's layer (default: lookup 2^24, push "
                   "2^23 timed against --baseline-rows, disk 2^28: 32 GiB, bigger than this machine's RAM)")
    p.add_argument("--dim", type=int, default=64, help="lookup, push, disk: row width")
    p.add_argument("--dtype", default="float16", choices=FLOAT_DTYPES)
    p.add_argument("--format", choices=["fp8"], help="lookup: FP8 records (256 values + 8 scales) against bf16 rows of "
                   "the same 256 values, same ids (default rows 2^21, batch 65536; --dim and --dtype do not apply)")
    p.add_argument("--batch", type=int, help="lookup: ids per batch (default 262144); push: rows per push (default 5400); "
                   "disk: ids per batch (default 16384)")
    p.add_argument("--path", help="lookup, disk: store directory to create or reuse (default: a temporary one)")
    p.add_argument("--seconds", type=float, default=20.0, help="disk: seconds of lookups per measurement")
    p.add_argument("--baseline-rows", type=int, default=1 << 20, help="push: rows of the table the cost is compared with")
    p.add_argument("--optimizer-state", choices=OPTIMIZER_STATES, default="exact", help="push: the tables' optimizer state")
    p.add_argument("--repeats", type=int, help="timed rounds (default: hash 5, lookup 15, push 30, generate 3)")
    p.add_argument("--concurrency", default="1,8,32,128", help="generate: offered concurrencies")
    p.add_argument("--new-tokens", type=int, default=64, help="generate: new tokens a request")
    p.add_argument("--cache-mb", type=int, default=64, help="generate: the worker's row cache (pool_prefetch_cache)")
    p.add_argument("--shards", dest="generate_shards", type=_positive_int, default=2,
                   help="generate: memory shards of the pool (each decoding step makes one call per shard)")
    p.add_argument("--plot", help="generate: draw tokens/s against concurrency per mode into this PNG")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `engram` console command."""
    args = build_parser().parse_args(argv)
    from memory_service.malloc_tuning import tune_glibc_malloc

    tune_glibc_malloc()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, EngramError) as e:
        print(f"engram {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
