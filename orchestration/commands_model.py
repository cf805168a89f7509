"""`engram train | generate | compress`: the model-side commands."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from orchestration.commands_memory import token_from
from orchestration.pool_tables import is_pool, tables_for

# Per-preset defaults for `engram train` (flags override them).
TRAIN_DEFAULTS = {
    "tiny": {"steps": 300, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "eval_every": 50, "ckpt_every": 100},
    "small": {"steps": 300, "batch_size": 16, "seq_len": 192, "lr": 2e-3, "eval_every": 50, "ckpt_every": 100},
}


def train(args) -> int:
    """engram train."""
    from model_worker.train import TrainConfig, Trainer, train_config_from_checkpoint

    out_dir = args.out or f"runs/{args.preset}"
    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "lr", "eval_every", "ckpt_every", "seed",
                                               "version", "table_dtype", "optimizer_state", "device")}
    if args.resume:
        config = train_config_from_checkpoint(Path(out_dir) / "checkpoint", out_dir=out_dir, **overrides)
    else:
        if args.preset not in TRAIN_DEFAULTS:
            raise ValueError(f"unknown preset {args.preset!r}; trainable presets are {sorted(TRAIN_DEFAULTS)}")
        values = dict(TRAIN_DEFAULTS[args.preset])
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = TrainConfig(preset=args.preset, out_dir=out_dir, data=args.data, tokenizer=args.tokenizer,
                             memory=args.memory, table=args.table, prefetch=not args.no_prefetch,
                             mode=args.mode or "sync", **values)
        if (Path(out_dir) / "metrics.jsonl").exists():
            (Path(out_dir) / "metrics.jsonl").unlink()  # a fresh run starts a fresh log
    if args.mode and config.mode != args.mode:
        config = dataclasses.replace(config, mode=args.mode)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.workers is not None:
        summary = train_on_workers(config, args, log)
        print_train_summary(summary, out_dir, args.json)
        return 0
    tables = tables_for(config.memory, config.table or f"engram-{config.preset}", token_from(args), config.version)
    trainer = Trainer(config, tables, log=log, progress=not args.no_progress, token=token_from(args))
    if args.resume:
        trainer.load(Path(out_dir) / "checkpoint")
        log(f"resumed {out_dir} at step {trainer.step}")
    summary = trainer.run(stop_after=args.stop_after)
    print_train_summary(summary, out_dir, args.json)
    return 0


def train_on_workers(config, args, log) -> dict:
    """Train with --workers data-parallel Ray actors on the memory pool (a training job `engram workers` can scale)."""
    from model_worker import checkpoint as ckpt
    from model_worker.data import load_corpus
    from orchestration.ray_cluster import connect_ray
    from orchestration.workers import follow_job, start_job

    if not is_pool(config.memory):
        raise ValueError("--workers trains on a Ray memory pool: pass --memory pool[:NAME]")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if config.batch_size % args.workers:
        raise ValueError(f"batch size {config.batch_size} does not split evenly over {args.workers} workers")
    if config.tokenizer is None:  # every worker uses the tokenizer this driver trained or found in the cache
        config = dataclasses.replace(config, tokenizer=str(load_corpus(config.data, None, config.vocab_size, log=log).tokenizer_path))
    state = None
    if args.resume:
        import torch

        state = torch.load(ckpt.require_checkpoint(Path(config.out_dir) / "checkpoint") / ckpt.MODEL_FILE,
                           map_location="cpu", weights_only=False)
    ray = connect_ray(args.address)
    pool = config.memory.partition(":")[2] or "default"
    steps = config.steps if args.stop_after is None else min(config.steps, args.stop_after)
    job = start_job(dataclasses.asdict(config), args.workers, pool, token_from(args), state=state, stop_after=steps)
    log(f"training on {args.workers} data-parallel workers (pool {pool!r}; scale with: engram workers scale N --pool {pool})")
    try:
        return follow_job(job, None if args.no_progress else log)
    finally:
        ray.get(job.stop.remote(), timeout=120)
        ray.kill(job)


def print_train_summary(summary: dict, out_dir: str, as_json: bool) -> None:
    """The end-of-training report."""
    if as_json:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    else:
        print(f"step {summary['step']}: val loss {summary['val_loss_start']:.3f} -> {summary['val_loss']:.3f} "
              f"(unigram baseline {summary['unigram_loss']:.3f}); {summary['tokens_per_s']:.0f} tokens/s; "
              f"unique row ratio {summary['unique_id_ratio']:.2f}; prefetch wait {summary['prefetch_wait_ms_per_step']:.1f} ms/step; "
              f"tables: {summary['tables']}; device {summary['device']}")
        print(f"checkpoint: {summary['checkpoint']}   loss curve: {Path(out_dir) / 'loss_curve.png'}")


def generate(args) -> int:
    """engram generate."""
    from model_worker import checkpoint as ckpt
    from model_worker.generate import Generator

    checkpoint = ckpt.require_checkpoint(args.checkpoint or f"runs/{args.preset}/checkpoint")
    memory, table, version = ckpt.tables_location(checkpoint, args.memory)
    generator = Generator.from_checkpoint(checkpoint, tables_for(memory, table, token_from(args), version),
                                          device=args.device)
    text = generator.generate(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(text)
    print(f"[device {generator.device}, {str(generator.dtype).removeprefix('torch.')} decode]", file=sys.stderr)
    return 0


def compress(args) -> int:
    """engram compress."""
    from memory_service.compression import CompressedTokenizer

    compressor = CompressedTokenizer.from_tokenizer_file(args.tokenizer, args.clean_up_spaces)
    if args.out:
        compressor.save(args.out)
    result = {"vocab_size": compressor.vocab_size, "compressed_vocab_size": len(compressor), "reduction": compressor.reduction}
    print(json.dumps(result) if args.json else
          f"{compressor.vocab_size} ids -> {len(compressor)} compressed ids ({compressor.reduction:.1%} fewer)")
    return 0
