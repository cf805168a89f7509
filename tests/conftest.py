"""Shared fixtures: reference vectors, a small real-text corpus and tokenizer (trained once per session)."""

import json
import os
import shutil
from pathlib import Path

# Ray resolves "this node" to the machine's network address unless told it is a one-machine
# cluster; tests keep every connection on loopback. (Read when ray is first imported.)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def reference_hashing() -> dict:
    """Golden vectors produced by running the reference NgramHashMapping (see tests/data/README.md)."""
    return json.loads((DATA / "reference_hashing.json").read_text())


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A directory of ~80 real standard-library source files (a fraction of the built-in corpus)."""
    from model_worker.data import corpus_files

    root, files = corpus_files()
    picked = [f for f in files if f.parent == root and f.stat().st_size > 4000][:80]
    out = tmp_path_factory.mktemp("corpus")
    for f in picked:
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def small_tokenizer(small_corpus, tmp_path_factory) -> Path:
    """A 1024-token byte-level BPE trained on the small corpus."""
    from model_worker.data import corpus_files, split_texts, train_tokenizer

    root, files = corpus_files(small_corpus)
    train, _ = split_texts(root, files)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(train, 1024, path)
    return path


@pytest.fixture
def make_pool(ray_cluster, tmp_path, request):
    """make_pool(num_shards) -> a MemoryPool named after the test (token "tok"), shut down afterwards."""
    from orchestration.pool import MemoryPool, PoolConfig

    pools = []

    def make(num_shards: int):
        name = request.node.name.replace("_", "-")[:40]
        pools.append(MemoryPool(PoolConfig(name=name, num_shards=num_shards, base_dir=str(tmp_path / "pool"),
                                           token="tok")).start())
        return pools[-1]

    yield make
    for p in pools:
        p.shutdown()


def usable_gpus() -> int:
    """GPUs torch can use in this process (0 on a CPU host or with a CPU-only torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_node_gpus(real: int) -> int:
    """GPUs the test cluster's model-worker node declares: the real ones on a GPU host (Ray hands each worker a
    distinct real id), else two placeholders (their ids mean nothing: torch sees no GPU and workers run on the CPU)."""
    return real if real else 2


@pytest.fixture(scope="session")
def ray_cluster():
    """A multi-node Ray cluster on this machine: a head, two memory nodes and a model-worker node with the GPUs
    (only that node: a head or memory node that auto-detected a real GPU would hand out the same device again)."""
    import ray
    from ray.cluster_utils import Cluster

    gpus = gpu_node_gpus(usable_gpus())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "resources": {"head": 1}})
    memory_nodes = [cluster.add_node(num_cpus=1, num_gpus=0, resources={"engram_memory": 3}) for _ in range(2)]
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=gpus)  # room for two data-parallel workers (on a CPU host)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    yield {"cluster": cluster, "memory_nodes": [n.node_id for n in memory_nodes], "gpu_node": gpu_node.node_id,
           "gpus": gpus}
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def two_workers(ray_cluster):
    """Skip where the cluster cannot place two model workers (a GPU host with one GPU)."""
    if ray_cluster["gpus"] < 2:
        pytest.skip(f"two data-parallel workers need two GPUs; this host has {ray_cluster['gpus']}")
