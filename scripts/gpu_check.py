"""GPU check: hard asserts on the CUDA paths of a model worker (one GPU, under 10 minutes).

    .venv/bin/python scripts/gpu_check.py [--skip-bench]

Without a usable GPU it prints why and exits 0 (skipped). With one, each check prints a line and
any failure stops the script with a non-zero exit:

1. host syncs: at most MoE layers + 2 per training step and MoE layers + 2 per decode step
   (torch.cuda.set_sync_debug_mode counts them; the MoE routing reads its expert counts once);
2. prefetch overlap: the side-stream copies of Engram rows (from a real memory service on
   loopback) run while the compute stream is busy with the layers before the Engram layer
   (made long with a GPU sleep; the tiny preset's own are microseconds) (torch.profiler);
3. race: with the side stream delayed (a GPU sleep before each copy), logits equal the
   non-prefetch path's;
4. a resume leaves AdamW's step counters on the host and its moments on the GPU;
5. 20 tiny-preset steps on CUDA (bf16 autocast) against the CPU (fp32): losses within 2%;
6. incremental bf16 decode against the bf16 full forward: mean logit difference under 0.02 x
   their spread, 90% of greedy tokens equal;
7. one-rank `cpu:gloo,cuda:nccl` collectives on host and device tensors;
8. `engram bench step` on CUDA: its ratios printed (goal: service with prefetch within 1.02x).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model_worker.device import cuda_unavailable_reason  # noqa: E402


def check(name: str, ok: bool, detail: str) -> None:
    """Print one check's outcome; stop at the first failure."""
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    if not ok:
        raise SystemExit(1)


class SyncCounter:
    """Counts the host syncs torch reports inside a `with` block (sync debug mode 'warn')."""

    def __enter__(self):
        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)

    @property
    def count(self) -> int:
        return sum("synchroniz" in str(w.message).lower() for w in self.records)


def tiny_model(device: torch.device, vocab: int = 300):
    """A tiny Engram-MoE model with an in-process table, on device (as tests/test_model.py builds it)."""
    from memory_service.compression import CompressedTokenizer
    from memory_service.hashing import NgramHasher
    from memory_service.local_table import LocalTable
    from model_worker.engram_rows import EngramRowFetcher
    from model_worker.model import EngramMoEModel
    from model_worker.presets import tiny

    config = tiny(vocab, pad_id=1)
    compressor = CompressedTokenizer(np.arange(vocab))
    spec = config.engram.with_compression(compressor.lookup_table, len(compressor))
    config = dataclasses.replace(config, engram=spec)
    hasher = NgramHasher.from_compressor(spec, compressor)
    torch.manual_seed(0)
    model = EngramMoEModel(config).to(device)
    fetcher = EngramRowFetcher(LocalTable.for_hasher(hasher), compressor, hasher, device)
    return model, fetcher, hasher, compressor


def moe_layers(model) -> int:
    return sum(block.is_moe for block in model.blocks)


def trainer_for(out_dir: str, device: str, **extra):
    from model_worker.train import TrainConfig, Trainer

    config = TrainConfig(preset="tiny", steps=20, batch_size=8, seq_len=64, warmup_steps=4, eval_every=1000,
                         ckpt_every=1000, eval_batches=1, out_dir=out_dir, device=device, **extra)
    return Trainer(config, progress=False, log=lambda *a: None, token="gpu-check")


def check_syncs(work: Path) -> None:
    from model_worker.data import sample_batch
    from model_worker.generate import Generator

    trainer = trainer_for(str(work / "syncs"), "cuda")
    budget = moe_layers(trainer.model) + 2
    for _ in range(2):  # warm-up (allocator, cuBLAS handles)
        trainer.train_step(*sample_batch(trainer.corpus.train_ids, 8, 64, trainer.rng))
    torch.cuda.synchronize()
    with SyncCounter() as syncs:
        trainer.train_step(*sample_batch(trainer.corpus.train_ids, 8, 64, trainer.rng))
    check("host syncs per training step", syncs.count <= budget, f"{syncs.count} (budget {budget}: MoE layers + 2)")

    model, fetcher, _, _ = tiny_model(torch.device("cuda"))
    generator = Generator(model, fetcher)
    prompt = np.random.default_rng(0).integers(0, 300, size=(4, 16))
    generator.generate_ids(prompt, 4, temperature=0.0)  # warm-up
    with SyncCounter() as syncs:
        generator.generate_ids(prompt, 9, temperature=0.0)
    with SyncCounter() as prefill_only:
        generator.generate_ids(prompt, 1, temperature=0.0)
    per_step = (syncs.count - prefill_only.count) / 8
    budget = moe_layers(model) + 2
    check("host syncs per decode step", per_step <= budget, f"{per_step:.1f} (budget {budget}: MoE layers + 2)")


def service_trainer(work: Path, address: str, table: str):
    return trainer_for(str(work / table), "cuda", memory=f"grpc://{address}", table=table, prefetch=True)


def check_overlap_and_race(work: Path, address: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    from model_worker.data import sample_batch
    from model_worker.prefetch import RowStager

    trainer = service_trainer(work, address, "overlap")
    for _ in range(2):
        trainer.train_step(*sample_batch(trainer.corpus.train_ids, 8, 64, trainer.rng))
    torch.cuda.synchronize()

    def overlapped(run, kernel: str = "") -> tuple[int, int]:
        """(host-to-device copies that ran beside a kernel whose name holds `kernel`, all such copies) in a profile
        of run()."""
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        copies = [e for e in events if "memcpy" in e.name.lower() and "htod" in e.name.lower().replace(" ", "")]
        kernels = [e for e in events if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()
                   and kernel in e.name.lower()]
        beside = [c for c in copies if any(k.time_range.start < c.time_range.end and c.time_range.start < k.time_range.end
                                           for k in kernels)]
        return len(beside), len(copies)

    natural = overlapped(lambda: trainer.train_step(*sample_batch(trainer.corpus.train_ids, 8, 64, trainer.rng)))
    print(f"  a tiny-preset step: {natural[0]} of {natural[1]} host-to-device copies ran beside kernels "
          "(its layers before the Engram layer take microseconds)")
    inputs, _ = sample_batch(trainer.corpus.train_ids, 8, 64, trainer.rng)

    x = torch.from_numpy(inputs).cuda()

    def long_first_layers():  # the layers before the Engram layer made long: the rows' copy must run beside them
        fetched = trainer.fetcher.fetch(inputs, prefetch=True)
        torch.cuda._sleep(100_000_000)  # a spin kernel on the compute stream
        with torch.no_grad(), trainer.autocast():
            trainer.model(x, fetched)

    beside, copies = overlapped(long_first_layers, kernel="spin")  # copies beside the spin: on another stream
    check("prefetch copies overlap compute", beside > 0,
          f"{beside} of {copies} host-to-device copies ran while the compute stream was busy")

    trainer.model.eval()
    with torch.no_grad(), trainer.autocast():
        plain, _ = trainer.model(x, trainer.fetcher.fetch(inputs, prefetch=False))
    real_stage = RowStager.stage

    def delayed(self, pending, host=None):
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time before the copy is even queued
        return real_stage(self, pending, host)

    RowStager.stage = delayed
    try:
        with torch.no_grad(), trainer.autocast():
            raced, _ = trainer.model(x, trainer.fetcher.fetch(inputs, prefetch=True))
    finally:
        RowStager.stage = real_stage
    diff = float((raced.float() - plain.float()).abs().max())
    check("delayed side stream gives the same logits", diff == 0.0, f"max |difference| {diff}")


def check_resume(work: Path) -> None:
    from model_worker.data import sample_batch

    trainer = trainer_for(str(work / "resume"), "cuda")
    for _ in range(2):
        trainer.train_step(*sample_batch(trainer.corpus.train_ids, 8, 64, trainer.rng))
    trainer.save()
    resumed = trainer_for(str(work / "resume"), "cuda")
    resumed.load(work / "resume" / "checkpoint")
    states = list(resumed.optimizer.state.values())
    on_host = all(s["step"].device.type == "cpu" for s in states)
    moments = all(s["exp_avg"].device.type == "cuda" for s in states)
    check("optimizer state after resume", on_host and moments,
          f"{len(states)} parameters: step counters on the host {on_host}, moments on the GPU {moments}")


def check_cuda_vs_cpu(work: Path) -> None:
    summaries = {}
    for device in ("cuda", "cpu"):
        trainer = trainer_for(str(work / f"vs-{device}"), device)
        trainer.run()
        summaries[device] = np.asarray(trainer.history["train"])[:, 1]
    diff = np.abs(summaries["cuda"] - summaries["cpu"]) / summaries["cpu"]
    check("20 tiny steps, CUDA bf16 vs CPU fp32", float(diff.max()) < 0.02,
          f"max relative loss difference {diff.max():.4f} (final {summaries['cuda'][-1]:.4f} vs {summaries['cpu'][-1]:.4f})")


def check_decode() -> None:
    from model_worker.generate import Generator

    model, fetcher, _, _ = tiny_model(torch.device("cuda"))
    prompt = np.random.default_rng(1).integers(0, 300, size=(2, 7))
    generator = Generator(model, fetcher)
    tokens, step_logits = generator.generate_ids(prompt, 10, temperature=0.0, return_logits=True)
    with torch.no_grad(), generator.autocast():  # the full forward in the same precision
        full, _ = model(tokens, fetcher.fetch(tokens.cpu().numpy()))
    reference = full[:, 6:16].float()
    ratio = float((step_logits - reference).abs().mean() / reference.std())
    same = float((tokens[:, 7:] == reference.argmax(-1)).float().mean())
    check("incremental bf16 decode vs the bf16 full forward", ratio < 0.02 and same >= 0.9,
          f"mean |difference| {ratio:.4f} x the spread, greedy tokens equal {same:.0%}")


def check_fp8_dequantize() -> None:
    """FP8 records dequantized on the GPU equal the CPU's exact values, and what it costs against a bf16 copy."""
    from memory_service import fp8_rows

    values = np.random.default_rng(2).standard_normal((1 << 16, 256)).astype(np.float32)
    records = fp8_rows.quantize(values)  # [65536, 264]
    exact = torch.from_numpy(fp8_rows.dequantize(records, 256))
    on_gpu = fp8_rows.dequantize_torch(records, 256, torch.float32, "cuda").cpu()
    bf16 = torch.from_numpy(values).to(torch.bfloat16).pin_memory()
    pinned = torch.from_numpy(records).pin_memory()
    timings = {}
    for name, fn in (("bf16 rows copied", lambda: bf16.to("cuda", non_blocking=True)),
                     ("fp8 records copied and dequantized", lambda: fp8_rows.dequantize_torch(pinned, 256, torch.bfloat16, "cuda"))):
        fn()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        timings[name] = (time.perf_counter() - started) / 20 * 1e3
    # every finite code under extreme scales (2^-127, 2^-126, 2^-1..2^1, 2^118..2^120), through the worker's stager
    from model_worker.prefetch import RowStager

    codes = np.arange(256, dtype=np.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # 254 finite codes
    scales = [0, 1, 126, 127, 128, 245, 247]
    grid = np.zeros((len(scales), 256 + 8), dtype=np.uint8)  # [7, 264] records
    for row, scale in enumerate(scales):
        grid[row, :256] = np.resize(codes, 256)
        grid[row, 256:] = scale
    staged = RowStager(torch.device("cuda"), 256).stage(_Ready((grid, 1))).ready().cpu()
    edges = torch.equal(staged, torch.from_numpy(fp8_rows.dequantize(grid, 256)))
    check("FP8 records dequantized on CUDA", torch.equal(on_gpu, exact) and edges,
          ", ".join(f"{k} {v:.3f} ms" for k, v in timings.items()) + " (65,536 rows of 256); every code under "
          f"scales {scales} through the stager: {'equal' if edges else 'DIFFERENT'}")


class _Ready:
    """A pending lookup that is already done (what RowStager.stage waits on)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def check_collectives() -> None:
    import torch.distributed as dist

    from model_worker.data_parallel import backend_for, free_port

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # as DataParallel.join does for a local group
    dist.init_process_group(backend_for(torch.device("cuda")), init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    try:
        host, device = torch.ones(3), torch.ones(3, device="cuda")
        dist.all_reduce(host)
        dist.all_reduce(device)
        check("one-rank cpu:gloo,cuda:nccl collectives", bool(host.sum() == 3) and float(device.sum()) == 3.0,
              "all_reduce on a host and a device tensor")
    finally:
        dist.destroy_process_group()


def check_bench() -> None:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "bench", "step", "--preset", "small"],
                         cwd=ROOT, capture_output=True, text=True, timeout=420)
    print(out.stdout.strip())
    check("engram bench step on CUDA", out.returncode == 0 and "device cuda" in out.stdout,
          f"ran in {time.perf_counter() - started:.0f} s (goal: service_prefetch within x1.02 of in-process)"
          + ("" if out.returncode == 0 else f"\n{out.stderr[-2000:]}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-bench", action="store_true", help="leave out engram bench step (about 3 minutes)")
    args = parser.parse_args()
    reason = cuda_unavailable_reason()
    if reason is not None:
        print(f"gpu_check: skipped: {reason}")
        return 0
    print(f"gpu_check on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})", flush=True)
    from memory_service.malloc_tuning import tune_glibc_malloc
    from orchestration.local_server import start_server

    tune_glibc_malloc()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="engram-gpu-check-") as tmp:
        work = Path(tmp)
        proc, address = start_server(work / "store", token="gpu-check")
        try:
            check_syncs(work)
            check_overlap_and_race(work, address)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        check_resume(work)
        check_cuda_vs_cpu(work)
        check_decode()
        check_fp8_dequantize()
        check_collectives()
    if not args.skip_bench:
        check_bench()
    print(f"gpu_check: all checks passed in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("ENGRAM_TOKEN", "gpu-check")
    raise SystemExit(main())
