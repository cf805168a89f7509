"""`engram experiment iso | allocation`: does Engram make a better model for the same parameters, and at what share?

iso: the Engram-MoE preset against its iso-parameter MoE baseline (presets.iso_parameter_pair: the
baseline holds the routed experts the Engram tables paid for), several seeds each. allocation: at
the pair's total, a sweep of rho, the share of the sparse parameters (inactive experts + Engram
tables) kept in routed experts (presets.allocation; rho = 1 is the MoE baseline).

Every run goes through the ordinary Trainer with the same settings: same tokens in the same order
for a seed (batches are drawn from the seed alone), same steps, schedule and dense hyperparameters;
Engram rows keep the paper's settings (Adam, x5 learning rate, no weight decay, zero-initialised
conv). Tables are in-process unless --memory names a service or pool, where each run gets a table
of its own, dropped afterwards.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

# Defaults sized for 2 CPU cores: the tiny preset at 16 x 128 tokens a step for 1,500 steps (3.1M tokens, 4-5 min
# a run here); a run long enough that its val loss is well past the unigram baseline and still falling slowly.
DEFAULTS = {"preset": "tiny", "steps": 1500, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "eval_every": 100}
ISO_SEEDS = (0, 1, 2)
ALLOCATION_RHOS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375)


def train_run(preset: str, architecture: str, seed: int, steps: int, batch_size: int, seq_len: int, lr: float,
              eval_every: int, runs_dir: Path, rho: float | None = None, memory: str | None = None,
              token: str | None = None, data: str | None = None, tokenizer: str | None = None,
              progress: bool = True, log=print) -> dict:
    """Train one model; its final val loss, parameter counts and val curve."""
    from model_worker.presets import count_parameters
    from model_worker.train import TrainConfig, Trainer
    from orchestration.pool_tables import tables_for

    name = f"{architecture}-seed{seed}" + (f"-rho{rho:g}" if rho is not None else "")
    table = f"experiment-{name}-{uuid.uuid4().hex[:8]}" if memory else None
    shutil.rmtree(runs_dir / name, ignore_errors=True)  # a fresh run: no metrics of an earlier one appended to
    config = TrainConfig(preset=preset, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                         eval_every=eval_every, ckpt_every=steps, seed=seed, architecture=architecture, rho=rho,
                         memory=memory, table=table, data=data, tokenizer=tokenizer, out_dir=str(runs_dir / name))
    tables = tables_for(memory, table, token) if memory else None
    started = time.perf_counter()
    trainer = None
    try:
        trainer = Trainer(config, tables, log=lambda *a: None, progress=progress, token=token)
        summary = trainer.run()
    finally:
        if tables is not None:  # the run's own table (if it was made): dropped; a failure here does not hide the run's
            _drop_table(trainer, tables, table, log)
    counts = count_parameters(trainer.model_config)
    spec = trainer.model_config.engram
    return {"final_val_loss": float(summary["val_loss"]), "params_total": counts["total"],
            "params_activated": counts["activated"], "engram_rows": counts["engram_tables"] // (spec.head_dim if spec else 1),
            "num_routed_experts": trainer.model_config.moe.num_routed_experts,
            "rho_effective": counts["routed_experts_inactive"] / (counts["routed_experts_inactive"] + counts["engram_tables"]),
            "val_curve": [[int(step), float(loss)] for step, loss in trainer.history["val"]],
            "seconds": round(time.perf_counter() - started, 1)}


def _drop_table(trainer, tables, table: str, log) -> None:
    from memory_service.errors import NotFound

    try:
        if trainer is not None and trainer.backend.remote:
            trainer.backend.close()
        admin = tables.open_admin()
        try:
            admin.drop_table(table)
        finally:
            admin.close()
    except NotFound:
        pass  # never made (an MoE run, or a run that failed first)
    except Exception as e:  # noqa: BLE001 - cleanup: said, not raised over the run's own outcome
        log(f"could not drop the experiment's table {table!r}: {e}")


def _settings(values: dict) -> dict:
    """The run settings of a report, with the Trainer's defaults every run shares (the Engram rows' paper settings)."""
    from model_worker.train import TrainConfig

    shared = TrainConfig()
    return {**{k: values[k] for k in ("preset", "steps", "batch_size", "seq_len", "lr", "eval_every")},
            "shared": {k: getattr(shared, k) for k in ("warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip",
                                                        "engram_lr_mult", "row_init_std", "eval_batches")}}


def iso(preset: str = DEFAULTS["preset"], steps: int = DEFAULTS["steps"], batch_size: int = DEFAULTS["batch_size"],
        seq_len: int = DEFAULTS["seq_len"], lr: float = DEFAULTS["lr"], eval_every: int = DEFAULTS["eval_every"],
        seeds: tuple[int, ...] = ISO_SEEDS, out_dir: str = "docs/results", runs_dir: str = "runs/experiments/iso",
        memory: str | None = None, token: str | None = None, data: str | None = None, tokenizer: str | None = None,
        progress: bool = True, log=print) -> dict:
    """Train both models on every seed; writes iso.json and iso.png under out_dir; returns the report."""
    settings = _settings(locals())
    runs = []
    total = 2 * len(seeds)
    for seed in seeds:
        for model in ("moe", "engram"):
            started = time.perf_counter()
            run = train_run(preset, model, seed, steps, batch_size, seq_len, lr, eval_every, Path(runs_dir), None, memory,
                            token, data, tokenizer, progress, log)
            runs.append({"model": model, "seed": seed, **{k: run[k] for k in (
                "final_val_loss", "params_total", "params_activated", "num_routed_experts", "engram_rows", "seconds",
                "val_curve")}})
            log(f"run {len(runs)}/{total}: {model:6s} seed {seed}: val loss {run['final_val_loss']:.4f} "
                f"({time.perf_counter() - started:.0f} s)")
    report = {**settings, "tokens_per_run": steps * batch_size * seq_len, "runs": runs, "summary": iso_summary(runs)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "iso.json").write_text(json.dumps(report, indent=1))
    plot_iso(report, out / "iso.png")
    report["lines"] = iso_lines(report)
    return report


def iso_summary(runs: list[dict]) -> dict:
    """Per model: mean, standard deviation, min and max of the final val loss; the difference of the means, and
    whether it exceeds the larger of the two models' ranges across seeds."""
    per_model = {}
    for model in ("moe", "engram"):
        losses = np.array([r["final_val_loss"] for r in runs if r["model"] == model])
        per_model[model] = {"runs": int(losses.size), "mean": float(losses.mean()), "std": float(losses.std(ddof=1)) if
                            losses.size > 1 else 0.0, "min": float(losses.min()), "max": float(losses.max())}
    difference = per_model["engram"]["mean"] - per_model["moe"]["mean"]
    spread = max(per_model[m]["max"] - per_model[m]["min"] for m in per_model)
    totals = {m: next(r["params_total"] for r in runs if r["model"] == m) for m in per_model}
    activated = {m: next(r["params_activated"] for r in runs if r["model"] == m) for m in per_model}
    return {"models": per_model, "difference_engram_minus_moe": difference, "largest_seed_range": spread,
            "difference_exceeds_spread": abs(difference) > spread,
            "params_total_ratio": totals["engram"] / totals["moe"], "params_activated_ratio": activated["engram"] / activated["moe"]}


def iso_lines(report: dict) -> list[str]:
    """The printed table."""
    s = report["summary"]
    lines = [f"iso-parameter comparison ({report['preset']}, {report['steps']} steps x {report['batch_size']} x "
             f"{report['seq_len']} tokens = {report['tokens_per_run']:,} a run)",
             f"  {'model':8s} {'runs':>4s} {'mean':>8s} {'std':>7s} {'min':>8s} {'max':>8s}"]
    for model, m in s["models"].items():
        lines.append(f"  {model:8s} {m['runs']:4d} {m['mean']:8.4f} {m['std']:7.4f} {m['min']:8.4f} {m['max']:8.4f}")
    verdict = "exceeds" if s["difference_exceeds_spread"] else "does not exceed"
    lines.append(f"  engram - moe: {s['difference_engram_minus_moe']:+.4f} ({verdict} the largest seed range, "
                 f"{s['largest_seed_range']:.4f}); parameters engram/moe: total {s['params_total_ratio']:.3f}, "
                 f"activated {s['params_activated_ratio']:.3f}")
    return lines


def plot_iso(report: dict, path: Path) -> None:
    """Val loss against step, every run; one colour per model, one line style per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", ":", "-."]
    seeds = sorted({r["seed"] for r in report["runs"]})
    for run in report["runs"]:
        curve = np.array(run["val_curve"])
        ax.plot(curve[:, 0], curve[:, 1], styles[seeds.index(run["seed"]) % len(styles)],
                color="tab:blue" if run["model"] == "engram" else "tab:orange", label=f"{run['model']} seed {run['seed']}")
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    tail = [c[1] for r in report["runs"] for c in r["val_curve"][len(r["val_curve"]) // 3:]]
    if tail:
        ax.set_ylim(min(tail) - 0.05, max(tail) + 0.05)  # the part of the curves where the models differ
    ax.set_title(f"Engram-MoE vs iso-parameter MoE ({report['preset']}, {report['tokens_per_run']:,} tokens a run)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def allocation(preset: str = DEFAULTS["preset"], steps: int = DEFAULTS["steps"], batch_size: int = DEFAULTS["batch_size"],
               seq_len: int = DEFAULTS["seq_len"], lr: float = DEFAULTS["lr"], eval_every: int = DEFAULTS["eval_every"],
               rhos: tuple[float, ...] = ALLOCATION_RHOS, seed: int = 0, out_dir: str = "docs/results",
               runs_dir: str = "runs/experiments/allocation", memory: str | None = None, token: str | None = None,
               data: str | None = None, tokenizer: str | None = None, progress: bool = True, log=print) -> dict:
    """Train one model per rho (one seed); writes allocation.json and allocation.png under out_dir."""
    settings = _settings(locals())
    check_rhos(preset, rhos)
    points = []
    for i, rho in enumerate(rhos):
        started = time.perf_counter()
        run = train_run(preset, "engram", seed, steps, batch_size, seq_len, lr, eval_every, Path(runs_dir), rho, memory,
                        token, data, tokenizer, progress, log)
        points.append({"rho": rho, **{k: run[k] for k in ("rho_effective", "num_routed_experts", "engram_rows",
                                                          "params_total", "params_activated", "final_val_loss",
                                                          "seconds", "val_curve")}})
        log(f"point {i + 1}/{len(rhos)}: rho {rho:g} ({run['num_routed_experts']} experts, {run['engram_rows']:,} rows): "
            f"val loss {run['final_val_loss']:.4f} ({time.perf_counter() - started:.0f} s)")
    best = min(points, key=lambda p: p["final_val_loss"])
    report = {**settings, "seed": seed, "tokens_per_run": steps * batch_size * seq_len, "points": points,
              "best_rho": best["rho"]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "allocation.json").write_text(json.dumps(report, indent=1))
    plot_allocation(report, out / "allocation.png")
    report["lines"] = [f"allocation sweep ({preset}, seed {seed}, {report['tokens_per_run']:,} tokens a run)",
                       f"  {'rho':>6s} {'in fact':>7s} {'experts':>7s} {'engram rows':>11s} {'params':>10s} {'val loss':>8s}"]
    report["lines"] += [f"  {p['rho']:6.3f} {p['rho_effective']:7.3f} {p['num_routed_experts']:7d} {p['engram_rows']:11,d} "
                        f"{p['params_total']:10,d} {p['final_val_loss']:8.4f}" for p in points]
    report["lines"].append(f"  lowest val loss at rho {best['rho']:g} (one seed: differences below the seeds' spread, "
                           "about 0.01 at the defaults, are noise)")
    return report


def check_rhos(preset: str, rhos: tuple[float, ...]) -> None:
    """Refuse a sweep before it trains anything: fewer than two points, a rho outside (0, 1], or two rhos that give
    the same model (whole experts move: nearby rhos can round to the same count)."""
    from model_worker.presets import model_config_for

    if len(rhos) < 2:
        raise ValueError("an allocation sweep needs at least two values of rho")
    experts = {}
    for rho in rhos:
        config = model_config_for(preset, 8192, 0, "engram", rho)  # raises for a rho outside (0, 1]
        count = config.moe.num_routed_experts
        if count in experts:
            raise ValueError(f"rho {experts[count]:g} and {rho:g} give the same model ({count} routed experts) for "
                             f"preset {preset}: pick rhos further apart")
        experts[count] = rho


def plot_allocation(report: dict, path: Path) -> None:
    """Final val loss against rho."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(report["points"], key=lambda p: p.get("rho_effective", p["rho"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p.get("rho_effective", p["rho"]) for p in points], [p["final_val_loss"] for p in points], "o-")
    ax.set_xlabel("rho: share of sparse parameters in inactive routed experts (1 = MoE only)")
    ax.set_ylabel("final val loss")
    ax.set_title(f"Allocation between experts and Engram ({report['preset']}, {report['tokens_per_run']:,} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def command(args) -> int:
    """engram experiment iso | allocation."""
    import sys

    from orchestration.commands_memory import token_from

    def log(*parts):
        print(*parts, file=sys.stderr)

    common = {k: getattr(args, k) for k in ("preset", "steps", "batch_size", "seq_len", "lr", "eval_every")
              if getattr(args, k) is not None}
    common.update(out_dir=args.out_dir, memory=args.memory, token=token_from(args), data=args.data,
                  tokenizer=args.tokenizer, progress=not args.no_progress, log=log)
    if args.runs_dir:
        common["runs_dir"] = args.runs_dir
    if args.memory and args.memory.startswith("pool"):
        from orchestration.ray_cluster import connect_ray

        connect_ray(args.address)
    if args.what == "iso":
        seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else ISO_SEEDS
        report = iso(seeds=seeds, **common)
    else:
        rhos = tuple(float(r) for r in args.rhos.split(",")) if args.rhos else ALLOCATION_RHOS
        report = allocation(rhos=rhos, seed=args.seed, **common)
    print(json.dumps({k: v for k, v in report.items() if k != "lines"}, indent=1) if args.json else "\n".join(report["lines"]))
    return 0
