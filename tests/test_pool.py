"""The Ray memory pool on a multi-node cluster simulated on this machine (memory nodes, a GPU node)."""

import os
import time

import numpy as np
import pytest

from model_worker.train import TrainConfig, Trainer
from orchestration.pool import MemoryPool, PoolConfig
from orchestration.pool_admin import PoolAdmin
from orchestration.worker import TrainWorker, worker_options

pytestmark = pytest.mark.slow


@pytest.fixture
def pool(make_pool):
    return make_pool(num_shards=3)


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


def can_lower_niceness() -> bool:
    """Whether this process may lower a thread's nice value (CAP_SYS_NICE), probed on a thread of its own."""
    import threading

    answer = []

    def probe():
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + 1)
        try:
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) - 1)
            answer.append(True)
        except PermissionError:
            answer.append(False)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return answer[0]


def test_placement_and_training_through_the_pool_equals_in_process(pool, ray_cluster, tmp_path, small_corpus, small_tokenizer):
    import ray

    state = pool.state()
    assert len(state["shards"]) == 3
    assert {s["node_id"] for s in state["shards"]} <= set(ray_cluster["memory_nodes"])  # shards only on memory nodes
    if can_lower_niceness():  # Ray starts actors at nice 15; a shard (every thread, gRPC's too) serves at 0 if it may
        assert [s["nice"] for s in state["shards"]] == [0, 0, 0]
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
    # the worker generates through the decoding engine and the pool: the in-process model's greedy text
    from model_worker.generate import Generator

    text = ray.get(worker.generate.remote("def ", 12, 0.0))
    assert text == Generator(local.model, local.fetcher, local.corpus.tokenizer()).generate("def ", 12, 0.0)


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
    admin = PoolAdmin(pool)
    v2 = admin.create_version("t", copy_of=1)
    admin.swap("t", v2)
    remote = ray.get(running, timeout=600)
    versions = remote["history"]["versions"]
    assert all(len(v) == 1 for v in versions)  # every batch saw one version
    assert versions[0] == [1] and versions[-1] == [v2]


def test_scale_2_3_1_while_lookups_and_pushes_continue(ray_cluster, tmp_path):
    """Zero failed lookups; the final table equals a single store's replay of the acknowledged updates."""
    import threading

    from memory_service.local_table import LocalTable
    from memory_service.spec import EngramSpec
    from memory_service.table_meta import layer_rows_for_spec

    spec = EngramSpec(engram_vocab_size=[20011, 20011], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1, 3])
    pool = MemoryPool(PoolConfig(name="scaling", num_shards=2, base_dir=str(tmp_path / "pool"), token="tok")).start()
    try:
        PoolAdmin(pool).create_table("s", spec, init_std=1.0, chunk_rows=1024)
        client = pool.client("s", retry_budget_s=120)
        sizes = dict(client.layer_rows)
        acked, failures, lookups = [], [], [0]
        stop = threading.Event()

        def traffic():
            rng = np.random.default_rng(7)
            while not stop.is_set():
                layer = int(rng.choice([1, 3]))
                try:
                    client.lookup(layer, rng.integers(0, sizes[layer], 3000))
                    lookups[0] += 1
                    ids = np.unique(rng.integers(0, sizes[layer], 500))
                    grads = rng.standard_normal((ids.size, spec.head_dim)).astype(np.float32)
                    client.apply_gradients(layer, ids, grads, lr=0.01)
                    acked.append((layer, ids, grads))
                except Exception as e:  # noqa: BLE001 - any failure counts
                    failures.append(repr(e))

        thread = threading.Thread(target=traffic)
        thread.start()
        time.sleep(1.0)
        grown = pool.scale(3)
        time.sleep(1.0)
        shrunk = pool.scale(1)
        time.sleep(1.0)
        stop.set()
        thread.join(timeout=120)
        assert not failures, failures[:3]
        assert grown["moves"] > 0 and shrunk["moves"] > 0 and lookups[0] > 10 and len(acked) > 10
        replay = LocalTable(spec, layer_rows_for_spec(spec))
        for layer, ids, grads in acked:
            replay.apply_gradients(layer, ids, grads, lr=0.01)
        final = pool.client("s")
        assert final.shard_map.num_shards == 1
        for layer in spec.layer_ids:
            np.testing.assert_allclose(final.read_layer(layer), replay.table(layer), atol=1e-6)
    finally:
        pool.shutdown()


def _admin_script(admin, spec) -> list:
    """The same table operations on any TableAdmin; each step's result, or the reason it was refused."""
    from memory_service.errors import EngramError

    steps = [
        ("create", lambda: admin.create_table("a", spec, init_std=0.5, chunk_rows=256).active_version),
        ("create again", lambda: admin.create_table("a", spec)),
        ("create, bad chunks", lambda: admin.create_table("b", spec, chunk_rows=10)),
        ("create, nan init", lambda: admin.create_table("b", spec, init_std=float("nan"))),
        ("copy of active", lambda: admin.create_version("a", copy_of=0)),
        ("seeded", lambda: admin.create_version("a", init_std=0.25, init_seed=3)),
        ("empty", lambda: admin.create_version("a")),
        ("swap 2", lambda: admin.swap("a", 2)),
        ("swap 3", lambda: admin.swap("a", 3)),
        ("swap missing", lambda: admin.swap("a", 99)),
        ("drop active", lambda: admin.drop_version("a", 3)),
        ("drop 2", lambda: admin.drop_version("a", 2)),
        ("rollback past a dropped version", lambda: admin.rollback("a")),
        ("rollback with nothing left", lambda: admin.rollback("a")),
        ("import, wrong shape", lambda: admin.import_rows("a", 1, np.zeros((3, spec.head_dim), np.float32))),
        ("versions", lambda: [v.version for v in admin.info("a").versions]),
        ("import", lambda: admin.import_rows("a", 1, np.full((admin.info("a").layer_rows[1], spec.head_dim), 2.5, np.float32),
                                             activate=True)),
        ("export", lambda: float(admin.export_rows("a", 1).mean())),
        ("export seeded", lambda: round(float(admin.export_rows("a", 1, version=3).std()), 2)),
        ("info", lambda: (admin.info("a").active_version, admin.info("a").swap_history)),
        ("list", lambda: [t.name for t in admin.list_tables()]),
        ("drop table", lambda: admin.drop_table("a")),
        ("info of a dropped table", lambda: admin.info("a")),
    ]
    results = []
    for name, step in steps:
        try:
            results.append((name, step()))
        except EngramError as e:
            results.append((name, e.reason))
    return results


def test_a_service_and_a_pool_behave_the_same_through_table_admin(make_pool, tmp_path):
    from memory_service.admin import ServiceAdmin
    from memory_service.server import build_server
    from memory_service.spec import EngramSpec
    from memory_service.store import TableStore

    spec = EngramSpec(engram_vocab_size=[3001], max_ngram_size=2, n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1])
    store = TableStore(tmp_path / "service")
    server, port, _ = build_server(store, token="tok")
    server.start()
    try:
        service = _admin_script(ServiceAdmin(f"127.0.0.1:{port}", token="tok"), spec)
    finally:
        server.stop(0)
        store.close()
    pool = make_pool(num_shards=2)
    pooled = _admin_script(PoolAdmin(pool), spec)
    assert pooled == service
    assert dict(service)["rollback past a dropped version"] == (1, 3)
    assert dict(service)["versions"] == [1, 3, 4]  # the refused import left no version behind


def test_a_refused_create_leaves_the_pool_usable(make_pool):
    """The directory and the shards stay at one epoch, so new clients of other tables work at once."""
    from memory_service.errors import InvalidArgument
    from memory_service.spec import EngramSpec

    spec = EngramSpec(engram_vocab_size=[3001], max_ngram_size=2, n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1])
    pool = make_pool(num_shards=2)
    admin = PoolAdmin(pool)
    admin.create_table("ok", spec, chunk_rows=256)
    with pytest.raises(InvalidArgument):
        admin.create_table("bad", spec, chunk_rows=10)
    assert pool.tables() == ["ok"]
    client = pool.client("ok", retry_budget_s=5)
    assert client.lookup(1, np.arange(100)).shape == (100, spec.head_dim)
    v2 = admin.create_version("ok")  # zeros
    admin.swap("ok", v2)
    old_map = pool.client("ok", retry_budget_s=5)  # holds this epoch's map
    admin.create_table("other", spec, chunk_rows=256)  # a new epoch: old_map's next request is refused as stale
    rows, version = old_map.lookup_raw(1, np.arange(50), version=1)  # ... and re-asked for the version it named
    assert version == 1 and np.abs(rows).sum() > 0


def test_a_missing_pool_is_a_clear_error(ray_cluster):
    from memory_service.errors import NotFound

    with pytest.raises(NotFound, match="no memory pool named 'nowhere'") as e:
        MemoryPool.attach("nowhere")
    assert e.value.reason == "POOL_NOT_FOUND"
