"""A real gRPC server on loopback: status codes for every bad input, health, reflection, token lookups, hot-swap."""

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory_service.admin import ServiceAdmin
from memory_service.client import MemoryClient
from memory_service.compression import CompressedTokenizer
from memory_service.hashing import NgramHasher
from memory_service.server import build_server
from memory_service.spec import EngramSpec
from memory_service.store import TableStore
from memory_service.wire import encode_ids
from protos import engram_pb2 as pb
from protos import engram_pb2_grpc as pb_grpc

TOKEN = "test-token"


@pytest.fixture(scope="module")
def service(tmp_path_factory, data_dir):
    compressor = CompressedTokenizer.from_tokenizer_file(data_dir / "tokenizer_bytelevel.json")
    spec = EngramSpec(engram_vocab_size=[2003, 2003], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1, 2],
                      pad_id=1).with_compression(compressor.lookup_table, len(compressor))
    store = TableStore(tmp_path_factory.mktemp("store"), chunk_rows=256)
    server, port, servicer = build_server(store, token=TOKEN)
    server.start()
    address = f"127.0.0.1:{port}"
    ServiceAdmin(address, token=TOKEN).create_table("t", spec, compressor.lookup_table, init_std=1.0)
    yield {"address": address, "store": store, "spec": spec, "compressor": compressor, "servicer": servicer}
    server.stop(0)
    store.close()


def stub(address):
    return pb_grpc.EngramMemoryStub(grpc.insecure_channel(address))


def auth():
    return (("authorization", f"Bearer {TOKEN}"),)


def table_checksum(store):
    info = store.table_info("t")
    return {v: sum(float(store.lookup("t", l, np.arange(n), version=v)[0].astype(np.float64).sum())
                   for l, n in info.layer_rows.items()) for v in info.versions}


def test_every_bad_input_gets_its_status_code_and_changes_nothing(service):
    s = stub(service["address"])
    fp = service["spec"].fingerprint()
    n = service["store"].table_info("t").layer_rows[1]
    head = service["spec"].head_dim
    before = table_checksum(service["store"])
    good_ids = encode_ids(np.array([1, 2]))
    cases = [
        ("row id out of range", s.Lookup, pb.LookupRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=encode_ids(np.array([n]))), None, "INVALID_ARGUMENT"),
        ("negative row id", s.Lookup, pb.LookupRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=encode_ids(np.array([-1]))), None, "INVALID_ARGUMENT"),
        ("bytes not a multiple of 8", s.Lookup, pb.LookupRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=b"\x01" * 12), None, "INVALID_ARGUMENT"),
        ("unknown layer", s.Lookup, pb.LookupRequest(table="t", layer=7, spec_fingerprint=fp, row_ids=good_ids), None, "INVALID_ARGUMENT"),
        ("unknown table", s.Lookup, pb.LookupRequest(table="nope", layer=1, spec_fingerprint=fp, row_ids=good_ids), None, "NOT_FOUND"),
        ("unknown version", s.Lookup, pb.LookupRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=good_ids, version=99), None, "NOT_FOUND"),
        ("fingerprint mismatch", s.Lookup, pb.LookupRequest(table="t", layer=1, spec_fingerprint="0" * 32, row_ids=good_ids), None, "FAILED_PRECONDITION"),
        ("no fingerprint", s.Lookup, pb.LookupRequest(table="t", layer=1, row_ids=good_ids), None, "INVALID_ARGUMENT"),
        ("response over the size limit", s.Lookup, pb.LookupRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=encode_ids(np.zeros(300_000, dtype=np.int64))), None, "RESOURCE_EXHAUSTED"),
        ("message over the gRPC limit", s.Lookup, pb.LookupRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=b"\0" * (17 << 20)), None, "RESOURCE_EXHAUSTED"),
        ("write without a token", s.WriteRows, pb.WriteRowsRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=good_ids, rows=b"\0" * (2 * head * 4), dtype=pb.FLOAT32), None, "UNAUTHENTICATED"),
        ("write with a wrong token", s.WriteRows, pb.WriteRowsRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=good_ids, rows=b"\0" * (2 * head * 4), dtype=pb.FLOAT32), (("authorization", "Bearer nope"),), "PERMISSION_DENIED"),
        ("admin without a token", s.Swap, pb.SwapRequest(table="t", version=1), None, "UNAUTHENTICATED"),
        ("wrong dtype", s.WriteRows, pb.WriteRowsRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=good_ids, rows=b"\0" * (2 * head * 2), dtype=pb.FLOAT16), auth(), "INVALID_ARGUMENT"),
        ("unspecified dtype", s.WriteRows, pb.WriteRowsRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=good_ids, rows=b"\0" * (2 * head * 4)), auth(), "INVALID_ARGUMENT"),
        ("rows not matching ids (shape)", s.WriteRows, pb.WriteRowsRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=good_ids, rows=b"\0" * (3 * head * 4), dtype=pb.FLOAT32), auth(), "INVALID_ARGUMENT"),
        ("rows not a whole number of rows", s.WriteRows, pb.WriteRowsRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=good_ids, rows=b"\0" * 10, dtype=pb.FLOAT32), auth(), "INVALID_ARGUMENT"),
        ("gradient rows not matching ids", s.ApplyGradients, pb.ApplyGradientsRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=good_ids, gradients=b"\0" * (3 * head * 4), learning_rate=0.1), auth(), "INVALID_ARGUMENT"),
        ("gradients with NaN", s.ApplyGradients, pb.ApplyGradientsRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=good_ids, gradients=np.full((2, head), np.nan, np.float32).tobytes(), learning_rate=0.1), auth(), "INVALID_ARGUMENT"),
        ("duplicate gradient ids", s.ApplyGradients, pb.ApplyGradientsRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=encode_ids(np.array([3, 3])), gradients=b"\0" * (2 * head * 4), learning_rate=0.1), auth(), "INVALID_ARGUMENT"),
        ("gradient push, fingerprint mismatch", s.ApplyGradients, pb.ApplyGradientsRequest(table="t", layer=1, spec_fingerprint="x", row_ids=good_ids, gradients=b"\0" * (2 * head * 4), learning_rate=0.1), auth(), "FAILED_PRECONDITION"),
        ("swap to a missing version", s.Swap, pb.SwapRequest(table="t", version=42), auth(), "NOT_FOUND"),
        ("drop the active version", s.DropVersion, pb.DropVersionRequest(table="t", version=1), auth(), "FAILED_PRECONDITION"),
        ("bad spec json", s.CreateTable, pb.CreateTableRequest(table="u", spec_json="{\"max_ngram_size\": 1}"), auth(), "INVALID_ARGUMENT"),
        ("create an existing table", s.CreateTable, pb.CreateTableRequest(table="t", spec_json=service["spec"].to_json()), auth(), "ALREADY_EXISTS"),
        ("token ids out of vocabulary", s.LookupTokens, pb.LookupTokensRequest(table="t", layer=1, token_ids=encode_ids(np.array([10**6])), shape=[1, 1]), None, "INVALID_ARGUMENT"),
        ("token shape mismatch", s.LookupTokens, pb.LookupTokensRequest(table="t", layer=1, token_ids=encode_ids(np.array([1, 2, 3])), shape=[2, 2]), None, "INVALID_ARGUMENT"),
        ("create version without a source", s.CreateVersion, pb.CreateVersionRequest(table="t"), auth(), "INVALID_ARGUMENT"),
        ("layers: counts not summing to the ids", s.LookupLayers, pb.LookupLayersRequest(table="t", spec_fingerprint=fp, layers=[1, 2], counts=[1, 2], row_ids=good_ids), None, "INVALID_ARGUMENT"),
        ("layers: more layers than counts", s.LookupLayers, pb.LookupLayersRequest(table="t", spec_fingerprint=fp, layers=[1, 2], counts=[2], row_ids=good_ids), None, "INVALID_ARGUMENT"),
        ("layers: a negative count", s.LookupLayers, pb.LookupLayersRequest(table="t", spec_fingerprint=fp, layers=[1, 2], counts=[3, -1], row_ids=good_ids), None, "INVALID_ARGUMENT"),
        ("layers: an unknown layer", s.LookupLayers, pb.LookupLayersRequest(table="t", spec_fingerprint=fp, layers=[1, 7], counts=[1, 1], row_ids=good_ids), None, "INVALID_ARGUMENT"),
        ("layers: a row id out of one layer's range", s.LookupLayers, pb.LookupLayersRequest(table="t", spec_fingerprint=fp, layers=[1, 2], counts=[1, 1], row_ids=encode_ids(np.array([1, 10**9]))), None, "INVALID_ARGUMENT"),
        ("layers: no fingerprint", s.LookupLayers, pb.LookupLayersRequest(table="t", layers=[1], counts=[2], row_ids=good_ids), None, "INVALID_ARGUMENT"),
        ("layers: fingerprint mismatch", s.LookupLayers, pb.LookupLayersRequest(table="t", spec_fingerprint="0" * 32, layers=[1], counts=[2], row_ids=good_ids), None, "FAILED_PRECONDITION"),
        ("layers: unknown version", s.LookupLayers, pb.LookupLayersRequest(table="t", spec_fingerprint=fp, layers=[1], counts=[2], row_ids=good_ids, version=99), None, "NOT_FOUND"),
        ("layers: response over the size limit", s.LookupLayers, pb.LookupLayersRequest(table="t", spec_fingerprint=fp, layers=[1, 2], counts=[150_000, 150_000], row_ids=encode_ids(np.zeros(300_000, dtype=np.int64))), None, "RESOURCE_EXHAUSTED"),
    ]
    for name, method, request, metadata, code in cases:
        with pytest.raises(grpc.RpcError) as e:
            method(request, metadata=metadata, timeout=10)
        assert e.value.code().name == code, f"{name}: {e.value.code().name} {e.value.details()}"
        assert e.value.details(), name
    # malformed protobuf bytes
    raw = grpc.insecure_channel(service["address"]).unary_unary("/engram.v1.EngramMemory/Lookup")
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\xff\xff\xff\xff\x0f", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in e.value.details()
    # the server is up and nothing stored changed
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(service["address"]))
    assert health.Check(health_pb2.HealthCheckRequest(service="engram.v1.EngramMemory")).status == health_pb2.HealthCheckResponse.SERVING
    assert table_checksum(service["store"]) == before
    assert s.Lookup(pb.LookupRequest(table="t", layer=1, spec_fingerprint=fp, row_ids=good_ids)).version == 1


def test_client_raises_our_errors(service):
    from memory_service.errors import FailedPrecondition, NotFound, Unauthenticated

    with pytest.raises(NotFound):
        MemoryClient(service["address"], "missing")
    with pytest.raises(FailedPrecondition, match="spec fingerprint"):
        MemoryClient(service["address"], "t", spec=EngramSpec(engram_vocab_size=[11, 11], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1, 2]))
    client = MemoryClient(service["address"], "t")
    with pytest.raises(Unauthenticated):
        client.apply_gradients(1, np.array([1]), np.zeros((1, service["spec"].head_dim)), 0.1)


def test_reflection_lists_the_services(service):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    s = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(service["address"]))
    replies = list(s.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {svc.name for svc in replies[0].list_services_response.service}
    assert {"engram.v1.EngramMemory", "grpc.health.v1.Health"} <= names


def test_token_lookups_equal_the_stored_rows_of_the_hashed_ids(service):
    spec, compressor, store = service["spec"], service["compressor"], service["store"]
    hasher = NgramHasher.from_compressor(spec, compressor)
    client = MemoryClient(service["address"], "t")
    tokens = np.array([[5, 77, 300, 5, 77, 999], [1, 2, 3, 4, 5, 6]])
    for layer in spec.layer_ids:
        rows, row_ids, version = client.lookup_tokens(layer, tokens)
        expected_ids = hasher.row_ids(compressor(tokens))[layer]
        np.testing.assert_array_equal(row_ids, expected_ids)
        assert rows.shape == (2, 6, spec.num_heads, spec.head_dim)
        np.testing.assert_array_equal(rows.reshape(-1, spec.head_dim), store.lookup("t", layer, expected_ids.reshape(-1))[0])
        compressed, _, _ = client.lookup_tokens(layer, compressor(tokens), compressed=True)
        np.testing.assert_array_equal(compressed, rows)


def test_batches_split_dedup_and_match_the_store(service):
    client = MemoryClient(service["address"], "t", max_payload_bytes=4096)  # many parts per batch
    n = client.num_rows(2)
    ids = np.random.default_rng(0).integers(0, n, 5000)
    rows, version = client.lookup_raw(2, ids)
    np.testing.assert_array_equal(rows, service["store"].lookup("t", 2, ids)[0])
    unique_rows, inverse, _ = client.lookup_batch(2, ids)
    np.testing.assert_array_equal(unique_rows[inverse], rows)
    assert unique_rows.shape[0] == np.unique(ids).size


def test_swap_under_concurrent_lookups(service, tmp_path):
    """Readers loop multi-part batches while versions are swapped and rolled back: no failure, no mixed batch."""
    address = service["address"]
    admin = ServiceAdmin(address, token=TOKEN)
    writer = MemoryClient(address, "t", token=TOKEN)
    head = service["spec"].head_dim
    sizes = dict(writer.layer_rows)
    versions = []
    for marker in (10.0, 20.0, 30.0):
        v = admin.create_version("t")
        for layer, n in sizes.items():
            writer.write_rows(layer, np.arange(n), np.full((n, head), marker + v, np.float32), version=v)
        versions.append(v)
    admin.swap("t", versions[0])
    failures, mixed, served = [], [], []
    stop = threading.Event()

    def reader(seed):
        client = MemoryClient(address, "t", max_payload_bytes=8192)  # a batch spans many messages
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            ids = rng.integers(0, sizes[1], 3000)
            try:
                rows, version = client.lookup_raw(1, ids)
            except Exception as e:  # noqa: BLE001 - any failure counts
                failures.append(repr(e))
                continue
            # every row must be exactly what the version the reply names holds
            if not np.array_equal(rows, service["store"].lookup("t", 1, ids, version=version)[0]):
                mixed.append(version)
            served.append(version)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for i in range(12):
        admin.swap("t", versions[i % 3]) if i % 4 else admin.rollback("t")  # rollbacks may return to version 1 too
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join()
    assert not failures and not mixed
    assert len(set(served)) >= 2 and len(served) > 10
    admin.swap("t", 1)


def test_tls(tmp_path):
    import shutil
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    store = TableStore(tmp_path / "s")
    server, port, _ = build_server(store, token=TOKEN, tls_cert=str(cert), tls_key=str(key))
    server.start()
    try:
        spec = EngramSpec(engram_vocab_size=[1009], max_ngram_size=2, n_embed_per_ngram=8, n_head_per_ngram=1, layer_ids=[0])
        ServiceAdmin(f"127.0.0.1:{port}", token=TOKEN, tls_root_cert=cert.read_bytes()).create_table("t", spec)
        client = MemoryClient(f"127.0.0.1:{port}", "t", tls_root_cert=cert.read_bytes())
        np.testing.assert_array_equal(client.lookup(0, np.array([1, 2])), store.lookup("t", 0, np.array([1, 2]))[0])
        plain = grpc.insecure_channel(f"127.0.0.1:{port}")
        with pytest.raises(grpc.RpcError):  # a plaintext client cannot talk to a TLS server
            pb_grpc.EngramMemoryStub(plain).ListTables(pb.ListTablesRequest(), timeout=3)
    finally:
        server.stop(0)
        store.close()


def test_two_shards_split_batches_and_updates(tmp_path):
    from memory_service.local_table import LocalTable
    from memory_service.shard_map import ShardMap
    from memory_service.table_meta import layer_rows_for_spec

    spec = EngramSpec(engram_vocab_size=[3001, 3001], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1, 2])
    servers, addresses, stores = [], [], []
    for i in range(2):
        store = TableStore(tmp_path / f"s{i}", chunk_rows=256)
        server, port, _ = build_server(store)
        server.start()
        servers.append(server), stores.append(store), addresses.append(f"127.0.0.1:{port}")
    shard_map = ShardMap.even(addresses, layer_rows_for_spec(spec), 256, epoch=1)
    for i, store in enumerate(stores):  # what a pool does: ownership first, then only owned chunks exist
        store.set_shard_state(1, {"t": shard_map.owned(i)})
        store.create_table("t", spec)
    try:
        client = MemoryClient(shard_map, "t", max_payload_bytes=4096)
        local = LocalTable(spec, layer_rows_for_spec(spec))
        rng = np.random.default_rng(0)
        for _ in range(3):
            ids = np.unique(rng.integers(0, local.num_rows(2), 2000))
            grads = rng.standard_normal((ids.size, spec.head_dim)).astype(np.float32)
            client.apply_gradients(2, ids, grads, 0.05)
            local.apply_gradients(2, ids, grads, 0.05)
        batch = rng.integers(0, local.num_rows(2), 6000)
        np.testing.assert_array_equal(client.lookup(2, batch), local.lookup(2, batch))
        unique_rows, inverse, _ = client.lookup_batch(2, batch)  # each message sent as soon as its ids are sorted
        np.testing.assert_array_equal(unique_rows[inverse], local.lookup(2, batch))
        served = [s.counters["rows_served"] for s in stores]
        assert all(n > 0 for n in served)  # both shards answered parts of the batch
        cut = shard_map.bounds[2][1]
        updated = [s.optimizer_state("t", 2, np.arange(local.num_rows(2)))["step"] for s in stores]
        assert updated[0][cut:].sum() == 0 and updated[1][:cut].sum() == 0  # each shard updated only its range
        # both layers in one call per shard (several under a small payload limit): each layer's rows, in order
        parts = {layer: np.unique(rng.integers(0, local.num_rows(layer), 700)) for layer in (1, 2)}
        before = [s.counters["lookups"] for s in stores]
        rows, version = client.lookup_layers_async(parts).result()
        assert version == 1 and sorted(rows) == [1, 2]
        for layer, ids in parts.items():
            np.testing.assert_array_equal(rows[layer], local.lookup(layer, ids))
        per_message = 4096 // (spec.head_dim * 4)
        calls = [s.counters["lookups"] - b for s, b in zip(stores, before)]
        assert all(c > 0 for c in calls) and sum(calls) < sum(-(-ids.size // per_message) for ids in parts.values()) + 2
        # a swap that reached one shard and not yet the other: the older shard's pieces are fetched again
        for store in stores:
            store.create_version("t", init_std=1.0, init_seed=7)
        stores[0].swap("t", 2)
        second = MemoryClient(shard_map, "t")
        rows, version = second.lookup_layers_async(parts).result()
        assert version == 2
        for layer, ids in parts.items():
            expected = np.concatenate([s.lookup("t", layer, ids[shard_map.shard_of(layer, ids) == i], version=2)[0]
                                       for i, s in enumerate(stores)])
            np.testing.assert_array_equal(rows[layer], expected)
        stores[1].swap("t", 2)
        # a client whose map sends rows to the wrong shard is told its map is stale
        from memory_service.errors import FailedPrecondition

        wrong = MemoryClient(ShardMap(addresses[::-1], shard_map.bounds, epoch=1), "t")
        with pytest.raises(FailedPrecondition, match="stale shard map"):
            wrong.lookup(2, np.array([0, local.num_rows(2) - 1]))
        for i, store in enumerate(stores):
            store.set_shard_state(2, {"t": shard_map.owned(i)})
        with pytest.raises(FailedPrecondition, match="request epoch 1, shard epoch 2"):
            client.lookup(2, np.array([5]))
    finally:
        for server, store in zip(servers, stores):
            server.stop(0)
            store.close()


def test_prometheus_metrics_follow_the_service_counters(service):
    import re
    import urllib.error
    import urllib.request

    from memory_service.metrics import MetricsServer

    metrics = MetricsServer(service["servicer"].counters, labels={"shard": "0"})
    url = f"http://127.0.0.1:{metrics.port}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return reply.read().decode()

    def value(text: str, series: str) -> float:
        match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
        assert match, f"{series} missing from:\n{text}"
        return float(match.group(1))

    try:
        before = scrape()
        MemoryClient(service["address"], "t").lookup_raw(1, np.arange(100))
        after = scrape()
        served = 'engram_rows_served_total{shard="0"}'
        assert value(after, served) == value(before, served) + 100
        assert "# TYPE engram_rows_served_total counter" in after
        assert "# TYPE engram_used_bytes gauge" in after
        assert value(after, 'engram_rpc_handler_seconds_total{rpc="Lookup",shard="0"}') > 0
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/other", timeout=10)
    finally:
        metrics.stop()
