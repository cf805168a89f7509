"""Hardened edges of a real `engram serve`: each case was once a crash, a wrong code, a leak or a silent default."""

import hashlib
import json
import logging
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest

from memory_service.admin import ServiceAdmin
from memory_service.client import MemoryClient
from memory_service.errors import FailedPrecondition, InvalidArgument, StaleShardMap, error_for
from memory_service.spec import EngramSpec
from memory_service.wire import MAX_MESSAGE_BYTES, MAX_PAYLOAD_BYTES, encode_ids
from orchestration.local_server import start_server
from protos import engram_pb2 as pb
from protos import engram_pb2_grpc as pb_grpc

TOKEN = "edge-token"
SPEC = EngramSpec(engram_vocab_size=[40009], max_ngram_size=2, n_embed_per_ngram=32, n_head_per_ngram=1, layer_ids=[1])
SPEC16 = EngramSpec(engram_vocab_size=[2003], max_ngram_size=2, n_embed_per_ngram=16, n_head_per_ngram=1, layer_ids=[1],
                    dtype="float16")
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    proc, address = start_server(tmp_path_factory.mktemp("edges") / "store", token=TOKEN)
    admin = ServiceAdmin(address, token=TOKEN)
    admin.create_table("t", SPEC, init_std=1.0)
    admin.create_table("h", SPEC16, init_std=1.0)
    yield {"address": address, "admin": admin, "stub": pb_grpc.EngramMemoryStub(grpc.insecure_channel(address))}
    admin.close()
    proc.terminate()
    proc.wait(timeout=30)


def content(admin: ServiceAdmin) -> str:
    """A digest of everything stored: every table's metadata and every version's rows."""
    digest = hashlib.sha256()
    for info in admin.list_tables():
        digest.update(repr((info.name, info.active_version, [v.version for v in info.versions], info.swap_history)).encode())
        for version in info.versions:
            for layer in sorted(info.layer_rows):
                digest.update(admin.export_rows(info.name, layer, version.version).tobytes())
    return digest.hexdigest()


def refused(call, request, code: str, metadata=AUTH) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(request, metadata=metadata, timeout=30)
    assert e.value.code().name == code, f"{e.value.code().name}: {e.value.details()}"
    return e.value


def test_an_empty_read_range_is_ok(served):
    reply = served["stub"].ReadRange(pb.ReadRangeRequest(table="t", layer=1, start=7, stop=7), timeout=30)
    assert reply.rows == b"" and list(reply.shape) == [0, SPEC.head_dim] and reply.version == 1


def test_long_request_ids_are_refused(served):
    fp = SPEC.fingerprint()
    before = content(served["admin"])
    rows = np.ones((1, SPEC.head_dim), np.float32).tobytes()
    for size in (129, 508, 4000):
        refused(served["stub"].WriteRows, pb.WriteRowsRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=encode_ids([3]),
                                                              rows=rows, dtype=pb.FLOAT32, request_id="r" * size),
                "INVALID_ARGUMENT")
        refused(served["stub"].ApplyGradients, pb.ApplyGradientsRequest(
            table="t", layer=1, spec_fingerprint=fp, row_ids=encode_ids([3]), gradients=rows, learning_rate=0.1,
            request_id="r" * size), "INVALID_ARGUMENT")
    assert content(served["admin"]) == before


@pytest.mark.parametrize("name,spec_json,chunk_rows", [
    ("deeply nested", "[" * 30_000 + "]" * 30_000, 0),
    ("huge rows", SPEC.to_json().replace('"n_embed_per_ngram": 32', f'"n_embed_per_ngram": {2**30}'), 0),
    ("huge chunks", SPEC.to_json(), 2**40),
    ("tiny chunks", SPEC.to_json(), 63),
    ("huge layer id", SPEC.to_json().replace('"layer_ids": [1]', f'"layer_ids": [{2**40}]'), 0),
    ("negative seed", SPEC.to_json().replace('"seed": 0', '"seed": -5'), 0),
    ("not an object", "[1, 2]", 0),
    ("oversized", " " * (1 << 20) + "{}", 0),
    ("table bigger than the disk", SPEC.to_json().replace("[40009]", f"[{2**40}]"), 0),
])
def test_impossible_tables_are_refused(served, name, spec_json, chunk_rows):
    before = content(served["admin"])
    error = refused(served["stub"].CreateTable, pb.CreateTableRequest(table=f"x{len(name)}", spec_json=spec_json,
                                                                      chunk_rows=chunk_rows), "INVALID_ARGUMENT"
                    if "disk" not in name else "RESOURCE_EXHAUSTED")
    assert len(error.details()) < 3000, name
    if name == "tiny chunks":
        assert "at least 64 rows" in error.details()
    assert content(served["admin"]) == before, name


def test_non_finite_values_are_refused_and_change_nothing(served):
    admin, stub = served["admin"], served["stub"]
    near_max = np.full((2, SPEC16.head_dim), 65000, np.float16)  # fp16 rows one step from overflowing
    MemoryClient(served["address"], "h", token=TOKEN).write_rows(1, np.array([3, 4]), near_max)
    before = content(admin)
    fp, fp16 = SPEC.fingerprint(), SPEC16.fingerprint()
    head = SPEC.head_dim
    for std in (float("nan"), float("inf"), -1.0):
        refused(stub.CreateTable, pb.CreateTableRequest(table="nan", spec_json=SPEC.to_json(), init_std=std), "INVALID_ARGUMENT")
        refused(stub.CreateVersion, pb.CreateVersionRequest(table="t", init_std=std), "INVALID_ARGUMENT")
    for value in (np.nan, np.inf, -np.inf):
        rows = np.full((2, head), value, np.float32)
        refused(stub.WriteRows, pb.WriteRowsRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=encode_ids([1, 2]),
                                                    rows=rows.tobytes(), dtype=pb.FLOAT32), "INVALID_ARGUMENT")
    ones = np.ones((2, head), np.float32).tobytes()
    pushes = [("t", fp, ones, 3.4e38, "learning rate must be", "a learning rate that sends the row to -inf"),
              ("t", fp, ones, float("nan"), "learning rate must be", "no learning rate at all"),
              ("h", fp16, np.ones((2, SPEC16.head_dim), np.float32).tobytes(), 1e5, "learning rate must be", "fp16's range"),
              ("h", fp16, (-np.ones((2, SPEC16.head_dim), np.float32)).tobytes(), 1000.0, "non-finite", "a row past 65504"),
              ("t", fp, np.full((2, head), 1e20, np.float32).tobytes(), 0.01, "non-finite", "a gradient whose square overflows v")]
    for table, fingerprint, grads, lr, words, why in pushes:
        ids = [3, 4] if table == "h" else [1, 2]
        error = refused(stub.ApplyGradients, pb.ApplyGradientsRequest(table=table, layer=1, spec_fingerprint=fingerprint,
                                                                      row_ids=encode_ids(ids), gradients=grads,
                                                                      learning_rate=lr), "INVALID_ARGUMENT")
        assert words in error.details(), why
    assert content(admin) == before
    client = MemoryClient(served["address"], "t", token=TOKEN)  # a sane push still works, and the rows stay finite
    client.apply_gradients(1, np.array([1, 2]), np.full((2, head), 1e3, np.float32), lr=0.01)
    assert np.isfinite(client.lookup(1, np.array([1, 2]))).all()
    with pytest.raises(InvalidArgument) as e:  # the client gets the reason, not just the code
        client.apply_gradients(1, np.array([1, 2]), np.full((2, head), 1e20, np.float32), lr=0.01)
    assert e.value.reason == "NON_FINITE_UPDATE"


def test_error_messages_do_not_echo_huge_request_strings(served):
    name = "n" * 20_000
    error = refused(served["stub"].Lookup, pb.LookupRequest(table=name, layer=1, spec_fingerprint="f" * 20_000,
                                                            row_ids=encode_ids([1])), "NOT_FOUND", metadata=None)
    assert len(error.details()) < 500
    refused(served["stub"].GetTableInfo, pb.GetTableInfoRequest(table=name), "NOT_FOUND", metadata=None)
    refused(served["stub"].Swap, pb.SwapRequest(table=name, version=1), "NOT_FOUND")


def test_full_size_replies_fit_a_default_client(served):
    """A client with gRPC's default limits (4 MiB received) reads the largest Lookup and Echo replies."""
    plain = pb_grpc.EngramMemoryStub(grpc.insecure_channel(served["address"]))  # no channel options at all
    per_message = MAX_PAYLOAD_BYTES // SPEC.row_nbytes
    ids = np.arange(per_message, dtype=np.int64)
    reply = plain.Lookup(pb.LookupRequest(table="t", layer=1, spec_fingerprint=SPEC.fingerprint(), row_ids=encode_ids(ids)),
                         timeout=30)
    assert len(reply.rows) == per_message * SPEC.row_nbytes and reply.ByteSize() <= MAX_MESSAGE_BYTES
    assert len(plain.Echo(pb.EchoRequest(size=MAX_PAYLOAD_BYTES), timeout=30).payload) == MAX_PAYLOAD_BYTES
    refused(plain.Echo, pb.EchoRequest(size=MAX_PAYLOAD_BYTES + 1), "RESOURCE_EXHAUSTED", metadata=None)
    big = np.arange(per_message + 1, dtype=np.int64)
    refused(plain.Lookup, pb.LookupRequest(table="t", layer=1, spec_fingerprint=SPEC.fingerprint(), row_ids=encode_ids(big)),
            "RESOURCE_EXHAUSTED", metadata=None)
    client = MemoryClient(served["address"], "t")  # our client splits a bigger batch into messages that fit
    rows, _ = client.lookup_raw(1, np.arange(3 * per_message) % client.num_rows(1))
    assert rows.shape == (3 * per_message, SPEC.head_dim)


def test_a_shard_epoch_sent_to_a_standalone_server_is_a_precondition_failure(served):
    request = pb.LookupRequest(table="t", layer=1, spec_fingerprint=SPEC.fingerprint(), row_ids=encode_ids([1]), shard_epoch=3)
    error = refused(served["stub"].Lookup, request, "FAILED_PRECONDITION", metadata=None)
    assert "not a shard" in error.details()


def test_reasons_decide_the_client_exception_not_the_words():
    assert type(error_for("FAILED_PRECONDITION", "STALE_SHARD_MAP", "anything at all")) is StaleShardMap
    assert type(error_for("FAILED_PRECONDITION", "SPEC_MISMATCH", "stale shard map")) is FailedPrecondition
    assert error_for("UNKNOWN", "", "boom").code == "UNKNOWN"


def test_unknown_table_names_do_not_grow_the_server(tmp_path):
    from memory_service.server import build_server
    from memory_service.store import TableStore

    store = TableStore(tmp_path / "s")
    server, port, servicer = build_server(store)
    server.start()
    try:
        store.create_table("t", SPEC)
        stub = pb_grpc.EngramMemoryStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        for i in range(2000):
            with pytest.raises(grpc.RpcError):
                stub.Lookup(pb.LookupRequest(table=f"missing-{i}", layer=1, spec_fingerprint="x", row_ids=encode_ids([1])))
            with pytest.raises(grpc.RpcError):
                stub.LookupTokens(pb.LookupTokensRequest(table=f"missing-{i}", layer=1, token_ids=encode_ids([1])))
        snapshot = store.snapshots.acquire()
        try:
            assert len(snapshot.metas) <= 1  # only tables that exist are kept
        finally:
            store.snapshots.release(snapshot)
        assert len(servicer._hashers) <= 16
    finally:
        server.stop(0)
        store.close()


def test_a_bug_of_ours_is_internal_and_logged(tmp_path, caplog):
    from memory_service.server import build_server
    from memory_service.store import TableStore

    store = TableStore(tmp_path / "s")
    server, port, _ = build_server(store)
    server.start()
    try:
        store.create_table("t", SPEC)

        def broken(*args, **kwargs):
            raise KeyError("a bug in the store")

        store.table_info = broken
        stub = pb_grpc.EngramMemoryStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        with caplog.at_level(logging.ERROR, logger="engram.server"):
            error = refused(stub.GetTableInfo, pb.GetTableInfoRequest(table="t"), "INTERNAL", metadata=None)
        assert "KeyError" in error.details()
        assert any(r.exc_info and "a bug in the store" in str(r.exc_info[1]) for r in caplog.records)
    finally:
        server.stop(0)
        store.close()


def _engram(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "ENGRAM_TOKEN": ""})


def test_serving_to_the_network_without_a_token_is_refused(tmp_path):
    result = _engram("serve", "--path", tmp_path / "s", "--host", "0.0.0.0", "--port", 0)
    assert result.returncode == 2 and "--allow-unauthenticated" in result.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was opened
    proc, _ = start_server(tmp_path / "s2", extra_args=("--host", "0.0.0.0", "--allow-unauthenticated"))
    proc.terminate()
    assert proc.wait(timeout=30) == 0  # asked for explicitly, it serves


def test_bench_push_uses_the_rows_it_is_given():
    result = _engram("bench", "push", "--rows", 300_000, "--baseline-rows", 40_000, "--dim", 16, "--batch", 2000,
                     "--repeats", 2, "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    rows = figures["table_rows"]
    assert 300_000 <= rows["target"] < 300_100 and 40_000 <= rows["baseline"] < 40_100
    folds = {name: figures["compactions"][name]["folds"] for name in rows}
    assert figures["pushes"] >= 2 and folds["target"] >= 2 and folds["baseline"] >= 1  # a whole cycle of the bigger table
    assert figures["cost_ratio"] == pytest.approx(figures["mean_ms"]["target"] / figures["mean_ms"]["baseline"], rel=1e-9)
    assert figures["disk_bytes_per_row"]["baseline"] > figures["row_plus_record_bytes"] == 16 * 2 + 16 * 8 + 8
    assert figures["lookups"]["alone"]["count"] > 0 and figures["lookups"]["alone"]["p99_ms"] > 0


def test_the_dead_commands_are_gone():
    assert "invalid choice: 'pool-table'" in _engram("pool-table", "swap").stderr


def test_bench_generate_reports_every_mode_at_every_concurrency(tmp_path):
    """A small run of the benchmark (its own local Ray cluster and pool): the JSON the issue names, a plot."""
    result = _engram("bench", "generate", "--concurrency", "1,2", "--new-tokens", 3, "--repeats", 1, "--cache-mb", 4,
                     "--json", "--plot", tmp_path / "gen.png", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)["results"]
    assert [(r["mode"], r["concurrency"]) for r in rows] == [
        (m, c) for c in (1, 2) for m in ("in_process", "pool", "pool_prefetch", "pool_prefetch_cache")]
    for r in rows:
        assert set(r) == {"mode", "concurrency", "tokens_per_s", "ratio", "cache_hit_rate", "prefetch_wait_ms",
                          "worker_cpu_ms", "shard_cpu_ms"}
        assert r["tokens_per_s"] > 0 and r["prefetch_wait_ms"] >= 0 and r["worker_cpu_ms"] > 0 and r["shard_cpu_ms"] >= 0
        assert (r["cache_hit_rate"] is None) == (r["mode"] != "pool_prefetch_cache")
    assert all(r["ratio"] == 1.0 for r in rows if r["mode"] == "in_process")
    assert (tmp_path / "gen.png").stat().st_size > 1000
