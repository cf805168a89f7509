"""Data-parallel model workers on the simulated multi-node cluster: equality with one worker, scaling, async mode."""

import time

import numpy as np
import pytest

from memory_service.row_init import init_rows
from model_worker.device import cuda_unavailable_reason
from model_worker.train import TrainConfig, Trainer
from orchestration.workers import WorkerGroup, WorkerLost, attach_job, start_job

pytestmark = pytest.mark.slow


def config_for(tmp_path, corpus, tokenizer, pool_name, **kw):
    values = dict(preset="tiny", steps=24, batch_size=8, seq_len=48, warmup_steps=4, eval_every=12, eval_batches=2,
                  ckpt_every=1000, data=str(corpus), tokenizer=str(tokenizer), memory=f"pool:{pool_name}", table="t",
                  out_dir=str(tmp_path / "remote"))
    values.update(kw)
    return values


@pytest.fixture(scope="module")
def one_worker_doubled_batch(small_corpus, small_tokenizer, tmp_path_factory):
    """The reference: one in-process trainer with the whole (doubled) batch."""
    tmp = tmp_path_factory.mktemp("local")
    config = config_for(tmp, small_corpus, small_tokenizer, "unused", memory=None, out_dir=str(tmp / "local"))
    trainer = Trainer(TrainConfig(**config), progress=False, log=lambda *a: None)
    trainer.run()
    return trainer


@pytest.fixture
def pool(make_pool):
    return make_pool(num_shards=2)


def losses(history) -> np.ndarray:
    return np.asarray(history["train"])[:, 1]


def assert_same_run(summary, pool, reference):
    """Same losses to float tolerance; the tables agree but for Adam's sign-sensitive near-zero moments.

    Summing a row's gradient over two workers rounds differently from one worker's sum
    (about 1e-6 relative at step 1, growing to 1e-5 by step 24 as the dense weights drift
    by as much). Row-wise Adam divides by sqrt(v), so where a row's moments are near zero
    that rounding moves its update by up to a step of lr: a few percent of elements, on
    a few percent of rows.
    """
    np.testing.assert_allclose(losses(summary["history"]), losses(reference.history), atol=2e-4)
    np.testing.assert_allclose(np.asarray(summary["history"]["val"])[:, 1], np.asarray(reference.history["val"])[:, 1], atol=2e-4)
    client = pool.client("t")
    for layer in reference.model_config.engram.layer_ids:  # every combined row update landed exactly once
        ours, expected = client.read_layer(layer), reference.backend.table(layer)
        initial = init_rows(expected.shape[0], expected.shape[1], layer, 0, expected.shape[0], 1.0, 0, expected.dtype)
        touched = np.any(expected != initial, axis=1)  # rows the run updated
        diff = np.abs(ours - expected)[touched]
        moved = np.abs(expected - initial)[touched].mean()
        assert np.array_equal(ours[~touched], expected[~touched])  # rows nobody used are untouched
        assert (diff <= 2e-4).mean() > 0.95
        assert diff.mean() < 0.01 * moved  # measured: 3e-5 against 0.014


def test_two_data_parallel_workers_equal_one_worker_with_the_doubled_batch(
        pool, ray_cluster, two_workers, tmp_path, small_corpus, small_tokenizer, one_worker_doubled_batch):
    group = WorkerGroup(config_for(tmp_path, small_corpus, small_tokenizer, pool.config.name), token="tok")
    group.start(2)
    try:
        summary = group.run()
    finally:
        group.stop()
    assert summary["workers"] == 2 and summary["step"] == 24
    assert summary["worker_nodes"] == [ray_cluster["gpu_node"]] * 2  # model workers only on the GPU node
    assert summary["device"] == ("cpu" if cuda_unavailable_reason() else "cuda")  # the summary names it
    assert_same_run(summary, pool, one_worker_doubled_batch)


def run_job_and_meddle(pool, config, meddle) -> dict:
    """Run a 2-worker training job (segments of 4 steps); once it passed step 4, call meddle(job); the summary."""
    import ray

    job = start_job(config, 2, pool.config.name, token="tok", segment_steps=4)
    try:
        running = job.run.remote()
        deadline = time.time() + 300
        while ray.get(job.status.remote())["step"] < 4 and time.time() < deadline:
            time.sleep(0.2)
        meddle(job)
        return ray.get(running, timeout=600)
    finally:
        ray.get(job.stop.remote())
        ray.kill(job)


def test_scaling_workers_mid_run_keeps_the_trajectory(pool, two_workers, tmp_path, small_corpus, small_tokenizer, one_worker_doubled_batch):
    import ray

    config = config_for(tmp_path, small_corpus, small_tokenizer, pool.config.name)
    summary = run_job_and_meddle(  # what `engram workers scale 1` does
        pool, config, lambda job: ray.get(attach_job(pool.config.name).scale.remote(1)))
    assert [(e["from"], e["to"]) for e in summary["scaling"]] == [(2, 1)]
    assert summary["workers"] == 1 and summary["step"] == 24
    assert_same_run(summary, pool, one_worker_doubled_batch)
    with pytest.raises(ValueError, match="no training job"):
        attach_job("no-such-pool")


def test_async_mode_overlaps_the_push_with_the_next_step(pool, two_workers, tmp_path, small_corpus, small_tokenizer,
                                                          one_worker_doubled_batch):
    config = config_for(tmp_path, small_corpus, small_tokenizer, pool.config.name, mode="async")
    group = WorkerGroup(config, token="tok")
    group.start(2)
    try:
        summary = group.run()
    finally:
        group.stop()
    assert summary["mode"] == "async" and summary["step"] == 24
    assert summary["overlapped_fetches"] > 0  # lookups went out while the previous push was still in flight
    val = np.asarray(summary["history"]["val"])[:, 1]
    sync_val = np.asarray(one_worker_doubled_batch.history["val"])[:, 1]
    assert val[-1] < val[0] - 0.2  # it learns
    assert abs(val[-1] - sync_val[-1]) < 0.05  # and a step of staleness barely changes where it gets


def test_a_worker_that_dies_is_replaced_and_training_finishes(pool, two_workers, tmp_path, small_corpus, small_tokenizer):
    import ray

    config = config_for(tmp_path, small_corpus, small_tokenizer, pool.config.name)
    summary = run_job_and_meddle(  # rank 1's process dies mid-run
        pool, config, lambda job: ray.kill(ray.get(job.workers.remote())[1]))
    assert summary["step"] == 24 and summary["workers"] == 2
    assert len(summary["failures"]) == 1 and summary["failures"][0]["step"] >= 4  # restarted from a boundary, not step 0
    val = np.asarray(summary["history"]["val"])[:, 1]
    assert np.all(np.isfinite(val)) and val[-1] < val[0] - 0.2


def test_workers_that_cannot_start_end_the_job_with_their_error(pool, two_workers, tmp_path, small_tokenizer):
    """Ranks that fail at setup (no corpus where they run) are stopped at once and retried, then the job reports why."""
    import ray

    config = config_for(tmp_path, tmp_path / "no-such-corpus", small_tokenizer, pool.config.name)
    started = time.time()
    job = start_job(config, 2, pool.config.name, token="tok")
    try:
        with pytest.raises(Exception, match="no-such-corpus"):
            ray.get(job.run.remote(), timeout=300)
    finally:
        ray.kill(job)
    assert time.time() - started < 300  # not left waiting in a collective


def test_the_driver_chooses_one_device_and_a_rank_that_cannot_use_it_fails_at_once(pool, ray_cluster, two_workers, tmp_path,
                                                                                   small_corpus, small_tokenizer):
    """The device is chosen once for the group (so every rank joins with the same collective backend); asked for
    CUDA where torch cannot use it, setup fails at once with the cause, instead of a CPU fallback or a hang."""
    if cuda_unavailable_reason() is None:
        pytest.skip("CUDA is usable here: the refusal cannot be shown")
    config = dict(config_for(tmp_path, small_corpus, small_tokenizer, pool.config.name), device="cuda")
    group = WorkerGroup(config, token="tok")
    started = time.time()
    try:
        with pytest.raises(WorkerLost, match="device cuda was asked for but cannot be used: "):
            group.start(2)
    finally:
        group.stop(graceful=False)
    assert time.time() - started < 120
