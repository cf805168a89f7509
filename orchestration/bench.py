"""`engram bench ...`: throughput figures with a baseline measured in the same run.

The machine is shared and noisy, so every benchmark reports a ratio against a baseline
timed in the same process right beside it, after a warm-up; absolute numbers drift.
"""

from __future__ import annotations

import time

import numpy as np

from memory_service.hashing import NgramHasher
from memory_service.spec import EngramSpec


def best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls (after one warm-up call), in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def hash_per_head_baseline(hasher: NgramHasher, ids: np.ndarray) -> dict[int, np.ndarray]:
    """Straightforward hashing: padded shifts per order, one modulo and one array per head, then a stack."""
    spec = hasher.spec
    batch, time_len = ids.shape
    out = {}
    for layer_id in spec.layer_ids:
        mult = hasher.multipliers(layer_id)
        shifts = [ids] + [np.pad(ids, ((0, 0), (k, 0)), constant_values=hasher.pad_id)[:, :time_len]
                          for k in range(1, spec.max_ngram_size)]
        heads = []
        for n, primes in zip(range(2, spec.max_ngram_size + 1), hasher.head_sizes(layer_id)):
            mix = shifts[0] * mult[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * mult[k])
            heads.extend(mix % p for p in primes)
        out[layer_id] = np.stack(heads, axis=2)
    return out


def bench_hash(num_tokens: int = 262144, repeats: int = 5) -> dict:
    """Hash num_tokens compressed ids for two layers (reference-sized config): ours vs the per-head baseline."""
    spec = EngramSpec(engram_vocab_size=(129280 * 5, 129280 * 5), max_ngram_size=3, n_embed_per_ngram=512,
                      n_head_per_ngram=8, layer_ids=(1, 15), pad_id=2, seed=0)
    compressed_vocab = 99_000  # about a 128k vocabulary after the paper's 23% reduction
    hasher = NgramHasher(spec, compressed_vocab)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, compressed_vocab, size=(num_tokens // 4096 or 1, min(num_tokens, 4096)), dtype=np.int64)
    tokens = ids.size
    ours = best_time(lambda: hasher.hash(ids), repeats)
    baseline = best_time(lambda: hash_per_head_baseline(hasher, ids), repeats)
    same = all(np.array_equal(a, b) for a, b in zip(hasher.hash(ids).values(), hash_per_head_baseline(hasher, ids).values()))
    result = {
        "tokens": tokens, "layers": len(spec.layer_ids), "heads_per_layer": spec.num_heads,
        "ours_s": ours, "baseline_s": baseline,
        "ours_tokens_per_s": tokens / ours, "baseline_tokens_per_s": tokens / baseline,
        "speedup_vs_baseline": baseline / ours, "identical": same,
    }
    result["lines"] = [
        f"hash {tokens:,} tokens x {len(spec.layer_ids)} layers x {spec.num_heads} heads",
        f"  ours      {ours * 1e3:8.2f} ms   {tokens / ours / 1e6:8.2f} M tokens/s",
        f"  baseline  {baseline * 1e3:8.2f} ms   {tokens / baseline / 1e6:8.2f} M tokens/s   (per-head modulo + stack)",
        f"  ours / baseline speed: {baseline / ours:.2f}x   identical ids: {same}",
    ]
    return result
