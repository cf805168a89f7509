"""Training through the memory service (gRPC on loopback, LMDB store) equals training on the in-process table."""

import numpy as np
import pytest

from memory_service.server import build_server
from memory_service.store import TableStore
from model_worker.generate import Generator
from model_worker.train import TrainConfig, Trainer

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    store = TableStore(tmp_path / "store")
    srv, port, _ = build_server(store, token="tok")
    srv.start()
    yield f"grpc://127.0.0.1:{port}"
    srv.stop(0)
    store.close()


def test_sync_training_through_the_service_equals_in_process(tmp_path, server, small_corpus, small_tokenizer, monkeypatch):
    common = dict(preset="tiny", steps=50, batch_size=4, seq_len=48, warmup_steps=5, eval_every=25, eval_batches=2,
                  ckpt_every=50, data=str(small_corpus), tokenizer=str(small_tokenizer))
    local = Trainer(TrainConfig(out_dir=str(tmp_path / "local"), **common), progress=False, log=lambda *a: None)
    local.run()
    remote = Trainer(TrainConfig(out_dir=str(tmp_path / "remote"), memory=server, table="eq", **common),
                     progress=False, log=lambda *a: None, token="tok")
    summary = remote.run()
    a, b = np.asarray(local.history["train"]), np.asarray(remote.history["train"])
    assert a.shape == b.shape == (50, 3)
    np.testing.assert_allclose(b[:, 1], a[:, 1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(remote.history["val"]), np.asarray(local.history["val"]), atol=1e-5)
    assert summary["tables"].endswith("/eq") and summary["prefetch_wait_ms_per_step"] > 0
    # without prefetch (rows fetched before the forward pass) the run is the same
    blocking = Trainer(TrainConfig(out_dir=str(tmp_path / "blocking"), memory=server, table="eq2", prefetch=False, **common),
                       progress=False, log=lambda *a: None, token="tok")
    blocking.run(stop_after=10)
    np.testing.assert_allclose(np.asarray(blocking.history["train"])[:, 1], a[:10, 1], rtol=0, atol=1e-5)
    # the service's rows are the in-process table's rows
    for layer in local.model_config.engram.layer_ids:
        np.testing.assert_allclose(remote.backend.read_layer(layer), local.backend.table(layer), atol=1e-6)
    # a checkpoint of a service-backed run generates through the service, exactly like the local one
    monkeypatch.setenv("ENGRAM_TOKEN", "tok")
    text_remote = Generator.from_checkpoint(tmp_path / "remote" / "checkpoint").generate("def ", 20, temperature=0.0)
    text_local = Generator.from_checkpoint(tmp_path / "local" / "checkpoint").generate("def ", 20, temperature=0.0)
    assert text_remote == text_local
