
import numpy as np
import pytest
import torch

from memory_service.compression import CompressedTokenizer
from memory_service.hashing import NgramHasher
from memory_service.spec import EngramSpec
from model_worker.engram import EngramLayer, ShortConvState, load_reference_engram


@pytest.fixture(scope="module")
def reference_setup(data_dir, reference_hashing):
    config = dict(reference_hashing["bytelevel_n3"]["config"])
    tokenizer = config.pop("tokenizer")
    spec = EngramSpec(**config)
    compressor = CompressedTokenizer.from_tokenizer_file(data_dir / tokenizer)
    return spec, compressor, NgramHasher.from_compressor(spec, compressor)


@pytest.mark.parametrize("hc_mult", [1, 2, 4])
def test_reference_forward_matches(hc_mult, reference_setup, data_dir):
    """Weights and outputs saved from the reference Engram module (random non-trivial weights, layer 15)."""
    spec, compressor, hasher = reference_setup
    z = np.load(data_dir / f"reference_engram_hc{hc_mult}.npz")
    state = {k[3:]: z[k] for k in z.files if k.startswith("sd/")}
    layer, table = load_reference_engram(state, spec, 15, hidden_size=48, hc_mult=hc_mult)
    assert table.shape == (hasher.layer_num_rows(15), spec.head_dim)
    row_ids = hasher.row_ids(compressor(z["input_ids"]))[15]  # [B, T, heads]
    rows = table[torch.from_numpy(row_ids)]  # [B, T, heads, head_dim]
    with torch.no_grad():
        out = layer(torch.from_numpy(z["hidden_states"]), rows)
    torch.testing.assert_close(out, torch.from_numpy(z["output"]), atol=1e-5, rtol=0)


def test_load_reference_rejects_mismatched_state(reference_setup, data_dir):
    spec, _, _ = reference_setup
    z = np.load(data_dir / "reference_engram_hc2.npz")
    state = {k[3:]: z[k] for k in z.files if k.startswith("sd/")}
    with pytest.raises(ValueError, match="not an Engram layer"):
        load_reference_engram(state, spec, 3, 48, 2)
    with pytest.raises(ValueError, match="does not fit"):
        load_reference_engram(state, spec, 15, 48, 1)
    bad = dict(state)
    bad["multi_head_embedding.embedding.weight"] = bad["multi_head_embedding.embedding.weight"][:-1]
    with pytest.raises(ValueError, match="rows of width"):
        load_reference_engram(bad, spec, 15, 48, 2)
    with pytest.raises(ValueError, match="not a reference Engram module"):
        load_reference_engram({}, spec, 15, 48, 2)


def _layer(hc_mult=2, hidden=16):
    spec = EngramSpec(engram_vocab_size=[101, 103], n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=[1], kernel_size=3)
    torch.manual_seed(0)
    return EngramLayer(spec, hidden, hc_mult, zero_init_conv=False), spec


def test_shapes_are_checked():
    layer, spec = _layer()
    h = torch.randn(2, 5, 2, 16)
    with pytest.raises(ValueError, match=r"rows must be \[B, T, heads, head_dim\] = \[2, 5, 4, 4\]"):
        layer(h, torch.randn(2, 5, 3, 4))
    with pytest.raises(ValueError, match="hidden states must be"):
        layer(torch.randn(2, 5, 16), torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="floating point"):
        layer(h, torch.zeros(2, 5, 4, 4, dtype=torch.int64))


def test_new_layers_zero_init_conv():
    spec = EngramSpec(engram_vocab_size=[101, 103], n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=[1])
    layer = EngramLayer(spec, 16, 1)
    assert torch.count_nonzero(layer.short_conv.conv.weight) == 0


def test_incremental_conv_state_equals_full_sequence():
    layer, spec = _layer()
    h, rows = torch.randn(2, 13, 2, 16), torch.randn(2, 13, 4, 4)
    with torch.no_grad():
        full = layer(h, rows)
        state = ShortConvState()
        parts = [layer(h[:, :5], rows[:, :5], state)]
        parts += [layer(h[:, t:t + 1], rows[:, t:t + 1], state) for t in range(5, 13)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-6, rtol=0)


def test_gradients_reach_rows():
    layer, spec = _layer()
    rows = torch.randn(2, 6, 4, 4, requires_grad=True)
    layer(torch.randn(2, 6, 2, 16), rows).sum().backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0
