"""Acknowledged writes survive SIGKILL of the server process; the store reopens cleanly."""

import os
import signal

import numpy as np

from memory_service.admin import ServiceAdmin
from memory_service.client import MemoryClient
from memory_service.spec import EngramSpec
from orchestration.local_server import start_server

SPEC = EngramSpec(engram_vocab_size=[2003, 2003], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1])


def test_acknowledged_writes_survive_sigkill(tmp_path):
    path = tmp_path / "store"
    proc, address = start_server(path, token="t")
    try:
        ServiceAdmin(address, token="t").create_table("tbl", SPEC, init_std=1.0)
        client = MemoryClient(address, "tbl", token="t")
        ids = np.arange(100, 140)
        client.write_rows(1, ids, np.full((ids.size, SPEC.head_dim), 3.25, np.float32))
        grads = np.ones((5, SPEC.head_dim), np.float32)
        client.apply_gradients(1, np.arange(5), grads, lr=0.5)
        after_adam = client.lookup(1, np.arange(5)).copy()
        admin = ServiceAdmin(address, token="t")
        v2 = admin.create_version("tbl", copy_of=1)
        admin.swap("tbl", v2)
        os.kill(proc.pid, signal.SIGKILL)  # right after the acknowledgements, no shutdown
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, address = start_server(path, token="t")
    try:
        client = MemoryClient(address, "tbl", token="t")
        rows, version = client.lookup_raw(1, ids)
        assert version == v2
        np.testing.assert_array_equal(rows, 3.25)
        np.testing.assert_array_equal(client.lookup(1, np.arange(5)), after_adam)
        np.testing.assert_array_equal(client.read_layer(1, version=1)[100:140], 3.25)
        client.apply_gradients(1, np.arange(5), grads, lr=0.5)  # and it takes writes again
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0  # graceful shutdown on SIGTERM


def test_pushes_survive_sigkill_between_folds(tmp_path):
    """Row-wise Adam pushes held as segments and folded (a tiny --max-delta-rows): a SIGKILL loses none of them."""
    from memory_service.local_table import LocalTable
    from memory_service.table_meta import layer_rows_for_spec

    path = tmp_path / "store"
    local = LocalTable(SPEC, layer_rows_for_spec(SPEC), init_std=1.0)
    rng = np.random.default_rng(0)
    proc, address = start_server(path, token="t", extra_args=("--max-delta-rows", "300"))
    try:
        ServiceAdmin(address, token="t").create_table("tbl", SPEC, init_std=1.0)
        client = MemoryClient(address, "tbl", token="t")
        folds = held = 0
        for _ in range(40):  # until rows have been folded twice and others are held in segments only
            ids = np.unique(rng.integers(0, local.num_rows(1), 150))
            grads = rng.standard_normal((ids.size, SPEC.head_dim)).astype(np.float32)
            client.apply_gradients(1, ids, grads, lr=0.05)
            local.apply_gradients(1, ids, grads, lr=0.05)
            stats = client.stats()[0]
            folds, held = stats["folds"], stats["delta_rows"]
            if folds >= 2 and held > 0:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert folds >= 2 and held > 0  # both states at the kill: rows folded into chunks and rows only in segments
    proc, address = start_server(path, token="t")
    try:
        np.testing.assert_array_equal(MemoryClient(address, "tbl").read_layer(1), local.table(1))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_pushes_survive_sigkill_in_the_middle_of_compaction(tmp_path):
    """SIGKILL while the background compactor flushes, merges or folds (seen running just before the kill), three
    times over: every acknowledged push is there after each restart, exactly (row-wise Adam equal to LocalTable)."""
    from memory_service.local_table import LocalTable
    from memory_service.table_meta import layer_rows_for_spec

    spec = EngramSpec(engram_vocab_size=[100_003], max_ngram_size=2, n_embed_per_ngram=32, n_head_per_ngram=1,
                      layer_ids=[1])
    path = tmp_path / "store"
    local = LocalTable(spec, layer_rows_for_spec(spec), init_std=1.0)
    rng = np.random.default_rng(1)
    killed_mid_compaction = 0
    for cycle in range(3):
        proc, address = start_server(path, token="t", extra_args=("--max-delta-rows", "2000"))
        try:
            if cycle == 0:
                ServiceAdmin(address, token="t").create_table("tbl", spec, init_std=1.0)
            client = MemoryClient(address, "tbl", token="t")
            np.testing.assert_array_equal(client.read_layer(1), local.table(1))  # everything acknowledged before
            for _ in range(200):
                ids = np.unique(rng.integers(0, local.num_rows(1), 1500))
                grads = rng.standard_normal((ids.size, spec.head_dim)).astype(np.float32)
                client.apply_gradients(1, ids, grads, lr=0.05)
                local.apply_gradients(1, ids, grads, lr=0.05)
                stats = client.stats()[0]
                if stats["compactions_started"] > stats["compactions"] and stats["folds"] + stats["merges"] > cycle:
                    killed_mid_compaction += 1
                    break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert killed_mid_compaction >= 2
    proc, address = start_server(path, token="t")
    try:
        client = MemoryClient(address, "tbl", token="t")
        np.testing.assert_array_equal(client.read_layer(1), local.table(1))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_client_retries_while_the_server_restarts(tmp_path):
    import threading
    import time

    path = tmp_path / "store"
    proc, address = start_server(path, token="t")
    port = int(address.rsplit(":", 1)[1])
    ServiceAdmin(address, token="t").create_table("tbl", SPEC, init_std=1.0)
    client = MemoryClient(address, "tbl", retry_budget_s=60, deadline_s=5)
    expected = client.lookup(1, np.arange(50)).copy()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    result = {}
    caller = threading.Thread(target=lambda: result.update(rows=client.lookup(1, np.arange(50))))
    caller.start()  # the lookup starts while nothing listens
    time.sleep(1.0)
    proc, _ = start_server(path, token="t", port=port)
    try:
        caller.join(timeout=60)
        np.testing.assert_array_equal(result["rows"], expected)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
