"""Bulk loads into inactive versions and streaming imports (real LMDB, real gRPC on loopback)."""

import threading
import tracemalloc

import numpy as np
import pytest

from memory_service.admin import ServiceAdmin
from memory_service.errors import FailedPrecondition, InvalidArgument
from memory_service.server import build_server
from memory_service.spec import EngramSpec
from memory_service.store import TableStore
from memory_service.table_io import read_table_file

SPEC = EngramSpec(engram_vocab_size=[20011], max_ngram_size=2, n_embed_per_ngram=16, n_head_per_ngram=1, layer_ids=[0])
TOKEN = "bulk"


def test_a_bulk_load_writes_whole_chunks_of_an_inactive_version(tmp_path):
    store = TableStore(tmp_path / "s", chunk_rows=512, max_delta_rows=2000)
    store.create_table("t", SPEC, init_std=1.0)
    num_rows = store.table_info("t").layer_rows[0]
    version = store.create_version("t", copy_of=0)
    pushed = np.arange(0, 3000, 2)  # pushes to the new version before the load: they must not lie over it
    store.apply_gradients("t", 0, pushed, np.ones((pushed.size, SPEC.head_dim), np.float32), lr=0.1, version=version)
    rows = np.random.default_rng(0).standard_normal((num_rows, SPEC.head_dim)).astype(np.float32)
    active_before, _ = store.lookup("t", 0, np.arange(num_rows))
    for start in range(0, num_rows, 4096):
        assert store.load_rows("t", 0, start, rows[start:start + 4096], version) == min(4096, num_rows - start)
    np.testing.assert_array_equal(store.lookup("t", 0, np.arange(num_rows), version=version)[0], rows)
    np.testing.assert_array_equal(store.lookup("t", 0, np.arange(num_rows))[0], active_before)  # the active one: untouched
    assert store.optimizer_state("t", 0, pushed, version=version)["step"].tolist() == [1] * pushed.size  # state stays
    store.close()
    reopened = TableStore(tmp_path / "s", chunk_rows=512)
    np.testing.assert_array_equal(reopened.lookup("t", 0, np.arange(num_rows), version=version)[0], rows)
    reopened.close()


def test_bad_bulk_loads_are_refused_and_change_nothing(tmp_path):
    store = TableStore(tmp_path / "s", chunk_rows=512)
    store.create_table("t", SPEC, init_std=1.0)
    version = store.create_version("t", copy_of=0)
    before, _ = store.lookup("t", 0, np.arange(2048), version=version)
    good = np.zeros((512, SPEC.head_dim), np.float32)
    with pytest.raises(FailedPrecondition, match="active"):
        store.load_rows("t", 0, 0, good, 1)
    with pytest.raises(InvalidArgument, match="version"):
        store.load_rows("t", 0, 0, good, 99)
    with pytest.raises(InvalidArgument, match="whole chunks"):
        store.load_rows("t", 0, 100, good, version)
    with pytest.raises(InvalidArgument, match="whole chunks"):
        store.load_rows("t", 0, 0, good[:300], version)
    with pytest.raises(InvalidArgument, match="float32"):
        store.load_rows("t", 0, 0, good.astype(np.float16), version)
    with pytest.raises(InvalidArgument, match=r"\[n, 16\]"):
        store.load_rows("t", 0, 0, good[:, :8], version)
    bad = good.copy()
    bad[3, 3] = np.nan
    with pytest.raises(InvalidArgument, match="NaN"):
        store.load_rows("t", 0, 0, bad, version)
    np.testing.assert_array_equal(store.lookup("t", 0, np.arange(2048), version=version)[0], before)
    store.close()


def test_lookups_of_a_version_being_loaded_see_old_or_new_chunks_never_freed_pages(tmp_path):
    store = TableStore(tmp_path / "s", chunk_rows=256)
    store.create_table("t", SPEC, init_std=0.0)
    num_rows = store.table_info("t").layer_rows[0]
    version = store.create_version("t", copy_of=0)
    stop, errors = threading.Event(), []

    def read():
        rng = np.random.default_rng(1)
        while not stop.is_set():
            ids = np.unique(rng.integers(0, num_rows, 2000))
            rows, _ = store.lookup("t", 0, ids, version=version)
            ok = (rows == 0).all(axis=1) | (rows == (ids % 97 + 1)[:, None]).all(axis=1)  # old zeros or the new value
            if not ok.all():
                errors.append(ids[~ok][:5])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        rows = np.repeat((np.arange(num_rows) % 97 + 1).astype(np.float32)[:, None], SPEC.head_dim, axis=1)
        for _ in range(3):
            for start in range(0, num_rows, 1024):
                store.load_rows("t", 0, start, rows[start:start + 1024], version)
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[:3]
    store.close()


def test_an_import_streams_a_file_in_bounded_memory(tmp_path, monkeypatch):
    """A safetensors file many times the import block goes in a block at a time, bit for bit, over gRPC."""
    from safetensors.numpy import save_file

    from memory_service.admin import table_admin

    block_rows = 1 << 13
    monkeypatch.setattr(table_admin, "IMPORT_BLOCK_ROWS", block_rows)  # 1 MiB blocks of a 77 MB file

    spec = EngramSpec(engram_vocab_size=[600_011], max_ngram_size=2, n_embed_per_ngram=32, n_head_per_ngram=1,
                      layer_ids=[0])
    store = TableStore(tmp_path / "store", chunk_rows=1024)
    server, port, _ = build_server(store, token=TOKEN)
    server.start()
    admin = ServiceAdmin(f"127.0.0.1:{port}", token=TOKEN)
    try:
        admin.create_table("t", spec, init_std=0.0)
        num_rows = admin.info("t").layer_rows[0]
        rows = np.random.default_rng(2).standard_normal((num_rows, spec.head_dim)).astype(np.float32)  # 77 MB
        save_file({"multi_head_embedding.embedding.weight": rows}, str(tmp_path / "t.safetensors"))
        source = read_table_file(tmp_path / "t.safetensors")
        del rows
        landed = []
        version = admin.create_version("t", copy_of=0)
        tracemalloc.start()
        admin.import_rows("t", 0, source, version=version, progress=landed.append)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert sum(landed) == num_rows and len(landed) > 10
        # never the whole file at once: blocks in flight (client and server, here one process) and their copies
        block_bytes = block_rows * spec.head_dim * 4
        assert peak < 12 * block_bytes < num_rows * spec.head_dim * 4 / 6, f"peak {peak / 2**20:.0f} MiB"
        assert store.counters["writes"] == 0  # whole chunks, not row writes
        ids = np.random.default_rng(3).integers(0, num_rows, 5000)
        client = admin.data_client("t", version)
        np.testing.assert_array_equal(client.lookup_raw(0, np.unique(ids))[0], source[:][np.unique(ids)])
        client.close()
    finally:
        admin.close()
        server.stop(0)
        store.close()


def test_a_load_rows_stream_is_checked_whole_and_written_in_shared_commits(tmp_path):
    """LoadRows is a client stream: its messages are checked together and committed together; a bad message (or one
    naming another version) fails the call and writes none of the messages checked with it."""
    import grpc

    from memory_service.wire import dtype_enum
    from protos import engram_pb2 as pb
    from protos import engram_pb2_grpc as pb_grpc

    store = TableStore(tmp_path / "s", chunk_rows=512)
    server, port, _ = build_server(store, token=TOKEN)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        store.create_table("t", SPEC, init_std=0.0)
        info = store.table_info("t")
        v2, v3 = store.create_version("t", copy_of=0), store.create_version("t", copy_of=0)
        rows = np.random.default_rng(4).standard_normal((4096, SPEC.head_dim)).astype(np.float32)

        def message(start, block, version=v2):
            return pb.LoadRowsRequest(table="t", layer=0, spec_fingerprint=info.spec.fingerprint(), version=version,
                                      start_row=start, rows=block.tobytes(), dtype=dtype_enum(np.float32))

        stub = pb_grpc.EngramMemoryStub(channel)
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        commits = store.dbs.env.info()["last_txnid"]
        reply = stub.LoadRows(iter([message(s, rows[s:s + 1024]) for s in range(0, 4096, 1024)]), metadata=metadata)
        assert (reply.version, reply.rows_written) == (v2, 4096)
        assert store.dbs.env.info()["last_txnid"] - commits <= 2  # four messages, one commit (and a settle's, if any)
        np.testing.assert_array_equal(store.lookup("t", 0, np.arange(4096), version=v2)[0], rows)

        nan = rows[:1024].copy()
        nan[5, 5] = np.nan
        for bad in ([message(0, rows[:1024] + 1, v3), message(1024, nan, v3)],                # NaN in the second
                    [message(0, rows[:1024] + 1, v3), message(1024, rows[1024:2048], v2)]):   # two versions
            with pytest.raises(grpc.RpcError) as refused:
                stub.LoadRows(iter(bad), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            np.testing.assert_array_equal(store.lookup("t", 0, np.arange(1024), version=v3)[0], 0)  # nothing written
        with pytest.raises(grpc.RpcError) as malformed:
            raw = channel.stream_unary("/engram.v1.EngramMemory/LoadRows")  # bytes as they are
            raw(iter([message(0, rows[:1024], v3).SerializeToString()[:-7]]), metadata=metadata)
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as unauthenticated:
            stub.LoadRows(iter([message(0, rows[:1024], v3)]))
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        channel.close()
        server.stop(None)
        store.close()


def test_a_npy_table_is_read_a_block_at_a_time_and_a_short_file_is_named(tmp_path):
    rows = np.random.default_rng(5).standard_normal((5000, 24)).astype(np.float16)
    np.save(tmp_path / "t.npy", rows)
    source = read_table_file(tmp_path / "t.npy")
    assert (source.shape, source.dtype) == (rows.shape, rows.dtype) and not isinstance(source, np.ndarray)
    np.testing.assert_array_equal(source[1234:4321], rows[1234:4321])
    np.testing.assert_array_equal(np.asarray(source), rows)
    np.save(tmp_path / "f.npy", np.asfortranarray(rows))  # another layout: memory-mapped as before
    np.testing.assert_array_equal(read_table_file(tmp_path / "f.npy")[10:20], rows[10:20])
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(data[:-1000])
    with pytest.raises(InvalidArgument, match="shorter than the 5,000 x 24 float16 rows"):
        read_table_file(tmp_path / "short.npy")
