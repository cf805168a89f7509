"""The `engram` command line.

    engram train      train an Engram-MoE model on the built-in corpus (or --data)
    engram generate   continue a prompt from a checkpoint, with a KV cache
    engram compress   build a tokenizer's compression map and report the reduction
    engram bench hash hashing throughput against a per-head reference-style baseline

Heavy imports happen inside each command so `engram --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Per-preset defaults for `engram train` (flags override them).
TRAIN_DEFAULTS = {
    "tiny": {"steps": 300, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "eval_every": 50, "ckpt_every": 100},
    "small": {"steps": 300, "batch_size": 16, "seq_len": 192, "lr": 2e-3, "eval_every": 50, "ckpt_every": 100},
}


def _train(args) -> int:
    from model_worker.train import Trainer, TrainConfig, train_config_from_checkpoint

    out_dir = args.out or f"runs/{args.preset}"
    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "lr", "eval_every", "ckpt_every", "seed")}
    if args.resume:
        checkpoint = Path(out_dir) / "checkpoint"
        config = train_config_from_checkpoint(checkpoint, out_dir=out_dir, **overrides)
    else:
        if args.preset not in TRAIN_DEFAULTS:
            raise ValueError(f"unknown preset {args.preset!r}; trainable presets are {sorted(TRAIN_DEFAULTS)}")
        values = dict(TRAIN_DEFAULTS[args.preset])
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = TrainConfig(preset=args.preset, out_dir=out_dir, data=args.data, tokenizer=args.tokenizer, **values)
        if (Path(out_dir) / "metrics.jsonl").exists():
            (Path(out_dir) / "metrics.jsonl").unlink()  # a fresh run starts a fresh log
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    trainer = Trainer(config, log=log, progress=not args.no_progress)
    if args.resume:
        trainer.load(Path(out_dir) / "checkpoint")
        log(f"resumed {out_dir} at step {trainer.step}")
    summary = trainer.run(stop_after=args.stop_after)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"step {summary['step']}: val loss {summary['val_loss_start']:.3f} -> {summary['val_loss']:.3f} "
              f"(unigram baseline {summary['unigram_loss']:.3f}); {summary['tokens_per_s']:.0f} tokens/s; "
              f"unique row ratio {summary['unique_id_ratio']:.2f}")
        print(f"checkpoint: {summary['checkpoint']}   loss curve: {Path(out_dir) / 'loss_curve.png'}")
    return 0


def _generate(args) -> int:
    from model_worker.generate import Generator

    checkpoint = args.checkpoint or f"runs/{args.preset}/checkpoint"
    generator = Generator.from_checkpoint(checkpoint)
    text = generator.generate(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(text)
    return 0


def _compress(args) -> int:
    from memory_service.compression import CompressedTokenizer

    compressor = CompressedTokenizer.from_tokenizer_file(args.tokenizer, args.clean_up_spaces)
    if args.out:
        compressor.save(args.out)
    result = {"vocab_size": compressor.vocab_size, "compressed_vocab_size": len(compressor), "reduction": compressor.reduction}
    print(json.dumps(result) if args.json else
          f"{compressor.vocab_size} ids -> {len(compressor)} compressed ids ({compressor.reduction:.1%} fewer)")
    return 0


def _bench(args) -> int:
    from orchestration.bench import bench_hash

    if args.what == "hash":
        result = bench_hash(args.tokens, args.repeats)
    else:
        raise ValueError(f"unknown benchmark {args.what!r}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for line in result["lines"]:
            print(line)
    return 0


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
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    p.add_argument("--stop-after", type=int, help="stop (with a checkpoint) once this many steps are done")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_train)

    p = sub.add_parser("generate", help="continue a prompt from a checkpoint")
    p.add_argument("--checkpoint", help="checkpoint directory (default runs/<preset>/checkpoint)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate)

    p = sub.add_parser("compress", help="build a tokenizer's compression map and report the reduction")
    p.add_argument("--tokenizer", required=True, help="tokenizers tokenizer.json")
    p.add_argument("--out", help="write the map (.npy)")
    p.add_argument("--clean-up-spaces", action="store_true", help="apply transformers' clean_up_tokenization_spaces when decoding")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_compress)

    p = sub.add_parser("bench", help="benchmarks (ratios against a baseline measured in the same run)")
    p.add_argument("what", choices=["hash"])
    p.add_argument("--tokens", type=int, default=262144)
    p.add_argument("--repeats", type=int, default=5)
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
    except (ValueError, FileNotFoundError) as e:
        print(f"engram {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
