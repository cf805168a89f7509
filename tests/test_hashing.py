"""Hashing is checked two ways: against golden vectors produced by running the reference
NgramHashMapping, and against a slow per-token re-derivation of its algorithm written here."""

import numpy as np
import pytest

from memory_service.compression import CompressedTokenizer
from memory_service.hashing import NgramHasher, head_sizes_for_spec, is_prime
from memory_service.spec import EngramSpec

TOKENIZERS = {"bytelevel": "tokenizer_bytelevel.json", "metaspace": "tokenizer_metaspace.json"}


def _spec_and_compressor(case, data_dir):
    config = dict(case["config"])
    tokenizer = config.pop("tokenizer")
    return EngramSpec(**config), CompressedTokenizer.from_tokenizer_file(data_dir / tokenizer)


@pytest.mark.parametrize("name", ["bytelevel_n3", "metaspace_n4", "bytelevel_refsizes"])
def test_hashes_equal_reference_golden_vectors(name, data_dir, reference_hashing):
    case = reference_hashing[name]
    spec, compressor = _spec_and_compressor(case, data_dir)
    hasher = NgramHasher.from_compressor(spec, compressor)
    assert hasher.pad_id == case["compressed_pad_id"]
    for layer_id in spec.layer_ids:
        assert hasher.head_sizes(layer_id) == case["head_sizes"][str(layer_id)]
        assert hasher.multipliers(layer_id).tolist() == case["multipliers"][str(layer_id)]
    for input_name, raw in case["inputs"].items():
        hashes = hasher.hash(compressor(np.asarray(raw)))
        assert sorted(hashes) == sorted(spec.layer_ids)
        for layer_id, got in hashes.items():
            want = np.asarray(case["hashes"][input_name][str(layer_id)], dtype=np.int64)
            assert got.dtype == np.int64 and got.shape == want.shape == (*np.asarray(raw).shape, spec.num_heads)
            np.testing.assert_array_equal(got, want, err_msg=f"{name}/{input_name}/layer {layer_id}")


# ---------------------------------------------------------------- slow re-derivation
def _slow_prime(n):
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _wrap64(x):
    return (x + 2**63) % 2**64 - 2**63


def slow_reference_hash(ids, spec, vocab, pad):
    """Per-token Python re-derivation of the reference algorithm (independent of the vectorised code)."""
    seen, sizes = set(), {}
    for layer in spec.layer_ids:
        sizes[layer] = []
        for base in spec.engram_vocab_size:
            heads, start = [], base - 1
            for _ in range(spec.n_head_per_ngram):
                c = start + 1
                while not (_slow_prime(c) and c not in seen):
                    c += 1
                seen.add(c)
                heads.append(c)
                start = c
            sizes[layer].append(heads)
    half = max(1, (2**63 - 1) // vocab // 2)
    out = {}
    for layer in spec.layer_ids:
        rng = np.random.default_rng(spec.seed + 10007 * layer)
        mult = [int(m) * 2 + 1 for m in rng.integers(0, half, size=spec.max_ngram_size, dtype=np.int64)]
        B, T = ids.shape
        res = np.zeros((B, T, spec.num_heads), dtype=np.int64)
        for b in range(B):
            for t in range(T):
                col = 0
                for n in range(2, spec.max_ngram_size + 1):
                    mix = 0
                    for k in range(n):
                        tok = int(ids[b, t - k]) if t - k >= 0 else pad
                        mix ^= _wrap64(tok * mult[k])
                    for p in sizes[layer][n - 2]:
                        res[b, t, col] = mix % p
                        col += 1
        out[layer] = res
    return out, sizes


@pytest.mark.parametrize("config", [
    dict(engram_vocab_size=[97, 101], max_ngram_size=3, n_head_per_ngram=3, n_embed_per_ngram=12, layer_ids=[0, 1], seed=0),
    dict(engram_vocab_size=[50], max_ngram_size=2, n_head_per_ngram=5, n_embed_per_ngram=10, layer_ids=[4], seed=3),
    dict(engram_vocab_size=[300, 200, 100, 90], max_ngram_size=5, n_head_per_ngram=2, n_embed_per_ngram=8, layer_ids=[1, 7, 2], seed=11),
    dict(engram_vocab_size=[10007, 10007, 10007], max_ngram_size=4, n_head_per_ngram=4, n_embed_per_ngram=16, layer_ids=[2, 15], seed=5),
])
@pytest.mark.parametrize("vocab", [7, 4986, 129280])
def test_hashes_equal_slow_rederivation(config, vocab):
    spec = EngramSpec(**config, pad_id=1)
    rng = np.random.default_rng(vocab)
    ids = rng.integers(0, vocab, size=(2, 23))
    ids[0, 3:6] = 1
    hasher = NgramHasher(spec, vocab, compressed_pad_id=1)
    want, sizes = slow_reference_hash(ids, spec, vocab, pad=1)
    got = hasher.hash(ids)
    for layer in spec.layer_ids:
        assert hasher.head_sizes(layer) == sizes[layer]
        np.testing.assert_array_equal(got[layer], want[layer])


def test_primes_distinct_across_layers_orders_heads():
    spec = EngramSpec(engram_vocab_size=[1000, 1000], n_head_per_ngram=8, n_embed_per_ngram=64, layer_ids=[1, 15, 20])
    sizes = head_sizes_for_spec(spec)
    flat = [p for layer in sizes.values() for order in layer for p in order]
    assert len(flat) == len(set(flat)) == 48
    assert all(_slow_prime(p) for p in flat)
    assert sizes[1][0][0] == 1009  # first prime >= 1000
    assert [is_prime(n) for n in range(200)] == [_slow_prime(n) for n in range(200)]
    assert is_prime(2**61 - 1) and not is_prime(2**61 + 1)


def test_incremental_hashing_with_history_equals_full():
    spec = EngramSpec(engram_vocab_size=[500, 600, 700], max_ngram_size=4, n_head_per_ngram=2, n_embed_per_ngram=8, layer_ids=[0, 3])
    hasher = NgramHasher(spec, 1000, compressed_pad_id=2)
    ids = np.random.default_rng(0).integers(0, 1000, size=(3, 40))
    full = hasher.hash(ids)
    for t in (0, 1, 2, 3, 17, 39):
        history = np.concatenate([np.full((3, 3), 2), ids], axis=1)[:, t:t + 3]
        step = hasher.hash(ids[:, t:t + 1], history=history)
        for layer in spec.layer_ids:
            np.testing.assert_array_equal(step[layer][:, 0], full[layer][:, t])


def test_row_ids_offsets_and_global_space():
    spec = EngramSpec(engram_vocab_size=[100, 200], n_head_per_ngram=2, n_embed_per_ngram=8, layer_ids=[1, 4])
    hasher = NgramHasher(spec, 50, compressed_pad_id=0)
    ids = np.random.default_rng(1).integers(0, 50, size=(2, 9))
    hashes, rows, global_rows = hasher.hash(ids), hasher.row_ids(ids), hasher.row_ids(ids, global_ids=True)
    for layer in spec.layer_ids:
        primes = np.asarray([p for order in hasher.head_sizes(layer) for p in order])
        offsets = np.concatenate([[0], np.cumsum(primes)[:-1]])
        np.testing.assert_array_equal(hasher.head_offsets(layer), offsets)
        np.testing.assert_array_equal(rows[layer], hashes[layer] + offsets)
        assert rows[layer].max() < hasher.layer_num_rows(layer) == primes.sum()
        np.testing.assert_array_equal(global_rows[layer], rows[layer] + hasher.layer_row_base(layer))
    assert hasher.layer_row_base(4) == hasher.layer_num_rows(1)
    assert hasher.total_rows == hasher.layer_num_rows(1) + hasher.layer_num_rows(4)


def test_bad_inputs_raise_clear_errors():
    spec = EngramSpec(engram_vocab_size=[100, 200], n_head_per_ngram=2, n_embed_per_ngram=8, layer_ids=[1])
    hasher = NgramHasher(spec, 50, compressed_pad_id=0)
    with pytest.raises(ValueError, match=r"compressed id 50 is outside the compressed vocabulary \[0, 50\)"):
        hasher.hash(np.array([[1, 50]]))
    with pytest.raises(ValueError, match="compressed id -2"):
        hasher.hash(np.array([[-2, 3]]))
    with pytest.raises(ValueError, match=r"\[batch, time\] array, got shape \(3,\)"):
        hasher.hash(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="must be integers"):
        hasher.hash(np.array([[1.5]]))
    with pytest.raises(ValueError, match="history must be"):
        hasher.hash(np.array([[1, 2]]), history=np.zeros((1, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="layer 3 has no Engram tables"):
        hasher.head_sizes(3)
    with pytest.raises(ValueError, match="needs the compressed vocabulary size"):
        NgramHasher(spec)
    with pytest.raises(ValueError, match="compressed pad id 60"):
        NgramHasher(spec, 50, compressed_pad_id=60)


def test_hashing_does_not_import_heavy_packages():
    import subprocess
    import sys

    code = ("import sys, memory_service.hashing, memory_service.compression, memory_service.spec; "
            "bad=[m for m in ('torch','grpc','lmdb','ray') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
