"""Data-parallel model workers that scale on their own: a worker group and the training job that owns it.

A `WorkerGroup` is M TrainWorker actors (GPU nodes, or CPU workers when the cluster has
no GPUs) forming one torch.distributed group. The global batch stays fixed, so each
worker trains on batch_size / M sequences and the run's trajectory does not depend on M.

A `TrainingJob` (a named Ray actor, `engram-<pool>-training`) runs the group in segments
of a few steps and keeps rank 0's state (model, optimizer, step, RNGs) at each segment
boundary. `engram workers scale M` records the wanted size; at the next boundary the job
stops the workers and starts M new ones from that state. A worker that dies makes the
job restart the group from the last boundary. The tables stay on the memory pool
throughout, so nothing else moves.
"""

from __future__ import annotations

import threading
import time

from orchestration.pool import NAMESPACE, RAY_TIMEOUT_S
from orchestration.worker import TrainWorker, worker_options


def job_name(pool: str) -> str:
    """Ray actor name of a pool's training job."""
    return f"engram-{pool}-training"


class WorkerLost(RuntimeError):
    """A rank of the group died or failed during a segment."""


def _results_or_lost(refs: list, doing: str) -> list:
    """Results of every rank's call; the first failure raises WorkerLost at once, not after the others time out in a collective."""
    import ray

    remaining = list(refs)
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1)
        try:
            ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - a dead actor, or a rank whose peer died mid-collective
            cause = getattr(e, "cause", None) or e  # a task error carries the worker's own exception
            raise WorkerLost(f"a model worker failed while {doing}: {type(cause).__name__}: {str(cause)[:300]}") from e
    return ray.get(refs, timeout=RAY_TIMEOUT_S)


def follow_job(job, log=print, poll_s: float = 1.0) -> dict:
    """Wait for a training job's run() while showing rank 0's progress (a line rewritten in place on a terminal,
    a line every 10% of the steps otherwise; none with log=None); returns the run's summary."""
    import sys

    import ray

    running = job.run.remote()
    tty = log is not None and sys.stderr.isatty()
    shown_tenth = -1
    while not ray.wait([running], timeout=poll_s)[0]:  # every wait bounded; the run takes as long as it takes
        if log is None:
            continue
        progress = ray.get(job.status.remote(), timeout=RAY_TIMEOUT_S)["progress"]
        if not progress:
            continue
        val = f"  val {progress['val_loss']:.3f}" if progress.get("val_loss") is not None else ""
        line = (f"step {progress['step']}/{progress['steps']}  loss {progress['loss']:.3f}{val}  "
                f"{progress['tokens_per_s']:,.0f} tokens/s")
        tenth = progress["step"] * 10 // max(progress["steps"], 1)
        if tty:
            print(f"\r[train] {line}   ", end="", file=sys.stderr, flush=True)
        elif tenth > shown_tenth:
            shown_tenth = tenth
            log(f"[train] {line}")
    if tty:
        print(file=sys.stderr)
    return ray.get(running, timeout=RAY_TIMEOUT_S)


class WorkerGroup:
    """M TrainWorker actors training data-parallel."""

    def __init__(self, config: dict, token: str | None = None, tokenizer_json: bytes | None = None, reporter=None):
        self.config = config
        self.token = token
        self.tokenizer_json = tokenizer_json  # shipped to workers on nodes without the driver's tokenizer file
        self.reporter = reporter  # the actor rank 0 reports its progress to (the training job)
        self.workers: list = []

    def start(self, num_workers: int, state: dict | None = None) -> int:
        """Launch num_workers ranks (continuing from `state`, if given); returns the step they start at."""
        import ray

        if num_workers < 1:
            raise ValueError(f"a worker group needs at least one worker, got {num_workers}")
        if self.config["batch_size"] % num_workers:
            raise ValueError(f"batch size {self.config['batch_size']} does not split evenly over {num_workers} workers")
        options = worker_options(ray)
        tokenizer = ray.put(self.tokenizer_json) if self.tokenizer_json is not None else None
        self.workers = [ray.remote(TrainWorker).options(**options).remote(self.config, self.token, tokenizer,
                                                                          self.reporter if rank == 0 else None)
                        for rank in range(num_workers)]
        master = ray.get(self.workers[0].rendezvous.remote(), timeout=RAY_TIMEOUT_S) if num_workers > 1 else None
        state_ref = ray.put(state) if state is not None else None
        try:  # a rank that fails to set up leaves the others waiting in the first broadcast: stop them all
            # one device (and so one collective backend) for the whole group, chosen where rank 0 runs
            device = _results_or_lost([self.workers[0].device_for.remote(self.config.get("device", "auto"))],
                                      "choosing the device")[0]
            steps = _results_or_lost([w.setup.remote(rank, num_workers, master, state_ref, device)
                                      for rank, w in enumerate(self.workers)], "setting up")
        except WorkerLost:
            self.stop(graceful=False)
            raise
        return steps[0]

    @property
    def size(self) -> int:
        """Workers in the group."""
        return len(self.workers)

    def run(self, stop_after: int | None = None, save_at_stop: bool = True) -> dict:
        """Train every rank to stop_after (or the end); returns rank 0's summary."""
        summaries = _results_or_lost([w.run.remote(stop_after, save_at_stop) for w in self.workers], "training")
        summary = summaries[0]
        summary["worker_nodes"] = [s["node_id"] for s in summaries]
        return summary

    def state(self) -> dict:
        """Rank 0's run state (every rank holds the same)."""
        import ray

        return ray.get(self.workers[0].state.remote(), timeout=RAY_TIMEOUT_S)

    def stop(self, graceful: bool = True) -> None:
        """Leave the process group and kill every worker (graceful=False: kill at once, e.g. ranks stuck on a dead peer)."""
        import ray

        if graceful:
            try:
                ray.get([w.leave.remote() for w in self.workers], timeout=60)
            except Exception:  # noqa: BLE001 - a dead worker cannot leave; kill anyway
                pass
        for w in self.workers:
            ray.kill(w)
        self.workers = []


class RunTotals:
    """Whole-run figures from the segments' summaries."""

    def __init__(self):
        self.steps = 0
        self.seconds = 0.0
        self.wait_ms = 0.0
        self.unique_weighted = 0.0
        self.wall_seconds = 0.0

    def add(self, steps: int, summary: dict) -> None:
        """Fold in a segment of `steps` steps."""
        self.steps += steps
        self.seconds += summary["step_seconds"] * steps
        self.wait_ms += summary["prefetch_wait_ms_per_step"] * steps
        self.unique_weighted += summary["unique_id_ratio"] * steps
        self.wall_seconds += summary.get("wall_seconds", 0.0)

    def summary(self, config: dict) -> dict:
        """step_seconds, tokens_per_s, prefetch wait and unique ratio over every segment."""
        if not self.steps:
            return {}
        step_seconds = self.seconds / self.steps
        return {"step_seconds": step_seconds, "tokens_per_s": config["batch_size"] * config["seq_len"] / step_seconds,
                "prefetch_wait_ms_per_step": self.wait_ms / self.steps, "unique_id_ratio": self.unique_weighted / self.steps,
                "wall_seconds": self.wall_seconds}


class TrainingJob:
    """Runs a worker group to the end of training, re-forming it when asked to scale (a Ray actor)."""

    def __init__(self, config: dict, num_workers: int = 1, token: str | None = None, segment_steps: int = 10,
                 state: dict | None = None, stop_after: int | None = None, tokenizer_json: bytes | None = None,
                 max_failures: int = 3):
        import ray

        me = ray.get_runtime_context().current_actor if ray.is_initialized() else None
        self.group = WorkerGroup(config, token, tokenizer_json, reporter=me)
        self.progress: dict = {}  # rank 0's latest report: step, steps, loss, val_loss, tokens_per_s
        self.steps = config["steps"] if stop_after is None else min(config["steps"], stop_after)
        self.segment_steps = max(1, segment_steps)
        self.wanted = num_workers
        self.step = 0
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.max_failures = max_failures
        self.failures: list[dict] = []
        self.snapshot = state  # the run's state at the last segment boundary: where a failed group restarts
        try:
            self.step = self.group.start(num_workers, state)
        except WorkerLost as e:  # run() starts the group again (a transient failure, e.g. a node lost meanwhile)
            self.failures.append({"step": self.step, "error": str(e)})

    def run(self) -> dict:
        """Train to the end; returns rank 0's summary with the scaling and failure events.

        After each segment the job keeps rank 0's state. A scale re-forms the group from
        it. So does a worker failure: the group restarts at the last boundary and redoes
        that segment's steps. The tables are not rolled back, so the row updates of the
        lost part of a segment are applied twice (at-least-once).
        """
        summary = None
        totals = RunTotals()
        failures = self.failures
        while summary is None or summary["step"] < self.steps:
            with self.lock:
                wanted = self.wanted
            try:
                if self.group.size == 0:  # after a failure: restart from the last boundary
                    self.step = self.group.start(wanted, self.snapshot)
                elif wanted != self.group.size:
                    before = self.group.size
                    started = time.perf_counter()
                    self.group.stop()
                    self.step = self.group.start(wanted, self.snapshot)
                    self.events.append({"step": self.step, "from": before, "to": wanted,
                                        "seconds": time.perf_counter() - started})
                stop = min(self.steps, self.step + self.segment_steps)
                summary = self.group.run(stop_after=stop, save_at_stop=stop == self.steps)  # a checkpoint at the end
            except WorkerLost as e:
                failures.append({"step": self.step, "error": str(e)})
                if len(failures) > self.max_failures:
                    raise
                self.group.stop(graceful=False)  # the survivors wait on the dead rank: kill them too
                summary = None
                continue
            totals.add(summary["step"] - self.step, summary)
            self.step = summary["step"]
            if self.step < self.steps:
                self.snapshot = self.group.state()
        summary.update(totals.summary(self.group.config))
        summary["scaling"] = self.events
        summary["failures"] = failures
        summary["workers"] = self.group.size
        return summary

    def workers(self) -> list:
        """The current workers' actor handles (rank order)."""
        return list(self.group.workers)

    def scale(self, num_workers: int) -> dict:
        """Ask for num_workers workers (applied at the next segment boundary)."""
        if num_workers < 1:
            raise ValueError(f"need at least one worker, got {num_workers}")
        if self.group.config["batch_size"] % num_workers:
            raise ValueError(f"batch size {self.group.config['batch_size']} does not split evenly over {num_workers} workers")
        with self.lock:
            self.wanted = num_workers
        return self.status()

    def report(self, progress: dict) -> None:
        """Rank 0's progress (called by the worker, fire and forget)."""
        self.progress = progress

    def status(self) -> dict:
        """Workers now, workers wanted, step, scaling events so far, and rank 0's latest progress."""
        return {"workers": self.group.size, "wanted": self.wanted, "step": self.step, "steps": self.steps,
                "events": list(self.events), "progress": dict(self.progress)}

    def generate(self, prompt: str, max_new_tokens: int = 80, temperature: float = 0.8, seed: int = 0) -> str:
        """A completion from rank 0 (through the pool)."""
        import ray

        return ray.get(self.group.workers[0].generate.remote(prompt, max_new_tokens, temperature, seed),
                       timeout=RAY_TIMEOUT_S)

    def stop(self) -> None:
        """Stop the workers."""
        self.group.stop()


def start_job(config: dict, num_workers: int, pool: str, token: str | None = None, segment_steps: int = 10,
              state: dict | None = None, stop_after: int | None = None):
    """A TrainingJob actor named after the pool (so `engram workers scale` finds it).

    The config's tokenizer file is read here and shipped, so workers on other nodes train
    with the same tokenizer; a relative out_dir is made absolute.
    """
    import os

    import ray

    config = dict(config, out_dir=os.path.abspath(config["out_dir"]))
    tokenizer_json = None
    if config.get("tokenizer") and os.path.exists(config["tokenizer"]):
        with open(config["tokenizer"], "rb") as f:
            tokenizer_json = f.read()

    try:
        ray.get_actor(job_name(pool), namespace=NAMESPACE)
        raise ValueError(f"a training job is already running on pool {pool!r}")
    except ValueError as e:
        if "already running" in str(e):
            raise
    return ray.remote(TrainingJob).options(
        name=job_name(pool), namespace=NAMESPACE, num_cpus=0, max_concurrency=4,
    ).remote(config, num_workers, token, segment_steps, state, stop_after, tokenizer_json)


def attach_job(pool: str):
    """The running training job of a pool."""
    import ray

    try:
        return ray.get_actor(job_name(pool), namespace=NAMESPACE)
    except ValueError:
        raise ValueError(f"no training job is running on pool {pool!r} (start one with engram train --memory "
                         f"pool:{pool} --workers N)") from None
