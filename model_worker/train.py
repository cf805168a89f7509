"""Training loop: Engram-MoE language model on a tokenized corpus, rows through a table backend.

Per step: sample a batch, fetch its Engram rows (unique per layer) from the backend,
forward + cross-entropy + MoE balance loss, backward, AdamW on dense parameters,
row-wise Adam on the fetched rows (paper: 5x the backbone's learning rate, no weight
decay) pushed back to the backend. Periodic validation, checkpoints that resume
exactly (same batches, same losses), a metrics log and a loss-curve PNG.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memory_service.compression import CompressedTokenizer
from memory_service.hashing import NgramHasher
from memory_service.row_dtypes import is_trainable
from model_worker import checkpoint as ckpt
from model_worker.data import Corpus, eval_batches, load_corpus, sample_batch, unigram_cross_entropy
from model_worker.data_parallel import DataParallel
from model_worker.device import resolve_device, to_device, use_device
from model_worker.engram_rows import EngramRowFetcher, NoTables
from model_worker.model import EngramMoEModel, ModelConfig, check_token_range
from model_worker.presets import count_parameters, model_config_for
from model_worker.tables import InProcessTables, TableSource, table_source


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run."""

    preset: str = "tiny"
    """Model preset (tiny, small)."""
    steps: int = 300
    """Optimizer steps in the whole run (the LR schedule spans them)."""
    batch_size: int = 16
    """Sequences per step (the global batch: data-parallel workers each take an equal slice)."""
    seq_len: int = 128
    """Tokens per sequence."""
    lr: float = 3e-3
    """Peak AdamW learning rate of the dense parameters."""
    engram_lr_mult: float = 5.0
    """Engram rows learn at lr * this (paper: 5)."""
    weight_decay: float = 0.1
    """AdamW decay of dense matrices (Engram rows: none)."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor, as a fraction of the peak."""
    grad_clip: float = 1.0
    """Max global norm of dense gradients."""
    eval_every: int = 50
    """Steps between validation runs."""
    eval_batches: int = 8
    """Validation batches (fixed windows, same every time)."""
    ckpt_every: int = 100
    """Steps between checkpoints (and one at the end)."""
    seed: int = 0
    """Seeds model init, table init and batch sampling."""
    out_dir: str = "runs/tiny"
    """Checkpoint, metrics and plot directory."""
    data: str | None = None
    """Corpus directory or file (default: the Python standard library)."""
    tokenizer: str | None = None
    """tokenizer.json to use (default: train one on the corpus and cache it)."""
    vocab_size: int = 8192
    """Vocabulary of a tokenizer trained here."""
    row_init_std: float = 1.0
    """Std of initial Engram rows (the reference's nn.Embedding default)."""
    table_dtype: str | None = None
    """Row dtype of the Engram tables (float32, float16, bfloat16; default: the preset's)."""
    optimizer_state: str = "exact"
    """Row-wise Adam state of the Engram rows: exact (m, v per value in fp32) or compact (bf16 m, one v per row)."""
    memory: str | None = None
    """Where the tables live: None (in-process), grpc://HOST:PORT (one service) or pool[:NAME] (a Ray memory pool)."""
    table: str | None = None
    """Table name on the memory service (default engram-<preset>)."""
    version: int = 0
    """Table version to train on the memory service (0: the active one, followed through swaps). Training a new
    version (engram table new-version) while the active one keeps serving, then swapping, is the update workflow."""
    prefetch: bool = True
    """Send all Engram layers' lookups at the start of a step; each layer waits only for its rows."""
    mode: str = "sync"
    """sync: a step's lookups see every earlier update. async: a step's row-gradient push runs while the
    next step fetches and computes (rows may miss the previous step's update: staleness at most 1)."""
    architecture: str = "engram"
    """engram: the preset; moe: its iso-parameter MoE baseline (no Engram; the routed experts the tables paid for)."""
    rho: float | None = None
    """Share of the sparse parameters (inactive experts + Engram tables) given to routed experts, at the total of the
    iso-parameter pair (presets.allocation; 1.0 = the MoE baseline). None: the preset as it is."""
    device: str = "auto"
    """auto (CUDA when torch can use it, else CPU), cpu, or cuda / cuda:N (an error, never a CPU fallback, when the
    GPU cannot be used). A data-parallel group's driver resolves it once for every rank."""

    def __post_init__(self):
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {self.mode!r}")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of a 0-based step: linear warm-up, then cosine to min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


LOSS_READ_EVERY = 10  # on a GPU, steps whose losses are read (one host sync) at once


class Trainer:
    """Owns the model, optimizer, table backend and data of one run."""

    def __init__(self, config: TrainConfig, tables: TableSource | None = None, log=print, progress: bool = True,
                 token: str | None = None, parallel: DataParallel | None = None, on_step=None):
        """tables: where the Engram tables live (default: from config.memory; a Ray pool is handed in by orchestration).
        on_step(step, steps, loss, tokens_per_s): called after every step (progress reporting)."""
        self.config = config
        self.on_step = on_step
        self.parallel = parallel or DataParallel()
        self.parallel.local_slice(config.batch_size)  # the batch must split evenly over the workers
        self.log = log
        self.progress = progress
        self.out_dir = Path(config.out_dir)
        self.device = resolve_device(config.device)
        use_device(self.device)
        self.corpus: Corpus = load_corpus(config.data, config.tokenizer, config.vocab_size, log=log)
        self.compressor = CompressedTokenizer.from_tokenizer_file(self.corpus.tokenizer_path)
        self.tokenizer_json = self.corpus.tokenizer_path.read_bytes()  # kept: a resumed run's source file is replaced
        base = model_config_for(config.preset, self.corpus.vocab_size, self.corpus.pad_id, config.architecture, config.rho)
        if config.seq_len > base.max_seq_len:
            raise ValueError(f"seq_len {config.seq_len} exceeds preset {config.preset}'s max_seq_len {base.max_seq_len}")
        spec = None
        if base.engram is not None:
            engram = dataclasses.replace(base.engram, dtype=config.table_dtype or base.engram.dtype,
                                         optimizer_state=config.optimizer_state)
            spec = engram.with_compression(self.compressor.lookup_table, len(self.compressor))
        self.model_config: ModelConfig = dataclasses.replace(base, engram=spec)
        self.hasher = NgramHasher.from_compressor(spec, self.compressor) if spec is not None else None
        torch.manual_seed(config.seed)
        self.model = EngramMoEModel(self.model_config).to(self.device)
        self.parallel.broadcast_parameters(self.model)
        self.table_name = config.table or f"engram-{config.preset}"
        if not self.is_leader:
            self.parallel.barrier()  # the leader opens (and if need be creates) the tables first
        if spec is None:  # an MoE without Engram layers: no tables anywhere
            self.tables, self.backend = InProcessTables(), NoTables()
            self.tables.description = "none (no Engram layers)"
            self.fetcher = self.backend
        else:
            self.tables = tables or table_source(config.memory, self.table_name, token, config.version)
            self.backend = self.tables.open(spec, self.compressor.lookup_table, config.row_init_std, config.seed, log=log)
            self.fetcher = EngramRowFetcher(self.backend, self.compressor, self.hasher, self.device)
        if self.is_leader:
            self.parallel.barrier()
        if spec is not None and not is_trainable(self.backend.spec.dtype):  # every rank refuses, before any step
            raise ValueError(f"table {self.tables.description} stores {self.backend.spec.dtype} rows, which are for "
                             "serving: train a float table (then engram table quantize it into an FP8 one)")
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.95), eps=1e-8,
        )
        self.rng = np.random.default_rng(config.seed)
        self.step = 0
        self._push = None  # async mode: the previous step's row-gradient push, still in flight
        self._pusher = None
        self.overlapped_fetches = 0  # async mode: steps whose lookups went out while the previous push was in flight
        self.history: dict[str, list] = {"train": [], "val": [], "versions": []}
        self.eval_set = eval_batches(self.corpus.val_ids, config.batch_size, config.seq_len, config.eval_batches)
        self.unigram_loss = unigram_cross_entropy(self.corpus.train_ids, self.corpus.val_ids, self.corpus.vocab_size)

    # ------------------------------------------------------------------ steps
    def autocast(self):
        """bf16 autocast on CUDA, a no-op on CPU (fp32)."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def train_step(self, inputs: np.ndarray, targets: np.ndarray) -> dict:
        """One optimizer step on a global batch [B, T] (this worker trains on its slice); returns loss and row statistics."""
        lr = lr_at(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        mine = self.parallel.local_slice(inputs.shape[0])
        inputs, targets = inputs[mine], targets[mine]
        check_token_range(inputs, self.model_config.vocab_size)  # here on the host: the model skips it on a GPU
        if self._push is not None and not self._push.done():
            self.overlapped_fetches += 1
        fetched = self.fetcher.fetch(inputs, requires_grad=True, prefetch=self.config.prefetch)
        x, y = to_device(inputs, self.device), to_device(targets, self.device)  # pinned, non-blocking on CUDA
        self.model.set_count_reducer(self.parallel.sum_ if self.parallel.active else None)
        try:
            with self.autocast():
                logits, aux = self.model(x, fetched)
        finally:
            self.model.set_count_reducer(None)
        loss = lm_loss(logits, y)
        (loss + aux).backward()
        fetched.stage_gradients()  # CUDA: row gradients start for the host now, overlapping the dense step
        self.parallel.average_gradients(self.model.parameters())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.push_row_gradients(fetched, lr * self.config.engram_lr_mult)
        self.step += 1
        # the losses stay on the device: reading them waits for the GPU, so run() reads a few steps' at once
        return {"loss": loss.detach(), "aux": aux.detach(), "lr": lr, "ids": fetched.num_ids,
                "unique": fetched.num_unique, "wait": fetched.wait_seconds, "versions": fetched.versions}

    def synchronize(self) -> None:
        """Wait for the device's queued work (timing; a no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_losses(self, losses: list[torch.Tensor]) -> list[float]:
        """Steps' losses (device scalars from train_step), averaged across data-parallel ranks: one host sync and one
        all-reduce for all of them."""
        values = torch.stack(losses).double().cpu().tolist()
        return self.parallel.means(*values)

    def push_row_gradients(self, fetched, lr: float) -> None:
        """Send the step's Engram row gradients (combined across data-parallel workers) to the tables.

        sync: returns once every worker's push is acknowledged. async: waits for the previous
        step's push, then sends this one in the background.
        """
        self.wait_for_push()  # async: at most one push in flight, so lookups lag by at most one step
        combined = {layer: self.parallel.combine_row_gradients(ids, grads, split=self.backend.remote)  # replicas take all
                    for layer, (ids, grads) in fetched.row_gradients().items()}
        if self.config.mode == "async":
            if self._pusher is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pusher = ThreadPoolExecutor(1, thread_name_prefix="engram-push")
            self._push = self._pusher.submit(self.fetcher.push_row_gradients, combined, lr)
        else:
            self.fetcher.push_row_gradients(combined, lr)
            self.parallel.barrier()  # every worker's update is in before anyone's next lookup

    def wait_for_push(self) -> None:
        """Block until the in-flight async push (if any) is acknowledged; re-raises its error."""
        if self._push is not None:
            push, self._push = self._push, None
            push.result()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation cross-entropy over the fixed eval windows (split across data-parallel workers)."""
        self.wait_for_push()
        self.parallel.barrier()  # async: every worker's last push is in before anyone's validation lookups
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64)  # [loss * sequences, sequences]
        for i, (inputs, targets) in enumerate(self.eval_set):
            if i % self.parallel.world_size != self.parallel.rank:
                continue
            check_token_range(inputs, self.model_config.vocab_size)
            fetched = self.fetcher.fetch(inputs)
            with self.autocast():
                logits, _ = self.model(to_device(inputs, self.device), fetched)
            sums[0] += float(lm_loss(logits, torch.from_numpy(targets).to(self.device))) * inputs.shape[0]
            sums[1] += inputs.shape[0]
        total, count = self.parallel.sum_(sums).tolist()
        return total / count

    # ------------------------------------------------------------------ loop
    @property
    def is_leader(self) -> bool:
        """Rank 0: the worker that logs, checkpoints and writes the run's files."""
        return self.parallel.rank == 0

    def run(self, stop_after: int | None = None, save_at_stop: bool = True) -> dict:
        """Train until config.steps (or stop_after steps in total); returns a summary.

        save_at_stop=False skips the checkpoint at a stop_after that is not the run's end
        (a worker group running in segments hands its state over in memory instead).
        """
        config = self.config
        last = config.steps if stop_after is None else min(config.steps, stop_after)
        counts = count_parameters(self.model_config)
        self.log(f"model {config.preset}: {counts['total']:,} parameters ({counts['engram_tables']:,} in Engram tables), "
                 f"{counts['activated']:,} activated per token; device {self.device}")
        self.log(f"corpus: {len(self.corpus.train_ids):,} train / {len(self.corpus.val_ids):,} val tokens; "
                 f"compression {self.corpus.vocab_size} -> {len(self.compressor)} ids ({self.compressor.reduction:.1%} fewer); "
                 f"unigram baseline {self.unigram_loss:.3f}")
        if self.step == 0 and not self.history["val"]:
            self._record_val(self.evaluate())
        bar = None
        if self.progress and self.is_leader:
            from tqdm import tqdm
            bar = tqdm(total=last, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        tokens, seconds = 0, 0.0
        ids_total, unique_total, wait_total, steps_run = 0, 0, 0.0, 0
        unread = []  # (step, loss on the device, lr) of steps whose loss the host has not read yet
        read_every = 1 if self.device.type == "cpu" else LOSS_READ_EVERY  # reading a GPU loss waits for the GPU
        while self.step < last:
            inputs, targets = sample_batch(self.corpus.train_ids, config.batch_size, config.seq_len, self.rng)
            started = time.perf_counter()
            stats = self.train_step(inputs, targets)
            seconds += time.perf_counter() - started
            tokens += inputs.size
            ids_total += stats["ids"]
            unique_total += stats["unique"]
            wait_total += stats["wait"]
            steps_run += 1
            unread.append((self.step, stats["loss"], stats["lr"]))
            self.history.setdefault("versions", []).append(stats["versions"])
            evaluate = self.step % config.eval_every == 0 or self.step == config.steps
            save = self.step % config.ckpt_every == 0 or self.step == config.steps or (self.step == last and save_at_stop)
            if not (evaluate or save or self.step == last or len(unread) >= read_every):
                continue
            started = time.perf_counter()  # reading the losses waits for the steps' GPU work: it is their time
            losses = self.step_losses([loss for _, loss, _ in unread])  # the same steps on every rank
            seconds += time.perf_counter() - started
            self.history["train"].extend([step, loss, lr] for (step, _, lr), loss in zip(unread, losses))
            advanced, unread = len(unread), []
            if evaluate:
                self._record_val(self.evaluate())
            if save:
                self.save()
            if self.on_step is not None:
                self.on_step(self.step, config.steps, losses[-1], tokens / max(seconds, 1e-9))
            if bar is not None:
                bar.update(advanced)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", val=f"{self.history['val'][-1][1]:.3f}",
                                tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
        self.wait_for_push()
        if bar is not None:
            bar.close()
        if save_at_stop or self.step == config.steps:
            self.plot()
        summary = {
            "step": self.step,
            "val_loss_start": self.history["val"][0][1],
            "val_loss": self.history["val"][-1][1],
            "train_loss": self.history["train"][-1][1] if self.history["train"] else None,
            "unigram_loss": self.unigram_loss,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "unique_id_ratio": unique_total / ids_total if ids_total else 0.0,
            "step_seconds": seconds / steps_run if steps_run else 0.0,
            "prefetch_wait_ms_per_step": 1e3 * wait_total / steps_run if steps_run else 0.0,
            "compression_reduction": self.compressor.reduction,
            "parameters": counts,
            "checkpoint": str(self.out_dir / "checkpoint"),
            "tables": self.tables.description,
            "workers": self.parallel.world_size,
            "mode": config.mode,
            "overlapped_fetches": self.overlapped_fetches,
            "device": str(self.device),
        }
        if self.is_leader:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _record_val(self, loss: float) -> None:
        self.history["val"].append([self.step, loss])
        if not self.is_leader:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "val_loss": loss}) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """Everything a run needs to continue exactly (dense model, optimizer, step, RNGs, history); not the tables.

        Tensors are CPU copies, so the state can travel to a process without this one's GPU.
        """
        self.wait_for_push()
        return {
            "model": to_cpu(self.model.state_dict()),
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "step": self.step,
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "train_config": dataclasses.asdict(self.config),
            "model_config": ckpt.model_config_to_dict(self.model_config),
        }

    def load_state(self, state: dict, source: str = "the saved state") -> None:
        """Continue from state() of a run with the same model config (remote tables keep their current rows)."""
        saved = ckpt.model_config_from_dict(state["model_config"])
        if saved != self.model_config:
            raise ValueError(f"{source} was trained with another model config or tokenizer; "
                             f"resume with the same preset, data and tokenizer")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"].cpu())
        self.history = state["history"]

    def save(self) -> Path | None:
        """Write a complete checkpoint to out_dir/checkpoint (atomically; the leader only)."""
        if not self.is_leader:
            self.wait_for_push()
            return None
        directory = self.out_dir / "checkpoint"
        tmp = ckpt.begin_write(directory)
        torch.save(self.state(), tmp / ckpt.MODEL_FILE)
        if not self.backend.remote:
            self.backend.save(tmp / ckpt.TABLES_FILE)
        else:  # the rows stay on the memory service; record where
            (tmp / ckpt.REMOTE_TABLES_FILE).write_text(json.dumps({"memory": self.tables.memory, "table": self.tables.table,
                                                                   "version": self.config.version}))
        self.compressor.save(tmp / ckpt.COMPRESSION_FILE)
        (tmp / ckpt.TOKENIZER_FILE).write_bytes(self.tokenizer_json)
        (tmp / ckpt.CONFIG_FILE).write_text(json.dumps({
            "train": dataclasses.asdict(self.config), "model": ckpt.model_config_to_dict(self.model_config)}, indent=2))
        ckpt.commit_write(tmp, directory)
        return directory

    def load(self, directory: str | Path) -> None:
        """Restore the state of a checkpoint written by save() for the same config."""
        directory = ckpt.require_checkpoint(directory)
        # on the CPU first: load_state_dict moves the moments to their parameters' device and keeps AdamW's step
        # counters on the host (on the GPU, foreach AdamW would read them back twice per parameter, every step)
        state = torch.load(directory / ckpt.MODEL_FILE, map_location="cpu", weights_only=False)
        self.load_state(state, f"checkpoint {directory}")
        if not self.backend.remote:
            self.backend.load(directory / ckpt.TABLES_FILE)
        # remote tables continue from the service's current rows

    # ------------------------------------------------------------------ plot
    def plot(self) -> Path | None:
        """Loss curve PNG (train, val, unigram baseline) in out_dir."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.history["train"] or not self.is_leader:
            return None
        train = np.asarray(self.history["train"])
        val = np.asarray(self.history["val"])
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(train[:, 0], train[:, 1], alpha=0.35, label="train (per step)")
        if len(train) >= 10:
            k = max(1, len(train) // 20)
            smooth = np.convolve(train[:, 1], np.ones(k) / k, mode="valid")
            ax.plot(train[k - 1:, 0], smooth, label=f"train ({k}-step mean)")
        ax.plot(val[:, 0], val[:, 1], "o-", label="val")
        ax.axhline(self.unigram_loss, color="gray", linestyle="--", label="unigram baseline")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        model = "Engram-MoE" if self.model_config.engram is not None else "MoE (no Engram)"
        ax.set_title(f"{model} {self.config.preset}" + (f", rho {self.config.rho:g}" if self.config.rho is not None else ""))
        ax.legend()
        fig.tight_layout()
        path = self.out_dir / "loss_curve.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def to_cpu(value):
    """A copy of nested dicts/lists of tensors with every tensor on the CPU."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def train_config_from_checkpoint(directory: str | Path, **overrides) -> TrainConfig:
    """The TrainConfig a checkpoint was written with, with some fields replaced."""
    directory = ckpt.require_checkpoint(directory)
    data = json.loads((Path(directory) / ckpt.CONFIG_FILE).read_text())["train"]
    data["device"] = "auto"  # where it was trained says nothing of where it resumes (--device overrides)
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["tokenizer"] = str(Path(directory) / ckpt.TOKENIZER_FILE)
    return TrainConfig(**data)
