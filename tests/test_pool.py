"""The Ray memory pool on a multi-node cluster simulated on this machine (memory nodes, a GPU node)."""

import time

import numpy as np
import pytest

from model_worker.train import Trainer, TrainConfig
from orchestration.pool import MemoryPool, PoolConfig
from orchestration.worker import TrainWorker, worker_options

pytestmark = pytest.mark.slow


@pytest.fixture
def pool(ray_cluster, tmp_path, request):
    name = request.node.name.replace("_", "-")[:40]
    p = MemoryPool(PoolConfig(name=name, num_shards=3, base_dir=str(tmp_path / "pool"), token="tok")).start()
    yield p
    p.shutdown()


def train_config(tmp_path, corpus, tokenizer, pool_name, **kw):
    values = dict(preset="tiny", steps=30, batch_size=4, seq_len=48, warmup_steps=5, eval_every=30, eval_batches=2,
                  ckpt_every=1000, data=str(corpus), tokenizer=str(tokenizer), memory=f"pool:{pool_name}", table="t",
                  out_dir=str(tmp_path / "remote"))
    values.update(kw)
    return values


def wait_for_training(pool, worker, min_updates: int = 8, timeout_s: float = 120) -> None:
    """Block until the worker's table exists and has taken some gradient pushes."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if "t" in pool.tables() and sum(s["gradient_pushes"] for s in pool.state()["shards"]) >= min_updates:
            return
        time.sleep(0.2)
    raise TimeoutError("training did not start")


def local_run(tmp_path, config: dict) -> Trainer:
    trainer = Trainer(TrainConfig(**{**config, "memory": None, "out_dir": str(tmp_path / "local")}), progress=False, log=lambda *a: None)
    trainer.run()
    return trainer


def test_placement_and_training_through_the_pool_equals_in_process(pool, ray_cluster, tmp_path, small_corpus, small_tokenizer):
    import ray

    state = pool.state()
    assert len(state["shards"]) == 3
    assert {s["node_id"] for s in state["shards"]} <= set(ray_cluster["memory_nodes"])  # shards only on memory nodes
    config = train_config(tmp_path, small_corpus, small_tokenizer, pool.config.name)
    worker = ray.remote(TrainWorker).options(**worker_options(ray)).remote(config, "tok")
    assert ray.get(worker.where.remote()) == ray_cluster["gpu_node"]  # the model worker on the GPU node
    remote = ray.get(worker.run.remote())
    local = local_run(tmp_path, config)
    np.testing.assert_allclose(np.asarray(remote["history"]["train"])[:, 1], np.asarray(local.history["train"])[:, 1], atol=1e-5)
    assert all(v == [1] for v in remote["history"]["versions"])
    client = pool.client("t")
    for layer in local.model_config.engram.layer_ids:
        np.testing.assert_allclose(client.read_layer(layer), local.backend.table(layer), atol=1e-6)
    assert all(s["rows_served"] > 0 for s in pool.state()["shards"])  # every shard served its range


def test_killing_a_shard_during_training(pool, tmp_path, small_corpus, small_tokenizer):
    import ray

    config = train_config(tmp_path, small_corpus, small_tokenizer, pool.config.name, steps=40)
    worker = ray.remote(TrainWorker).options(**worker_options(ray)).remote(config, "tok")
    running = worker.run.remote()
    wait_for_training(pool, worker)
    before = pool.state()["shards"][1]["pid"]
    pool.kill_shard(1)  # Ray restarts it; it reopens its LMDB store on the same port
    remote = ray.get(running, timeout=600)
    assert pool.state()["shards"][1]["pid"] != before
    local = local_run(tmp_path, config)
    np.testing.assert_allclose(np.asarray(remote["history"]["train"])[:, 1], np.asarray(local.history["train"])[:, 1], atol=1e-5)
    client = pool.client("t")
    for layer in local.model_config.engram.layer_ids:  # the table is the replay of every acknowledged update
        np.testing.assert_allclose(client.read_layer(layer), local.backend.table(layer), atol=1e-6)


def test_hot_swap_during_training(pool, tmp_path, small_corpus, small_tokenizer):
    import ray

    config = train_config(tmp_path, small_corpus, small_tokenizer, pool.config.name, steps=40)
    worker = ray.remote(TrainWorker).options(**worker_options(ray)).remote(config, "tok")
    running = worker.run.remote()
    wait_for_training(pool, worker)
    v2 = pool.create_version("t", copy_of=1)
    pool.swap("t", v2)
    remote = ray.get(running, timeout=600)
    versions = remote["history"]["versions"]
    assert all(len(v) == 1 for v in versions)  # every batch saw one version
    assert versions[0] == [1] and versions[-1] == [v2]
