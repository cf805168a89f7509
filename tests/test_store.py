"""The LMDB table store on real LMDB files: rows, Adam, versions, errors, concurrency, persistence."""

import threading

import numpy as np
import pytest

from memory_service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from memory_service.local_table import LocalTable
from memory_service.spec import EngramSpec
from memory_service.store import TableStore
from memory_service.table_meta import layer_rows_for_spec

SPEC = EngramSpec(engram_vocab_size=[3001, 3001], n_embed_per_ngram=32, n_head_per_ngram=2, layer_ids=[1, 3])


@pytest.fixture
def store(tmp_path):
    s = TableStore(tmp_path / "store", chunk_rows=512)
    yield s
    s.close()


def test_initial_rows_equal_the_in_process_table(store):
    store.create_table("t", SPEC, init_std=0.5, init_seed=3)
    local = LocalTable(SPEC, layer_rows_for_spec(SPEC), init_std=0.5, init_seed=3)
    for layer in SPEC.layer_ids:
        ids = np.random.default_rng(layer).integers(0, local.num_rows(layer), 5000)
        rows, version = store.lookup("t", layer, ids)
        assert version == 1 and rows.dtype == np.float32
        np.testing.assert_array_equal(rows, local.lookup(layer, ids))


def test_adam_updates_equal_the_in_process_table(store):
    store.create_table("t", SPEC)
    local = LocalTable(SPEC, layer_rows_for_spec(SPEC))
    rng = np.random.default_rng(0)
    for step in range(5):
        ids = np.unique(rng.integers(0, local.num_rows(1), 700))
        grads = rng.standard_normal((ids.size, SPEC.head_dim)).astype(np.float32)
        store.apply_gradients("t", 1, ids, grads, lr=0.01 * (step + 1))
        local.apply_gradients(1, ids, grads, lr=0.01 * (step + 1))
    all_ids = np.arange(local.num_rows(1))
    np.testing.assert_array_equal(store.lookup("t", 1, all_ids)[0], local.table(1))
    state = store.optimizer_state("t", 1, all_ids)
    np.testing.assert_array_equal(state["step"], local.optimizer_state(1)["step"])
    np.testing.assert_array_equal(state["m"], local.optimizer_state(1)["m"])


def _push_both(store, local, rng, steps, layer=1, rows=700):
    for step in range(steps):
        ids = np.unique(rng.integers(0, local.num_rows(layer), rows))
        grads = rng.standard_normal((ids.size, SPEC.head_dim)).astype(np.float32)
        store.apply_gradients("t", layer, ids, grads, lr=0.01 * (step + 1))
        local.apply_gradients(layer, ids, grads, lr=0.01 * (step + 1))


def _assert_same_as(store, local, layer=1, version=0):
    all_ids = np.arange(local.num_rows(layer))
    np.testing.assert_array_equal(store.lookup("t", layer, all_ids, version=version)[0], local.table(layer))
    state = store.optimizer_state("t", layer, all_ids, version=version)
    np.testing.assert_array_equal(state["step"], local.optimizer_state(layer)["step"])
    np.testing.assert_array_equal(state["m"], local.optimizer_state(layer)["m"])
    np.testing.assert_array_equal(state["v"], local.optimizer_state(layer)["v"])


def test_pushes_are_held_as_recent_rows_then_folded_into_chunks(tmp_path):
    """Pushes append segments (a write the size of the push); past the limit they fold into the chunks. Exact throughout."""
    store = TableStore(tmp_path / "s", chunk_rows=512, max_delta_rows=1500, background_compaction=False)
    store.create_table("t", SPEC)
    local = LocalTable(SPEC, layer_rows_for_spec(SPEC))
    rng = np.random.default_rng(0)
    _push_both(store, local, rng, 2)  # about 1300 distinct rows: held, not folded
    assert store.stats()["delta_rows"] > 1000 and store.counters["folds"] == 0
    _assert_same_as(store, local)
    store.close()
    store = TableStore(tmp_path / "s", chunk_rows=512, max_delta_rows=1500, background_compaction=False)  # segments are read back on open
    assert store.stats()["delta_rows"] > 1000
    _assert_same_as(store, local)
    _push_both(store, local, rng, 6)  # the same rows again and new ones: folds happen on the way
    assert store.counters["folds"] >= 2
    _assert_same_as(store, local)
    store.close()
    store = TableStore(tmp_path / "s", chunk_rows=512, max_delta_rows=1500, background_compaction=False)
    _assert_same_as(store, local)
    store.close()


def test_recent_rows_are_folded_before_rows_are_written_copied_or_moved(tmp_path):
    store = TableStore(tmp_path / "s", chunk_rows=512)
    store.create_table("t", SPEC)
    local = LocalTable(SPEC, layer_rows_for_spec(SPEC))
    rng = np.random.default_rng(1)
    _push_both(store, local, rng, 3)
    assert store.stats()["delta_rows"] > 0
    copy = store.create_version("t", copy_of=1)  # the copy is made of chunks: the pushes must be in them
    _assert_same_as(store, local, version=copy)
    ids = np.arange(0, 2000, 3)
    _push_both(store, local, rng, 2)
    new_rows = np.full((ids.size, SPEC.head_dim), 0.25, dtype=np.float32)
    store.write_rows("t", 1, ids, new_rows)  # written rows are not hidden by earlier pushes
    np.testing.assert_array_equal(store.lookup("t", 1, ids)[0], new_rows)
    _push_both(store, local, rng, 1)
    chunks = dict(store.export_chunks("t", 1, 0, local.num_rows(1)))  # what a shard move ships holds every push
    assert store.stats()["delta_rows"] == 0 and chunks
    store.drop_version("t", copy)
    store.close()
    reopened = TableStore(tmp_path / "s", chunk_rows=512)
    assert copy not in reopened.table_info("t").versions and reopened.stats()["delta_rows"] == 0
    reopened.close()


def test_hot_rows_pushed_again_and_again_do_not_pile_up_segments(tmp_path):
    """The delta stays small (the same rows), but the stored segments are folded away all the same."""
    store = TableStore(tmp_path / "s", chunk_rows=512, max_delta_rows=1000, background_compaction=False)
    store.create_table("t", SPEC)
    local = LocalTable(SPEC, layer_rows_for_spec(SPEC))
    ids = np.arange(100, 300)
    rng = np.random.default_rng(4)
    for _ in range(60):
        grads = rng.standard_normal((ids.size, SPEC.head_dim)).astype(np.float32)
        store.apply_gradients("t", 1, ids, grads, lr=0.01)
        local.apply_gradients(1, ids, grads, lr=0.01)
    store.apply_gradients("t", 1, np.empty(0, dtype=np.int64), np.empty((0, SPEC.head_dim), np.float32), lr=0.01)
    with store.dbs.wal_env.begin() as txn:
        segments = sum(1 for _ in txn.cursor(db=store.dbs.delta))
    assert store.counters["flushes"] >= 2 and segments <= 4 * 1000 // ids.size + 1
    _assert_same_as(store, local)
    store.close()
    # the count of stored rows survives a reopen
    store = TableStore(tmp_path / "s", chunk_rows=512, max_delta_rows=1000, background_compaction=False)
    for _ in range(20):
        grads = rng.standard_normal((ids.size, SPEC.head_dim)).astype(np.float32)
        store.apply_gradients("t", 1, ids, grads, lr=0.01)
        local.apply_gradients(1, ids, grads, lr=0.01)
    with store.dbs.wal_env.begin() as txn:
        assert sum(1 for _ in txn.cursor(db=store.dbs.delta)) <= 4 * 1000 // ids.size + 1
    _assert_same_as(store, local)
    store.close()


def test_lookup_into_a_strided_buffer(store):
    store.create_table("t", SPEC)
    ids = np.arange(0, 3000, 7)
    store.apply_gradients("t", 1, ids[:50], np.ones((50, SPEC.head_dim), np.float32), lr=0.1)  # some rows in the delta
    expected, _ = store.lookup("t", 1, ids)
    big = np.full((2 * ids.size, SPEC.head_dim), 7.0, dtype=np.float32)
    out, _ = store.lookup("t", 1, ids, out=big[::2])
    np.testing.assert_array_equal(big[::2], expected)
    assert np.all(big[1::2] == 7.0)


def test_writes_to_rows_another_shard_owns_are_refused(store):
    store.create_table("t", SPEC)
    store.set_shard_state(3, {"t": {1: (0, 1024)}})
    with pytest.raises(FailedPrecondition, match="stale shard map"):
        store.apply_gradients("t", 1, np.array([5, 2000]), np.ones((2, SPEC.head_dim), np.float32), lr=0.1)
    with pytest.raises(FailedPrecondition, match="stale shard map"):
        store.write_rows("t", 1, np.array([2000]), np.ones((1, SPEC.head_dim), np.float32))
    store.apply_gradients("t", 1, np.array([5, 1000]), np.ones((2, SPEC.head_dim), np.float32), lr=0.1)


@pytest.mark.parametrize("dtype, head_dim", [("float16", 64), ("float32", 24), ("float16", 3)])
def test_row_widths_that_do_not_divide_a_page(tmp_path, dtype, head_dim):
    """128-byte rows gather in one take; 96- and 6-byte rows use the multi-unit path; all exact."""
    spec = EngramSpec(engram_vocab_size=[5003], max_ngram_size=2, n_embed_per_ngram=head_dim, n_head_per_ngram=1,
                      layer_ids=[0], dtype=dtype)
    store = TableStore(tmp_path / "s", chunk_rows=2048)
    store.create_table("t", spec, init_std=1.0)
    local = LocalTable(spec, layer_rows_for_spec(spec))
    ids = np.random.default_rng(1).integers(0, local.num_rows(0), 20000)
    rows, _ = store.lookup("t", 0, ids)
    assert rows.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(rows.astype(np.float32), local.lookup(0, ids))
    store.close()


def test_versions_swap_rollback_drop(store):
    store.create_table("t", SPEC)
    ids = np.arange(10)
    v1_rows = store.lookup("t", 1, ids)[0].copy()
    v2 = store.create_version("t", copy_of=1)
    v3 = store.create_version("t", init_std=0.0)
    assert (v2, v3) == (2, 3)
    store.write_rows("t", 1, ids, np.full((10, SPEC.head_dim), 7.0, np.float32), version=v2)
    # readers of the active version are not disturbed
    np.testing.assert_array_equal(store.lookup("t", 1, ids)[0], v1_rows)
    np.testing.assert_array_equal(store.lookup("t", 1, ids, version=v2)[0], 7.0)
    np.testing.assert_array_equal(store.lookup("t", 1, ids, version=v3)[0], 0.0)
    assert store.swap("t", v2) == (2, 1)
    rows, version = store.lookup("t", 1, ids)
    assert version == 2 and np.all(rows == 7.0)
    np.testing.assert_array_equal(store.lookup("t", 1, np.arange(10, 20))[0], store.lookup("t", 1, np.arange(10, 20), version=1)[0])
    assert store.rollback("t") == (1, 2)
    np.testing.assert_array_equal(store.lookup("t", 1, ids)[0], v1_rows)
    with pytest.raises(FailedPrecondition, match="no earlier active version"):
        store.rollback("t")
    with pytest.raises(FailedPrecondition, match="is active"):
        store.drop_version("t", 1)
    store.drop_version("t", v2)
    with pytest.raises(NotFound, match="no version 2"):
        store.lookup("t", 1, ids, version=v2)
    assert sorted(store.table_info("t").versions) == [1, 3]
    store.drop_table("t")
    with pytest.raises(NotFound, match="no table named 't'"):
        store.lookup("t", 1, ids)


def test_retried_request_is_applied_once(store):
    store.create_table("t", SPEC)
    ids, grads = np.array([5, 9]), np.ones((2, SPEC.head_dim), np.float32)
    store.apply_gradients("t", 1, ids, grads, 0.1, request_id="abc")
    once = store.lookup("t", 1, ids)[0].copy()
    store.apply_gradients("t", 1, ids, grads, 0.1, request_id="abc")
    np.testing.assert_array_equal(store.lookup("t", 1, ids)[0], once)
    assert store.optimizer_state("t", 1, ids)["step"].tolist() == [1, 1]
    store.apply_gradients("t", 1, ids, grads, 0.1, request_id="def")
    assert store.optimizer_state("t", 1, ids)["step"].tolist() == [2, 2]


def test_bad_requests_change_nothing(store):
    store.create_table("t", SPEC)
    n = store.table_info("t").layer_rows[1]
    before = store.lookup("t", 1, np.arange(n))[0].copy()
    head = SPEC.head_dim
    cases = [
        (InvalidArgument, "out of range", lambda: store.lookup("t", 1, np.array([n]))),
        (InvalidArgument, "no layer 2", lambda: store.lookup("t", 2, np.array([0]))),
        (NotFound, "no table named 'x'", lambda: store.lookup("x", 1, np.array([0]))),
        (NotFound, "no version 9", lambda: store.lookup("t", 1, np.array([0]), version=9)),
        (FailedPrecondition, "fingerprint", lambda: store.lookup("t", 1, np.array([0]), fingerprint="bad")),
        (ResourceExhausted, "split it", lambda: store.lookup("t", 1, np.arange(100), max_bytes=1000)),
        (InvalidArgument, "float32", lambda: store.write_rows("t", 1, np.array([0]), np.zeros((1, head), np.float16))),
        (InvalidArgument, "rows must be", lambda: store.write_rows("t", 1, np.array([0, 1]), np.zeros((1, head), np.float32))),
        (InvalidArgument, "unique", lambda: store.write_rows("t", 1, np.array([1, 1]), np.zeros((2, head), np.float32))),
        (InvalidArgument, "unique", lambda: store.apply_gradients("t", 1, np.array([1, 1]), np.zeros((2, head)), 0.1)),
        (InvalidArgument, "gradients must be", lambda: store.apply_gradients("t", 1, np.array([1]), np.zeros((1, 3)), 0.1)),
        (InvalidArgument, "NaN", lambda: store.apply_gradients("t", 1, np.array([1]), np.full((1, head), np.inf), 0.1)),
        (InvalidArgument, "learning rate", lambda: store.apply_gradients("t", 1, np.array([1]), np.zeros((1, head)), -1.0)),
        (AlreadyExists, "already exists", lambda: store.create_table("t", SPEC)),
        (ValueError, "invalid table name", lambda: store.create_table("../etc", SPEC)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
    np.testing.assert_array_equal(store.lookup("t", 1, np.arange(n))[0], before)


def test_concurrent_lookups_during_writes_see_whole_writes(store):
    """Many threads look rows up while writes land: every reply is one write's rows, never a mix or a stale view."""
    store.create_table("t", SPEC, init_std=0.0)
    n = store.table_info("t").layer_rows[1]
    ids = np.arange(0, n, 3)
    errors, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            rows, _ = store.lookup("t", 1, ids)
            values = np.unique(rows)
            if values.size != 1:
                errors.append(values[:5])

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for value in range(1, 30):
        store.write_rows("t", 1, ids, np.full((ids.size, SPEC.head_dim), value, np.float32))
        rows, _ = store.lookup("t", 1, ids)
        assert np.all(rows == value)  # a lookup after an acknowledged write sees it
    stop.set()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("background", [True, False], ids=["background folds", "folds in the push"])
def test_concurrent_lookups_during_pushes_and_folds_see_whole_pushes(tmp_path, background):
    """Readers see the table after some whole number of pushes (never part of one), while pushes are held and folded."""
    store = TableStore(tmp_path / "s", chunk_rows=512, max_delta_rows=900, background_compaction=background)
    store.create_table("t", SPEC)
    local = LocalTable(SPEC, layer_rows_for_spec(SPEC))
    all_ids = np.arange(local.num_rows(1))
    rng = np.random.default_rng(7)
    pushes = []
    for _ in range(16):
        ids = np.unique(rng.integers(0, local.num_rows(1), 400))
        pushes.append((ids, rng.standard_normal((ids.size, SPEC.head_dim)).astype(np.float32)))
    states = {local.table(1).tobytes()}  # the table after 0, 1, 2, ... pushes
    for ids, grads in pushes:
        local.apply_gradients(1, ids, grads, lr=0.05)
        states.add(local.table(1).tobytes())
    errors, seen, stop = [], set(), threading.Event()

    def reader():
        while not stop.is_set():
            rows, _ = store.lookup("t", 1, all_ids)
            key = rows.tobytes()
            if key in states:
                seen.add(key)
            else:
                errors.append(1)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for ids, grads in pushes:
        store.apply_gradients("t", 1, ids, grads, lr=0.05)
    store.compactor.wait()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} lookups saw a table no sequence of whole pushes gives"
    assert store.counters["folds"] >= 2 and len(seen) >= 3
    np.testing.assert_array_equal(store.lookup("t", 1, all_ids)[0], local.table(1))


def test_reopen_keeps_everything(tmp_path):
    store = TableStore(tmp_path / "s")
    store.create_table("t", SPEC)
    store.write_rows("t", 3, np.array([4]), np.full((1, SPEC.head_dim), 2.5, np.float32))
    v2 = store.create_version("t", copy_of=1)
    store.swap("t", v2)
    store.close()
    again = TableStore(tmp_path / "s")
    info = again.table_info("t")
    assert info.active == 2 and info.history == [1]
    np.testing.assert_array_equal(again.lookup("t", 3, np.array([4]))[0], 2.5)
    again.close()


def test_warm_reads_every_chunk_of_a_version(store):
    meta = store.create_table("t", SPEC)
    expected = sum(meta.num_chunks(layer) for layer in SPEC.layer_ids) * meta.chunk_rows * meta.row_nbytes
    assert store.warm("t") == expected
    assert store.warm("t", version=1) == expected
    assert store.warm("t", batch_chunks=3) == expected  # a short read transaction per 3 chunks, every chunk once
    from memory_service.server import keep_warm

    keep_warm(store, 0, threading.Event())  # once, then returns


def test_compaction_interleaved_with_pushes_swaps_and_lookups(tmp_path):
    """Two versions take pushes in turn while the active one swaps back and forth and the background compactor
    flushes, merges and folds both: every lookup sees one whole version after whole pushes; both end exact."""
    store = TableStore(tmp_path / "s", chunk_rows=256, max_delta_rows=700)
    store.create_table("t", SPEC)
    v2 = store.create_version("t", copy_of=1)
    locals_ = {v: LocalTable(SPEC, layer_rows_for_spec(SPEC)) for v in (1, v2)}
    all_ids = np.arange(locals_[1].num_rows(1))
    rng = np.random.default_rng(11)
    plan = []
    for i in range(24):
        ids = np.unique(rng.integers(0, all_ids.size, 500))
        plan.append((1 if i % 2 else v2, ids, rng.standard_normal((ids.size, SPEC.head_dim)).astype(np.float32)))
    states = {v: {t.table(1).tobytes()} for v, t in locals_.items()}
    for v, ids, grads in plan:
        locals_[v].apply_gradients(1, ids, grads, lr=0.05)
        states[v].add(locals_[v].table(1).tobytes())
    errors, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            rows, version = store.lookup("t", 1, all_ids)
            if rows.tobytes() not in states[version]:
                errors.append(version)

    def swapper():
        while not stop.is_set():
            store.swap("t", v2 if store.table_info("t").active == 1 else 1)

    threads = [threading.Thread(target=reader), threading.Thread(target=swapper)]
    for t in threads:
        t.start()
    try:
        for v, ids, grads in plan:
            store.apply_gradients("t", 1, ids, grads, lr=0.05, version=v)
        store.compactor.wait()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, f"{len(errors)} lookups saw rows no whole sequence of pushes to their version gives"
    assert store.counters["folds"] >= 2 and store.counters["flushes"] >= 4
    for v, local in locals_.items():
        _assert_same_as(store, local, version=v)
    store.close()


def test_merged_runs_keep_rows_in_their_parts_and_garbage_goes_at_open(tmp_path):
    """A merge writes only ids and places; lookups, pushes and the fold read rows through them, exactly, before and
    after a reopen; run arrays no directory lists (a crash mid-flush) are removed at open, listed ones kept."""
    from memory_service.store.runs import IDS, read_directory, run_key

    store = TableStore(tmp_path / "s", chunk_rows=256, max_delta_rows=300, background_compaction=False)
    store.create_table("t", SPEC)
    local = LocalTable(SPEC, layer_rows_for_spec(SPEC))
    rng = np.random.default_rng(12)
    _push_both(store, local, rng, 3, rows=320)  # flushes and merges, not yet a fold (1/8 of the layer)
    key = (store.table_info("t").table_id, 1, 1)
    with store.dbs.env.begin() as txn:
        runs, _ = read_directory(txn, store.dbs, key)
    assert store.counters["merges"] >= 1 and store.counters["folds"] == 0
    assert any(r.sources for r in runs) and sum(r.stored_rows for r in runs) >= sum(r.count for r in runs)
    _assert_same_as(store, local)
    with store.dbs.env.begin(write=True) as txn:
        txn.put(run_key(key, 999, IDS), b"\0" * 4096, db=store.dbs.runs)  # what a flush cut short leaves
    store.close()
    store = TableStore(tmp_path / "s", chunk_rows=256, max_delta_rows=300, background_compaction=False)
    with store.dbs.env.begin() as txn:
        assert txn.get(run_key(key, 999, IDS), db=store.dbs.runs) is None
        assert read_directory(txn, store.dbs, key)[0] == runs
    _assert_same_as(store, local)
    _push_both(store, local, rng, 10, rows=320)  # on to folds, which drop the runs with their parts
    assert store.counters["folds"] >= 1
    _assert_same_as(store, local)
    with store.compactor.exclusive():
        store.compactor.settle(store.table_info("t"), key)  # everything folded: no run array may be left behind
    with store.dbs.env.begin() as txn:
        assert sum(1 for _ in txn.cursor(db=store.dbs.runs).iternext(values=False)) == 0
    _assert_same_as(store, local)
    store.close()


def test_a_snapshot_opened_while_chunks_are_replaced_resolves_them_itself(store):
    """Between a commit that rewrites chunks and the bookkeeping after it, a new snapshot sees the new chunks: it must
    not take their old addresses from the shared index (freed pages), nor put its own into it."""
    from memory_service.store.layout import ROWS, chunk_key

    meta = store.create_table("t", SPEC)
    ids = np.arange(0, 1024)
    before, _ = store.lookup("t", 1, ids)  # the shared index now holds chunks 0 and 1
    key = (meta.table_id, 1, 1)
    new_chunk = np.full((meta.chunk_rows, SPEC.head_dim), 7.5, dtype=meta.dtype)
    store.snapshots.committed()  # no idle snapshot left: the next acquire opens one
    txn = store.dbs.env.begin(write=True)
    txn.put(chunk_key(ROWS, *key, 0), new_chunk.tobytes(), db=store.dbs.rows)
    with store.snapshots.replacing(rewritten={(key, ROWS): np.array([0])}):
        txn.commit()
        snap = store.snapshots.acquire()
        try:
            assert snap.private
            out = np.empty((ids.size, SPEC.head_dim), dtype=meta.dtype)
            snap.gather(store.table_info("t"), 1, 1, ids, out)
        finally:
            store.snapshots.release(snap)
    np.testing.assert_array_equal(out[:512], 7.5)
    np.testing.assert_array_equal(out[512:], before[512:])
    rows, _ = store.lookup("t", 1, ids)  # after the bookkeeping: shared again, and right
    np.testing.assert_array_equal(rows[:512], 7.5)
    np.testing.assert_array_equal(rows[512:], before[512:])


def test_a_move_replaces_what_the_new_owner_held_in_the_range_even_with_no_chunks_arriving(tmp_path):
    """An empty (absent) chunk at the source means zeros: stale chunks at the destination must not show through."""
    source, dest = TableStore(tmp_path / "a", chunk_rows=512), TableStore(tmp_path / "b", chunk_rows=512)
    source.create_table("t", SPEC, init_std=0.0)  # writes no chunk: every row reads as zeros
    dest.create_table("t", SPEC, init_std=1.0)  # stale rows in the range, e.g. from an earlier failed move
    ids = np.arange(512, 1024)
    dest.apply_gradients("t", 1, ids, np.ones((ids.size, SPEC.head_dim), np.float32), lr=0.1)  # and stale Adam state
    chunks = source.export_chunks("t", 1, 512, 1536)
    assert chunks == []
    dest.import_chunks("t", 1, chunks, 512, 1536)
    np.testing.assert_array_equal(dest.lookup("t", 1, np.arange(512, 1536))[0], 0)
    assert not dest.optimizer_state("t", 1, ids)["step"].any()
    assert dest.lookup("t", 1, np.arange(0, 512))[0].any()  # outside the range: untouched
    source.close()
    dest.close()
