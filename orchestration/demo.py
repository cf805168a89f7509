"""`engram demo`: the whole system on one machine (or an existing Ray cluster).

Starts a local Ray cluster (or joins --address), launches the memory pool (2 shards
by default) and one model worker, creates the Engram tables, trains the `small`
preset on the built-in corpus through the sharded service with prefetch, generates a
completion through the service, and prints a summary.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import tempfile
import time

from memory_service.compression import CompressedTokenizer
from model_worker.data import load_corpus
from model_worker.presets import build_preset

DEMO_DEFAULTS = {"preset": "small", "steps": 120, "batch_size": 8, "seq_len": 128, "lr": 2e-3, "eval_every": 40,
                 "eval_batches": 4, "ckpt_every": 10_000, "warmup_steps": 10}


def run_demo(args) -> int:
    """engram demo."""
    import os

    if args.address is None:  # a local cluster: keep Ray's own traffic on loopback (read when ray is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray's token authentication, chosen rather than defaulted: on (Ray keeps the token in ~/.ray/auth_token),
        # so the demo's cluster runs nobody else's code; said once, in our words, instead of Ray's banner.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from orchestration.pool import MemoryPool, PoolConfig
    from orchestration.pool_admin import PoolAdmin
    from orchestration.workers import follow_job, start_job

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    started = time.perf_counter()
    own_cluster = args.address is None
    if own_cluster:
        log(f"[demo] starting a local Ray cluster (Ray authentication mode: {os.environ['RAY_AUTH_MODE']}; "
            "set RAY_AUTH_MODE to choose)")
        ray.init(num_cpus=max(2, args.shards + 1, args.workers + 1), resources={"engram_memory": args.shards},
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=args.address, log_to_driver=False, configure_logging=False)
    base_dir = args.pool_dir or tempfile.mkdtemp(prefix="engram-demo-")
    if not own_cluster and not args.token:  # shards on other machines: never serve writes without a token
        args.token = secrets.token_hex(16)
        log("[demo] shards on a joined cluster need a token for writes; generated one for this run")
    pool = job = None
    try:
        log(f"[demo] memory pool: {args.shards} shards (stores under {base_dir})")
        pool = MemoryPool(PoolConfig(num_shards=args.shards, base_dir=base_dir, token=args.token,
                                     host="127.0.0.1" if own_cluster else "auto",
                                     detached=args.keep_serving and not own_cluster)).start()
        # The spec depends on the tokenizer: build it here, then create the tables on the pool.
        corpus = load_corpus(log=log)
        compressor = CompressedTokenizer.from_tokenizer_file(corpus.tokenizer_path)
        config = dict(DEMO_DEFAULTS, preset=args.preset, steps=args.steps, seed=args.seed,
                      out_dir=args.out or "runs/demo", memory="pool", table=args.table, prefetch=not args.no_prefetch,
                      tokenizer=str(corpus.tokenizer_path), mode=args.mode)
        spec = build_preset(args.preset, corpus.vocab_size, corpus.pad_id).engram.with_compression(
            compressor.lookup_table, len(compressor))
        if args.table in pool.tables():
            log(f"[demo] table {args.table!r} exists on the pool: training continues on it")
        else:
            PoolAdmin(pool).create_table(args.table, spec, compressor.lookup_table, init_std=1.0, init_seed=args.seed)
        shard_map, version = pool.shard_map(args.table)
        log(f"[demo] table {args.table!r}: version {version}, epoch {shard_map.epoch}, shards {shard_map.addresses}")
        if config["batch_size"] % args.workers:
            raise ValueError(f"batch size {config['batch_size']} does not split evenly over {args.workers} workers")
        job = start_job(config, args.workers, pool.config.name, args.token)
        log(f"[demo] training {args.preset} for {args.steps} steps through the pool on {args.workers} worker(s), "
            f"{args.mode} mode, prefetch {'off' if args.no_prefetch else 'on'} ...")
        summary = follow_job(job, log)
        text = ray.get(job.generate.remote(args.prompt, args.max_new_tokens, 0.8, args.seed), timeout=600)
        state = pool.state()
        served = sum(s["rows_served"] for s in state["shards"])
        lookup_seconds = sum(s.get("seconds.Lookup", 0.0) for s in state["shards"])
        result = {
            "val_loss_start": summary["val_loss_start"], "val_loss": summary["val_loss"], "unigram_loss": summary["unigram_loss"],
            "steps": summary["step"], "workers": summary["workers"], "device": summary["device"], "mode": args.mode,
            "tokens_per_s": summary["tokens_per_s"],
            "step_seconds": summary["step_seconds"],
            "prefetch_wait_ms_per_step": summary["prefetch_wait_ms_per_step"], "unique_id_ratio": summary["unique_id_ratio"],
            "rows_served": served, "lookup_rows_per_s": served / summary["wall_seconds"] if summary["wall_seconds"] else 0.0,
            "shard_lookup_handler_seconds": lookup_seconds,
            "table": args.table, "table_version": pool.shard_map(args.table)[1], "epoch": state["epoch"],
            "shard_map": {"addresses": state["addresses"], "bounds": state["tables"][args.table]["bounds"]},
            "generated": text, "wall_seconds": time.perf_counter() - started,
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_summary(result)
        if args.keep_serving:
            first = state["addresses"][0]
            log(f"[demo] serving; query a shard directly, e.g.\n  engram query --address {first} --table {args.table} --layer "
                f"{spec.layer_ids[0]} --row-ids 0,1,2\n(each shard holds a row range; Ctrl-C to stop)")
            if own_cluster:
                while True:
                    time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if job is not None:
            ray.get(job.stop.remote(), timeout=120)
            ray.kill(job)
        if pool is not None and not (args.keep_serving and not own_cluster):
            pool.shutdown()
        ray.shutdown()
        if not args.pool_dir and not args.keep_serving:
            shutil.rmtree(base_dir, ignore_errors=True)


def print_summary(r: dict) -> None:
    """Human-readable demo summary."""
    print("=" * 72)
    print(f"val loss            {r['val_loss_start']:.3f} -> {r['val_loss']:.3f}   (unigram baseline {r['unigram_loss']:.3f})")
    print(f"training            {r['steps']} steps on {r['workers']} worker(s) ({r['device']}), {r['mode']} mode, "
          f"{r['tokens_per_s']:.0f} tokens/s, {r['step_seconds'] * 1e3:.0f} ms/step")
    print(f"prefetch wait       {r['prefetch_wait_ms_per_step']:.1f} ms/step   unique-id ratio {r['unique_id_ratio']:.2f}")
    print(f"lookups             {r['rows_served']:,.0f} rows served, {r['lookup_rows_per_s']:,.0f} rows/s over the run")
    print(f"table               {r['table']!r} version {r['table_version']} (directory epoch {r['epoch']})")
    for shard, address in enumerate(r["shard_map"]["addresses"]):
        ranges = {layer: (b[shard], b[shard + 1]) for layer, b in r["shard_map"]["bounds"].items()}
        print(f"shard {shard}             {address}  rows {ranges}")
    print(f"generated           {r['generated']!r}")
    print(f"wall time           {r['wall_seconds']:.0f} s")
    print("=" * 72)
