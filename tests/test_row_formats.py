"""Row formats: bfloat16 tables (stored, trained exactly, served, imported and exported, staged for torch) and the
compact optimizer state (bf16 m, one v per row)."""

import dataclasses

import grpc
import numpy as np
import pytest
import torch

from memory_service.admin import ServiceAdmin
from memory_service.errors import InvalidArgument
from memory_service.local_table import LocalTable
from memory_service.row_dtypes import BFLOAT16
from memory_service.row_optim import record_dtype
from memory_service.server import build_server
from memory_service.spec import EngramSpec
from memory_service.store import TableStore
from memory_service.table_io import read_table_file, write_table_file
from memory_service.table_meta import layer_rows_for_spec
from model_worker.device import host_tensor
from protos import engram_pb2 as pb
from protos import engram_pb2_grpc as pb_grpc

SPEC = EngramSpec(engram_vocab_size=[3001], max_ngram_size=2, n_embed_per_ngram=32, n_head_per_ngram=1, layer_ids=[0],
                  dtype="bfloat16")
TOKEN = "bf16"


@pytest.fixture
def served(tmp_path):
    store = TableStore(tmp_path / "store", chunk_rows=256, max_delta_rows=1500)
    server, port, _ = build_server(store, token=TOKEN)
    server.start()
    admin = ServiceAdmin(f"127.0.0.1:{port}", token=TOKEN)
    admin.create_table("t", SPEC, init_std=1.0, init_seed=5)
    yield store, admin, f"127.0.0.1:{port}"
    admin.close()
    server.stop(0)
    store.close()


def test_a_bf16_table_trains_exactly_like_the_in_process_table(served):
    """Row-wise Adam in fp32, rows rounded to bf16 after each step, through the delta, runs and folds alike."""
    store, admin, _ = served
    local = LocalTable(SPEC, layer_rows_for_spec(SPEC), init_std=1.0, init_seed=5)
    client = admin.data_client("t")
    rng = np.random.default_rng(0)
    for step in range(12):
        ids = np.unique(rng.integers(0, local.num_rows(0), 600))
        grads = rng.standard_normal((ids.size, SPEC.head_dim)).astype(np.float32)
        client.apply_gradients(0, ids, grads, lr=0.01 * (step + 1))
        local.apply_gradients(0, ids, grads, lr=0.01 * (step + 1))
    store.compactor.wait()
    assert store.counters["flushes"] >= 1
    all_ids = np.arange(local.num_rows(0))
    rows, _ = client.lookup_raw(0, all_ids)
    assert rows.dtype == BFLOAT16 and client.dtype == BFLOAT16
    np.testing.assert_array_equal(rows.view(np.uint16), local.table(0).view(np.uint16))  # bit for bit
    state = store.optimizer_state("t", 0, all_ids)
    np.testing.assert_array_equal(state["m"], local.optimizer_state(0)["m"])
    np.testing.assert_array_equal(state["v"], local.optimizer_state(0)["v"])
    client.close()


def test_bf16_rows_on_the_wire_say_so(served):
    """A lookup reply names its dtype BFLOAT16; writes in another dtype are refused and change nothing."""
    _, admin, address = served
    client = admin.data_client("t")
    ids = np.arange(10)
    before, _ = client.lookup_raw(0, ids)
    stub = pb_grpc.EngramMemoryStub(grpc.insecure_channel(address))
    reply = stub.Lookup(pb.LookupRequest(table="t", layer=0, row_ids=ids.astype("<i8").tobytes(),
                                        spec_fingerprint=SPEC.fingerprint()),
                        metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert reply.dtype == pb.BFLOAT16 and len(reply.rows) == ids.size * SPEC.head_dim * 2
    fp16 = pb.WriteRowsRequest(table="t", layer=0, spec_fingerprint=SPEC.fingerprint(), row_ids=ids.astype("<i8").tobytes(),
                               rows=np.ones((ids.size, SPEC.head_dim), np.float16).tobytes(), dtype=pb.FLOAT16,
                               request_id="fp16-into-bf16")
    with pytest.raises(grpc.RpcError) as refused:
        stub.WriteRows(fp16, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bfloat16" in refused.value.details()
    np.testing.assert_array_equal(client.lookup_raw(0, ids)[0].view(np.uint16), before.view(np.uint16))
    client.close()


def test_bf16_import_and_export_keep_every_bit(served, tmp_path):
    """safetensors keeps BF16; .npy widens to float32 (exact); a torch bf16 checkpoint imports as it is."""
    _, admin, _ = served
    num_rows = admin.info("t").layer_rows[0]
    rows = np.random.default_rng(2).standard_normal((num_rows, SPEC.head_dim)).astype(np.float32).astype(BFLOAT16)
    torch.save({"multi_head_embedding.embedding.weight": host_tensor(rows)}, tmp_path / "engram.pt")
    loaded = read_table_file(tmp_path / "engram.pt")
    assert loaded.dtype == BFLOAT16
    version = admin.import_rows("t", 0, loaded, activate=True)
    exported = admin.export_rows("t", 0, version)
    np.testing.assert_array_equal(exported.view(np.uint16), rows.view(np.uint16))

    write_table_file(tmp_path / "t.safetensors", {0: exported})
    assert read_table_file(tmp_path / "t.safetensors").dtype == BFLOAT16
    write_table_file(tmp_path / "t.npy", {0: exported})
    widened = read_table_file(tmp_path / "t.npy")
    assert widened.dtype == np.float32
    again = admin.import_rows("t", 0, widened)
    np.testing.assert_array_equal(admin.export_rows("t", 0, again).view(np.uint16), rows.view(np.uint16))

    np.save(tmp_path / "opaque.npy", rows)  # numpy writes bfloat16 as 2-byte voids: refused, clearly
    with pytest.raises(InvalidArgument, match="floating-point"):
        read_table_file(tmp_path / "opaque.npy")


def test_staged_bf16_rows_are_the_same_bits_in_torch():
    rows = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32).astype(BFLOAT16)
    tensor = host_tensor(rows)
    assert tensor.dtype == torch.bfloat16
    np.testing.assert_array_equal(tensor.view(torch.int16).numpy(), rows.view(np.int16))
    np.testing.assert_array_equal(tensor.float().numpy(), rows.astype(np.float32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compact_optimizer_state_is_smaller_and_the_store_keeps_it_exactly(tmp_path, dtype):
    """2 x head_dim + 8 bytes a row instead of 8 x head_dim + 8; the store's updates equal the in-process table's, bit
    for bit, through runs and folds and a reopen; a saved LocalTable loads back."""
    spec = dataclasses.replace(SPEC, dtype=dtype, optimizer_state="compact")
    assert spec.fingerprint() == dataclasses.replace(SPEC, dtype=dtype).fingerprint()  # invisible to clients
    assert record_dtype(spec.head_dim, "compact").itemsize == 2 * spec.head_dim + 8
    assert record_dtype(spec.head_dim, "exact").itemsize == 8 * spec.head_dim + 8
    store = TableStore(tmp_path / "s", chunk_rows=256, max_delta_rows=1000, background_compaction=False)
    store.create_table("t", spec)
    local = LocalTable(spec, layer_rows_for_spec(spec))
    rng = np.random.default_rng(6)
    for _ in range(10):
        ids = np.unique(rng.integers(0, local.num_rows(0), 500))
        grads = rng.standard_normal((ids.size, spec.head_dim)).astype(np.float32)
        store.apply_gradients("t", 0, ids, grads, lr=0.02)
        local.apply_gradients(0, ids, grads, lr=0.02)
    assert store.counters["folds"] >= 1
    store.close()
    store = TableStore(tmp_path / "s", chunk_rows=256, max_delta_rows=1000, background_compaction=False)
    all_ids = np.arange(local.num_rows(0))
    state = store.optimizer_state("t", 0, all_ids)
    assert state.dtype.itemsize == 2 * spec.head_dim + 8
    np.testing.assert_array_equal(state.view(np.uint8), local.optimizer_state(0).view(np.uint8))
    np.testing.assert_array_equal(store.lookup("t", 0, all_ids)[0], local.lookup(0, all_ids))
    store.close()
    local.save(tmp_path / "t.npz")
    again = LocalTable(spec, layer_rows_for_spec(spec), init_seed=9)
    again.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(again.table(0).view(np.uint16), local.table(0).view(np.uint16))
    np.testing.assert_array_equal(again.optimizer_state(0).view(np.uint8), local.optimizer_state(0).view(np.uint8))
    exact = LocalTable(dataclasses.replace(spec, optimizer_state="exact"), layer_rows_for_spec(spec))
    with pytest.raises(InvalidArgument, match="optimizer state"):
        exact.load(tmp_path / "t.npz")


def test_compact_adam_first_step_moves_each_value_by_lr_when_the_gradient_is_even():
    """With one v per row, a row whose gradient has the same magnitude everywhere moves like exact Adam (by lr)."""
    spec = dataclasses.replace(SPEC, dtype="float32", optimizer_state="compact")
    local = LocalTable(spec, layer_rows_for_spec(spec), init_std=0.0)
    grads = np.where(np.arange(spec.head_dim) % 2, 3.0, -3.0).astype(np.float32)[None, :]
    local.apply_gradients(0, np.array([7]), grads, lr=0.01)
    np.testing.assert_allclose(local.table(0)[7], -0.01 * np.sign(grads[0]), rtol=1e-5)
    record = local.optimizer_state(0)[7]
    assert record["step"] == 1 and record["v"] == pytest.approx(0.001 * 9.0, rel=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_all_finite_reads_the_bits_right_for_every_row_dtype(dtype):
    from memory_service.row_dtypes import all_finite, row_dtype

    dt = row_dtype(dtype)
    edge = np.array([0.0, -0.0, 1.0, -2.5, 1e-30, -1e-30], dtype=np.float32).astype(dt)
    largest = np.array([np.finfo(np.float16).max if dtype == "float16" else 3.0e38], dtype=np.float32).astype(dt)
    assert all_finite(np.concatenate([edge, largest, -largest]).reshape(2, 4))
    assert all_finite(np.zeros((0, 4), dtype=dt))
    for bad in (np.inf, -np.inf, np.nan):
        values = np.ones((3, 4), dtype=np.float32)
        values[2, 1] = bad
        assert not all_finite(values.astype(dt)), bad
        assert not all_finite(values.astype(dt)[:, 1::2].T), bad  # strided views too
        assert all_finite(values.astype(dt)[:, ::2].T)
