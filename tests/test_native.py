"""The native kernels (memory_service/fastpath.c) give exactly what the numpy paths give."""

import numpy as np
import pytest

from memory_service import native, native_build
from memory_service.dedup import dedup_ids, expand_rows
from memory_service.spec import EngramSpec
from memory_service.store import TableStore

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels not built (no C compiler?)")


def test_the_kernels_are_built_where_a_compiler_exists():
    if native_build.compiler() is None:
        pytest.skip("no C compiler on this machine: the numpy paths run")
    assert native.available(), "fastpath.c did not build or load although a C compiler is present"


def _numpy_dedup(ids, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(native, "KERNELS", None)
        batch = dedup_ids(ids)
        return batch.unique, batch.inverse()


def _id_batches():
    rng = np.random.default_rng(0)
    yield "uniform", rng.integers(0, 1 << 24, 100_000)
    yield "many repeats", rng.integers(0, 50, 30_000)
    yield "one id", np.full(1000, 7, dtype=np.int64)
    yield "two", np.array([5, 3], dtype=np.int64)
    yield "descending", np.arange(5000, 0, -1, dtype=np.int64)
    yield "40-bit ids", rng.integers(0, 1 << 40, 20_000)
    yield "ids too wide to pack (numpy argsort path)", rng.integers(0, 1 << 55, 5000)
    yield "zero and max", np.array([0, (1 << 30) - 1, 0, 12, (1 << 30) - 1], dtype=np.int64)


@needs_native
@pytest.mark.parametrize("name,ids", list(_id_batches()), ids=[n for n, _ in _id_batches()])
def test_native_dedup_equals_numpy(name, ids, monkeypatch):
    batch = dedup_ids(ids)
    unique, inverse = batch.unique, batch.inverse()
    np.testing.assert_array_equal(unique, np.unique(ids))
    np.testing.assert_array_equal(unique[inverse], ids)
    ref_unique, ref_inverse = _numpy_dedup(ids, monkeypatch)
    np.testing.assert_array_equal(unique, ref_unique)
    np.testing.assert_array_equal(inverse, ref_inverse)


@needs_native
@pytest.mark.parametrize("row_nbytes,unit", [(128, 128), (64, 64), (256, 256), (512, 512), (96, 32), (40, 8), (6, 2)])
def test_native_gather_equals_take_and_clips(row_nbytes, unit):
    rng = np.random.default_rng(row_nbytes)
    units = 4000
    region = rng.integers(0, 256, (units, unit), dtype=np.uint8)
    per_row = row_nbytes // unit
    first = rng.integers(0, units - per_row + 1, 3000)
    first[:3] = [-5, units + 10, units - per_row + 1]  # out of range: clipped to the first / last whole row
    out = np.empty((first.size, row_nbytes), dtype=np.uint8)
    native.gather_rows(region, first, out)
    clipped = np.clip(first, 0, units - per_row)
    expected = region.reshape(-1)[(clipped * unit)[:, None] + np.arange(row_nbytes)[None, :]]
    np.testing.assert_array_equal(out, expected)


@needs_native
def test_native_gather_refuses_shapes_that_do_not_fit():
    region = np.zeros((10, 8), dtype=np.uint8)
    with pytest.raises(ValueError):
        native.gather_rows(region, np.zeros(3, dtype=np.int64), np.empty((3, 12), dtype=np.uint8))  # not whole units
    with pytest.raises(ValueError):
        native.gather_rows(region, np.zeros(3, dtype=np.int64), np.empty((2, 8), dtype=np.uint8))  # wrong count


@needs_native
def test_expand_rows_equals_take():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((500, 24)).astype(np.float16)
    inverse = rng.integers(0, 500, 7000)
    out = np.empty((7000, 24), dtype=np.float16)
    expand_rows(rows, inverse, out)
    np.testing.assert_array_equal(out, rows[inverse])


@needs_native
@pytest.mark.parametrize("head_dim,dtype", [(32, "float32"), (48, "float16"), (5, "float32")])
def test_store_lookups_are_the_same_with_and_without_native_kernels(tmp_path, monkeypatch, head_dim, dtype):
    """A real LMDB store, chunk gathers on both paths, an absent chunk (zeros) included."""
    spec = EngramSpec(engram_vocab_size=[20011], n_embed_per_ngram=head_dim * 2, n_head_per_ngram=2, layer_ids=[1],
                      max_ngram_size=2, dtype=dtype)
    store = TableStore(tmp_path / "s", chunk_rows=256)
    try:
        store.create_table("t", spec, init_std=0.3, init_seed=5)
        num_rows = store.table_info("t").layer_rows[1]
        store.set_shard_state(1, {"t": {1: (0, 5000)}})  # a new version holds only this shard's chunks
        partial = store.create_version("t", init_std=0.2, init_seed=9)
        store.write_rows("t", 1, np.arange(0, 300), np.ones((300, head_dim), dtype=dtype), version=partial)
        ids = np.random.default_rng(2).integers(0, num_rows, 6000)
        for version in (1, partial):
            fast, _ = store.lookup("t", 1, ids, version=version)
            with monkeypatch.context() as m:
                m.setattr(native, "KERNELS", None)
                slow, _ = store.lookup("t", 1, ids, version=version)
            np.testing.assert_array_equal(fast, slow)
        fast, _ = store.lookup("t", 1, ids, version=partial)
        assert np.all(fast[ids < 300] == 1) and np.all(fast[ids >= 5120] == 0)  # written rows; chunks it does not hold
        assert np.all(np.any(fast[(ids >= 300) & (ids < 5000)] != 0, axis=1))  # seeded rows it holds
    finally:
        store.close()


@needs_native
@pytest.mark.parametrize("name,ids", list(_id_batches())[:6], ids=[n for n, _ in _id_batches()][:6])
@pytest.mark.parametrize("piece", [1, 700, 1 << 20])
def test_partwise_dedup_equals_dedup_ids(name, ids, piece):
    from memory_service.dedup import PartwiseDedup

    assert PartwiseDedup.supports(ids.size, int(ids.max()) + 1)
    partwise = PartwiseDedup(ids, piece) if piece != 700 else PartwiseDedup(ids, piece, id_bound=int(ids.max()) * 2 + 1)
    ready = list(partwise)
    assert ready == sorted(ready) and ready[-1] == partwise.count  # slices only ever grow the sorted prefix
    if name == "uniform" and piece == 700:
        assert len(ready) > 50  # handed out in many slices, not all at the end
    whole = dedup_ids(ids)
    np.testing.assert_array_equal(partwise.result().unique, whole.unique)
    np.testing.assert_array_equal(partwise.result().inverse(), whole.inverse())


@needs_native
def test_row_delta_merge_is_the_same_natively_and_in_numpy(monkeypatch):
    from memory_service.row_delta import RowDelta
    from memory_service.row_optim import record_dtype

    rng = np.random.default_rng(3)
    record = record_dtype(8)

    def run():
        delta = RowDelta.empty(8, np.float16, record, num_chunks=40, chunk_rows=256)
        for step in range(6):  # overlapping pushes: later rows replace earlier ones
            ids = rng.choice(10_000, size=700, replace=False)
            rows = rng.standard_normal((700, 8)).astype(np.float16)
            opt = np.zeros(700, dtype=record)
            opt["step"] = step + 1
            opt["m"] = rng.standard_normal((700, 8))
            delta = delta.merged(ids, rows, opt)
        return delta

    state = rng.bit_generator.state
    fast = run()
    rng.bit_generator.state = state
    with monkeypatch.context() as m:
        m.setattr(native, "KERNELS", None)
        slow = run()
    assert np.all(np.diff(fast.ids) > 0) and fast.size > 3000
    np.testing.assert_array_equal(fast.ids, slow.ids)
    np.testing.assert_array_equal(fast.rows, slow.rows)
    assert fast.opt.tobytes() == slow.opt.tobytes()
    np.testing.assert_array_equal(fast.chunk_mask, slow.chunk_mask)


@needs_native
@pytest.mark.parametrize("order", ["ascending", "shuffled", "repeats"])
def test_find_sorted_equals_searchsorted(order):
    rng = np.random.default_rng(5)
    run = np.unique(rng.integers(0, 100_000, 3000))
    query = np.unique(rng.integers(-5, 100_010, 20_000))
    if order == "shuffled":
        query = rng.permutation(query)
    elif order == "repeats":
        query = np.concatenate([query[::-1], query, [run[0], run[-1], run[-1]]])
    positions, index = native.find_sorted(run, query)
    at = np.minimum(np.searchsorted(run, query), run.size - 1)
    expected = np.flatnonzero(run[at] == query)
    np.testing.assert_array_equal(positions, expected)
    np.testing.assert_array_equal(index, at[expected])
    assert native.find_sorted(np.empty(0, np.int64), query)[0].size == 0
