import numpy as np
import pytest
import torch

from memory_service.errors import InvalidArgument
from memory_service.local_table import LocalTable
from memory_service.row_init import INIT_BLOCK_ROWS, init_rows
from memory_service.row_optim import RowAdamConfig, row_adam_update
from memory_service.spec import EngramSpec

SPEC = EngramSpec(engram_vocab_size=[101, 103], n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=[1, 3])


def test_row_adam_equals_torch_adam_when_every_row_is_touched():
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((7, 4)).astype(np.float32)
    param = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.Adam([param], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    rows, m, v, steps = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.zeros(7, dtype=np.int64)
    for _ in range(25):
        g = rng.standard_normal((7, 4)).astype(np.float32)
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        rows, m, v, steps = row_adam_update(rows, m, v, steps, g, 0.01, RowAdamConfig())
    np.testing.assert_allclose(rows, param.detach().numpy(), atol=2e-6, rtol=0)
    assert steps.tolist() == [25] * 7


def test_row_step_counts_are_per_row():
    table = LocalTable(SPEC, {1: 50})
    before = table.table(1).copy()
    table.apply_gradients(1, np.array([3, 9]), np.ones((2, 4), np.float32), lr=0.1)
    table.apply_gradients(1, np.array([9]), np.ones((1, 4), np.float32), lr=0.1)
    after = table.table(1)
    changed = np.flatnonzero(np.any(after != before, axis=1))
    assert changed.tolist() == [3, 9]
    # Adam's first step moves each coordinate by exactly lr (sign of the gradient)
    np.testing.assert_allclose(before[3] - after[3], 0.1, rtol=1e-5)
    assert table.optimizer_state(1)["step"][[3, 9]].tolist() == [1, 2]


def test_init_is_reproducible_by_block():
    full = init_rows(10_000, 4, layer_id=3, start=0, stop=10_000, std=0.5, seed=7)
    part = init_rows(10_000, 4, layer_id=3, start=INIT_BLOCK_ROWS - 5, stop=2 * INIT_BLOCK_ROWS + 5, std=0.5, seed=7)
    np.testing.assert_array_equal(part, full[INIT_BLOCK_ROWS - 5:2 * INIT_BLOCK_ROWS + 5])
    assert abs(full.std() - 0.5) < 0.02
    other = init_rows(10_000, 4, layer_id=1, start=0, stop=100, std=0.5, seed=7)
    assert not np.array_equal(other, full[:100])


def test_lookup_and_errors():
    table = LocalTable(SPEC, {1: 50, 3: 60})
    ids = np.array([0, 49, 7, 7])
    rows = table.lookup(1, ids)
    assert rows.shape == (4, 4) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows, table.table(1)[ids])
    with pytest.raises(InvalidArgument, match="row id 50 is out of range for layer 1 \\(table has 50 rows\\)"):
        table.lookup(1, np.array([1, 50]))
    with pytest.raises(InvalidArgument, match="row id -1"):
        table.lookup(1, np.array([-1]))
    with pytest.raises(InvalidArgument, match="no table for layer 2"):
        table.lookup(2, np.array([0]))
    with pytest.raises(InvalidArgument, match="1-D"):
        table.lookup(1, np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(InvalidArgument, match="integers"):
        table.lookup(1, np.array([0.5]))
    before = table.table(1).copy()
    with pytest.raises(InvalidArgument, match="unique"):
        table.apply_gradients(1, np.array([1, 1]), np.zeros((2, 4)), 0.1)
    with pytest.raises(InvalidArgument, match=r"gradients must be \[2, 4\]"):
        table.apply_gradients(1, np.array([1, 2]), np.zeros((2, 5)), 0.1)
    with pytest.raises(InvalidArgument, match="NaN"):
        table.apply_gradients(1, np.array([1, 2]), np.full((2, 4), np.nan), 0.1)
    with pytest.raises(InvalidArgument, match="learning rate"):
        table.apply_gradients(1, np.array([1, 2]), np.zeros((2, 4)), float("nan"))
    np.testing.assert_array_equal(table.table(1), before)  # nothing changed by rejected writes


def test_save_load_roundtrip(tmp_path):
    table = LocalTable(SPEC, {1: 50, 3: 60})
    table.apply_gradients(3, np.array([5, 6]), np.ones((2, 4), np.float32), 0.05)
    table.save(tmp_path / "t.npz")
    other = LocalTable(SPEC, {1: 50, 3: 60}, init_seed=99)
    other.load(tmp_path / "t.npz")
    for layer in (1, 3):
        np.testing.assert_array_equal(other.table(layer), table.table(layer))
    np.testing.assert_array_equal(other.optimizer_state(3), table.optimizer_state(3))
    other = EngramSpec(engram_vocab_size=[101, 103], n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=[1, 3], seed=1)
    wrong = LocalTable(other, {1: 50, 3: 60})
    with pytest.raises(InvalidArgument, match="another spec"):
        wrong.load(tmp_path / "t.npz")
