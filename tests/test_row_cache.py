"""The worker-side row cache: bounded, Zipf-friendly, version-keyed, never staler than its bound; and the engine's
requests each on one table version through a real memory service (gRPC on loopback, LMDB store)."""

import time

import numpy as np
import pytest
from test_engine import alone, mixed_requests, tiny_model

from memory_service import native
from memory_service.admin import ServiceAdmin
from memory_service.client import MemoryClient
from memory_service.hashing import NgramHasher
from memory_service.server import build_server
from memory_service.store import TableStore
from model_worker.engine import DecodingEngine
from model_worker.engram_rows import EngramRowFetcher
from model_worker.generate import Generator
from model_worker.row_cache import CachedTables, RowCache

TOKEN = "tok"


def test_the_cache_keeps_hot_rows_within_its_budget_and_serves_only_fresh_rows_of_the_asked_version():
    width, budget = 16, 1 << 20
    cache = RowCache(budget, layers=[1, 3], width=width, dtype=np.float32, max_staleness_s=0.3)
    assert cache.nbytes <= budget
    rng = np.random.default_rng(0)
    universe = 1_000_000
    hot = np.unique(rng.zipf(1.1, 200_000) % universe)[:2000]  # ids a Zipf stream repeats
    rows = np.broadcast_to(np.arange(universe, dtype=np.float32)[:, None], (universe, width))  # row i holds i
    for _ in range(30):  # Zipf traffic: hot ids again and again, among cold ones
        ids = np.unique(np.concatenate([rng.choice(hot, 500), rng.integers(0, universe, 500)]))
        out = np.empty((ids.size, width), np.float32)
        hit = cache.get(1, ids, 7, out)
        np.testing.assert_array_equal(out[hit], rows[ids[hit]])  # a hit is the row that was put
        cache.put(1, ids[~hit], rows[ids[~hit]], 7)
    assert cache.stats()["hit_rate"] > 0.3  # half of each batch is cold: about 0.4 at best over 30 batches
    ids = np.sort(hot[:200])
    out = np.empty((ids.size, width), np.float32)
    assert cache.get(1, ids, 7, out).mean() > 0.9  # the hot rows stayed
    assert not cache.get(1, ids, 8, out).any()  # another version: none of them
    assert not cache.get(3, ids, 7, out).any()  # another layer: none of them
    time.sleep(0.35)
    assert not cache.get(1, ids, 7, out).any()  # older than the bound: none served
    with pytest.raises(ValueError):
        RowCache(-1, [1], 16, np.float16)


@pytest.mark.skipif(not native.available(), reason="native kernels not built (no C compiler?)")
def test_the_native_cache_kernels_decide_exactly_as_the_numpy_path(monkeypatch):
    """Random gets and puts on a cache of few sets (ids of one batch share sets, hot ways fill up, versions and
    stamps differ): every hit mask, row copied and array of the cache is the same either way."""
    caches = {path: RowCache(40 * 4 * (16 * 2 + 20), [1], 16, np.float16, max_staleness_s=5.0) for path in ("c", "numpy")}
    assert caches["c"].layers[1].num_sets == 40
    rng = np.random.default_rng(1)
    clock = [0.0]
    for cache in caches.values():
        cache.clock = lambda: clock[0]
    for step in range(400):
        clock[0] += float(rng.uniform(0, 0.2))
        ids = np.unique(rng.integers(0, 300, int(rng.integers(1, 120))))
        version = int(rng.integers(1, 3))
        fetched_at = clock[0] - float(rng.uniform(0, 1)) if step % 2 else None  # the lookup's send time, or now
        results = {}
        for path, cache in caches.items():
            with monkeypatch.context() as m:
                if path == "numpy":
                    m.setattr(native, "KERNELS", None)
                out = np.zeros((ids.size, 16), np.float16)
                hit = cache.get(1, ids, version, out)
                rows = (ids[~hit, None] * 10 + step + np.arange(16)).astype(np.float16)
                cache.put(1, ids[~hit], rows, version, fetched_at=fetched_at)
                results[path] = (hit, out)
        np.testing.assert_array_equal(results["c"][0], results["numpy"][0])
        np.testing.assert_array_equal(results["c"][1], results["numpy"][1])
        a, b = caches["c"].layers[1], caches["numpy"].layers[1]
        for name in ("tags", "stamps", "counts", "rows"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{name} after step {step}")
    assert caches["c"].stats() == caches["numpy"].stats() and caches["c"].stats()["hits"] > 1000


@pytest.mark.parametrize("path", ["c", "numpy"])
def test_an_id_refreshed_in_the_way_an_earlier_new_id_takes_yields_it(path, monkeypatch):
    if path == "numpy":
        monkeypatch.setattr(native, "KERNELS", None)
    elif not native.available():
        pytest.skip("native kernels not built")
    cache = RowCache(4 * (4 * 2 + 20), [1], 4, np.float16)  # one set of 4 ways: every id shares it
    row = lambda *ids: np.array([[i] * 4 for i in ids], np.float16)  # noqa: E731
    cache.put(1, np.array([10, 11, 12, 13]), row(10, 11, 12, 13), 1)  # the four ways, each used once
    out = np.empty((3, 4), np.float16)
    assert cache.get(1, np.array([11, 12, 13]), 1, out).all()  # now 10's way is the least used
    cache.put(1, np.array([5, 10]), row(5, 10), 1)  # 5 is new (takes that way), 10 would refresh it: 5 wins
    out = np.empty((2, 4), np.float16)
    assert cache.get(1, np.array([5, 10]), 1, out).tolist() == [True, False]
    assert out[0].tolist() == [5.0] * 4


@pytest.fixture
def service(tmp_path):
    store = TableStore(tmp_path / "store")
    server, port, _ = build_server(store, token=TOKEN)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)
    store.close()


def table_on_service(service):
    """The tiny model, its spec and compressor, and table "t" made for them on the service (admin, data client)."""
    model, spec, compressor = tiny_model()
    admin = ServiceAdmin(service, token=TOKEN)
    admin.create_table("t", spec, compressor.lookup_table, init_std=1.0, init_seed=0)
    return model, spec, compressor, admin, MemoryClient(service, "t", token=TOKEN)


def test_a_multi_layer_lookup_through_the_cache_serves_all_some_or_no_hits_and_fails_once(service):
    from memory_service.backend import LayerOf
    from memory_service.errors import NotFound
    from memory_service.spec import EngramSpec

    spec = EngramSpec(engram_vocab_size=[2003, 2003], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1, 2])
    ServiceAdmin(service, token=TOKEN).create_table("m", spec, init_std=1.0, init_seed=3)
    client = MemoryClient(service, "m", token=TOKEN)
    cached = CachedTables(client, RowCache(1 << 20, [1, 2], client.row_width, client.dtype))
    rng = np.random.default_rng(0)

    def ids(layer, n):
        return np.unique(rng.integers(0, client.num_rows(layer), n))

    first = {1: ids(1, 300), 2: ids(2, 300)}
    rows, version = cached.lookup_layers_async(first).result()  # follows the active version: all from the service
    assert version == 1
    for layer, layer_ids in first.items():
        np.testing.assert_array_equal(rows[layer], client.lookup_unique(layer, layer_ids)[0])
    fresh = ids(2, 200)
    fresh = fresh[~np.isin(fresh, first[2])]
    mixed = np.union1d(first[1][::2], ids(1, 100))
    for parts, expected_hits in (({1: first[1], 2: fresh}, first[1].size),  # layer 1 all cached, layer 2 none
                                 ({1: mixed, 2: first[2]}, np.isin(mixed, first[1]).sum() + first[2].size)):
        outs = {layer: np.empty((layer_ids.size, client.row_width), client.dtype) for layer, layer_ids in parts.items()}
        before = cached.cache.stats()["hits"]
        rows, version = cached.lookup_layers_async(parts, outs=outs).result()
        assert version == 1 and cached.cache.stats()["hits"] - before == expected_hits
        for layer, layer_ids in parts.items():
            assert rows[layer] is outs[layer]  # the caller's buffers (pinned memory on a GPU worker) hold the rows
            np.testing.assert_array_equal(rows[layer], client.lookup_unique(layer, layer_ids)[0])
    # a lookup that fails is failed for every layer that waits on it, without being sent again
    pending = cached.lookup_layers_async({1: ids(1, 10), 2: ids(2, 10)}, version=99)
    errors = []
    for layer in (1, 2):
        with pytest.raises(NotFound) as e:
            LayerOf(pending, layer).result()
        errors.append(e.value)
    assert errors[0] is errors[1]


@pytest.mark.slow
def test_cached_decoding_through_the_service_gives_the_same_tokens_and_each_request_one_version(service):
    model, spec, compressor, admin, client = table_on_service(service)
    hasher = NgramHasher.from_compressor(spec, compressor)
    cached = CachedTables(client, RowCache(8 << 20, list(spec.layer_ids), spec.head_dim, client.dtype, max_staleness_s=60))
    prompts, counts = mixed_requests(9, seed=3)
    plain = DecodingEngine(model, EngramRowFetcher(client, compressor, hasher), max_batch=4).generate(prompts, counts)
    engine = DecodingEngine(model, EngramRowFetcher(cached, compressor, hasher), max_batch=4)
    rates = []
    for _ in range(2):  # the second round is served from the cache (but for the version checks, a second apart)
        before = cached.cache.stats()
        completions = engine.generate(prompts, counts)
        assert [c.tokens for c in completions] == [c.tokens for c in plain]
        after = cached.cache.stats()
        rates.append((after["hits"] - before["hits"]) / (after["hits"] + after["misses"] - before["hits"] - before["misses"]))
    assert rates[0] < 0.5 < rates[1]

    # a swap while requests run: those begun before it finish on the old version, the next ones use the new one
    new = admin.create_version("t", init_std=0.5, init_seed=9)
    early = [engine.submit(p, 12) for p in prompts[:3]]
    engine.step()  # they are prefilled on version 1
    admin.swap("t", new)
    cached.learned(0)  # as if the bound had passed: the next unpinned lookup asks the service
    late = [engine.submit(p, 4) for p in prompts[3:5]]
    while not all(f.done() for f in early + late):
        engine.step()
    assert [f.result().versions for f in early] == [[1]] * 3
    assert [f.result().versions for f in late] == [[new]] * 2
    fresh = Generator(model, EngramRowFetcher(MemoryClient(service, "t", token=TOKEN, version=new), compressor, hasher))
    assert [f.result().tokens for f in late] == [alone(fresh, p, 4) for p in prompts[3:5]]


@pytest.mark.slow
def test_rows_trained_while_served_reach_the_cache_within_its_staleness_bound(service):
    model, spec, compressor, admin, client = table_on_service(service)
    bound = 0.5
    cached = CachedTables(client, RowCache(1 << 20, list(spec.layer_ids), spec.head_dim, client.dtype, bound))
    layer = spec.layer_ids[0]
    ids = np.arange(100, 400)
    before, _ = cached.lookup_unique(layer, ids)
    before = before.copy()
    assert cached.lookup_unique(layer, ids)[1] == 1 and cached.cache.stats()["hits"] == ids.size  # cached
    client.apply_gradients(layer, ids, np.ones((ids.size, spec.head_dim), np.float32), lr=0.05)  # training
    trained = client.lookup_unique(layer, ids)[0].copy()
    assert not np.array_equal(trained, before)
    started = time.monotonic()
    while not np.array_equal(cached.lookup_unique(layer, ids)[0], trained):
        assert time.monotonic() - started < bound + 0.5, "the cache served rows older than its bound"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_version_dropped_under_its_requests_fails_only_them(service):
    from memory_service.errors import NotFound

    model, spec, compressor, admin, client = table_on_service(service)
    hasher = NgramHasher.from_compressor(spec, compressor)
    engine = DecodingEngine(model, EngramRowFetcher(client, compressor, hasher), max_batch=4)
    on_old = engine.submit([5, 6, 7], 12)
    engine.step()  # prefilled on version 1, pinned to it
    new = admin.create_version("t", init_std=0.5, init_seed=5)
    admin.swap("t", new)
    on_new = engine.submit([9, 10], 6)
    engine.step()  # one step with both versions
    admin.drop_version("t", 1)  # under the request still reading it
    while not on_new.done():
        engine.step()
    with pytest.raises(NotFound):
        on_old.result(timeout=0)
    pinned = MemoryClient(service, "t", token=TOKEN, version=new)
    assert on_new.result().tokens == alone(Generator(model, EngramRowFetcher(pinned, compressor, hasher)), [9, 10], 6)
    assert on_new.result().versions == [new] and sorted(engine.free) == [0, 1, 2, 3]
