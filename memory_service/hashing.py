"""N-gram hashing: compressed token ids -> per-head row ids, bit-identical to the reference.

Reference: `NgramHashMapping` in deepseek-ai/Engram `engram_demo_v1.py`. For layer l,
max_ngram_size odd multipliers are drawn from `default_rng(seed + 10007 * l)` below
`(int64 max // compressed_vocab_size) // 2` (times 2, plus 1). The n-gram ending at
position t mixes tokens t, t-1, .., t-n+1 as XOR of token * multiplier (int64
wrap-around), left-padded with the compressed pad id; head j of order n takes the mix
modulo its own prime. Primes are searched upward from each order's base size, distinct
across every layer, order and head, in layer -> order -> head order.

Pure numpy (this module must not import torch, grpc, lmdb or ray); no Python loop
per token: one pass per n-gram order and one broadcast modulo per order.
"""

from __future__ import annotations

import numpy as np

from memory_service.errors import InvalidArgument
from memory_service.spec import EngramSpec

_HASH_SEED_STRIDE = 10007  # the reference's PRIME_1
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # exact for n < 3.3e24


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin primality test (exact for all 64-bit and larger sizes used here)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_unused_prime(start: int, used: set[int]) -> int:
    """Smallest prime > start that is not in `used` (the reference's find_next_prime)."""
    candidate = start + 1
    while not (is_prime(candidate) and candidate not in used):
        candidate += 1
    return candidate


def head_sizes_for_spec(spec: EngramSpec) -> dict[int, list[list[int]]]:
    """Prime table size of every head: {layer_id: [[primes of order 2], [order 3], ...]}."""
    used: set[int] = set()
    sizes: dict[int, list[list[int]]] = {}
    for layer_id in spec.layer_ids:
        per_order = []
        for base in spec.engram_vocab_size:
            primes, start = [], base - 1
            for _ in range(spec.n_head_per_ngram):
                prime = next_unused_prime(start, used)
                used.add(prime)
                primes.append(prime)
                start = prime
            per_order.append(primes)
        sizes[layer_id] = per_order
    return sizes


def layer_multipliers(spec: EngramSpec, compressed_vocab_size: int, layer_id: int) -> np.ndarray:
    """The odd int64 multipliers of one layer, [max_ngram_size]."""
    half_bound = max(1, (int(np.iinfo(np.int64).max) // compressed_vocab_size) // 2)
    rng = np.random.default_rng(int(spec.seed + _HASH_SEED_STRIDE * int(layer_id)))
    draws = rng.integers(low=0, high=half_bound, size=(spec.max_ngram_size,), dtype=np.int64)
    return draws * 2 + 1


class NgramHasher:
    """Hashes compressed token ids into per-head ids and row ids for every Engram layer."""

    def __init__(self, spec: EngramSpec, compressed_vocab_size: int | None = None, compressed_pad_id: int | None = None):
        """`compressed_pad_id` is the pad id after compression (default: spec.pad_id taken as already compressed)."""
        vocab = compressed_vocab_size if compressed_vocab_size is not None else spec.compressed_vocab_size
        if vocab is None:
            raise InvalidArgument("NgramHasher needs the compressed vocabulary size: pass it or bind the spec to a compression map")
        if int(vocab) < 1:
            raise InvalidArgument(f"compressed_vocab_size must be >= 1, got {vocab}")
        self.spec = spec
        self.compressed_vocab_size = int(vocab)
        pad = spec.pad_id if compressed_pad_id is None else int(compressed_pad_id)
        if not 0 <= pad < self.compressed_vocab_size:
            raise InvalidArgument(f"compressed pad id {pad} is outside the compressed vocabulary [0, {self.compressed_vocab_size})")
        self.pad_id = pad
        self._head_sizes = head_sizes_for_spec(spec)
        self._multipliers = {l: layer_multipliers(spec, self.compressed_vocab_size, l) for l in spec.layer_ids}
        self._primes = {l: np.asarray([p for order in s for p in order], dtype=np.int64) for l, s in self._head_sizes.items()}
        self._offsets = {}
        self._layer_base = {}
        base = 0
        for layer_id in spec.layer_ids:
            primes = self._primes[layer_id]
            self._offsets[layer_id] = np.concatenate([[0], np.cumsum(primes)[:-1]]).astype(np.int64)
            self._layer_base[layer_id] = base
            base += int(primes.sum())
        self.total_rows = base

    @classmethod
    def from_compressor(cls, spec: EngramSpec, compressor) -> "NgramHasher":
        """Hasher for a CompressedTokenizer: its size, and spec.pad_id mapped through it."""
        if spec.pad_id >= compressor.vocab_size:
            raise InvalidArgument(f"pad_id {spec.pad_id} is outside the tokenizer vocabulary [0, {compressor.vocab_size})")
        return cls(spec, len(compressor), int(compressor.lookup_table[spec.pad_id]))

    # ------------------------------------------------------------------ sizes
    def _check_layer(self, layer_id: int) -> int:
        if layer_id not in self._primes:
            raise InvalidArgument(f"layer {layer_id} has no Engram tables; the spec's layer_ids are {list(self.spec.layer_ids)}")
        return layer_id

    def head_sizes(self, layer_id: int) -> list[list[int]]:
        """Primes of one layer, a list per n-gram order (the reference's vocab_size_across_layers[layer_id])."""
        return [list(order) for order in self._head_sizes[self._check_layer(layer_id)]]

    def multipliers(self, layer_id: int) -> np.ndarray:
        """The hash multipliers of one layer, [max_ngram_size]."""
        return self._multipliers[self._check_layer(layer_id)].copy()

    def head_offsets(self, layer_id: int) -> np.ndarray:
        """First row of each head within the layer's table, int64 [num_heads]."""
        return self._offsets[self._check_layer(layer_id)].copy()

    def layer_num_rows(self, layer_id: int) -> int:
        """Rows in one layer's table (sum of its heads' primes)."""
        return int(self._primes[self._check_layer(layer_id)].sum())

    def layer_row_base(self, layer_id: int) -> int:
        """First global row of a layer's table when all layers share one row space."""
        return self._layer_base[self._check_layer(layer_id)]

    # ------------------------------------------------------------------ hashing
    def _padded(self, compressed_ids, history) -> np.ndarray:
        """[B, P + T] ids with P = max_ngram_size - 1 columns of history (or pad) in front."""
        ids = np.asarray(compressed_ids)
        if ids.ndim != 2:
            raise InvalidArgument(f"compressed ids must be a [batch, time] array, got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise InvalidArgument(f"compressed ids must be integers, got dtype {ids.dtype}")
        context = self.spec.max_ngram_size - 1
        if history is None:
            history = np.full((ids.shape[0], context), self.pad_id, dtype=np.int64)
        else:
            history = np.asarray(history)
            if history.shape != (ids.shape[0], context):
                raise InvalidArgument(f"history must be [batch={ids.shape[0]}, max_ngram_size-1={context}], got {history.shape}")
        padded = np.concatenate([history.astype(np.int64, copy=False), ids.astype(np.int64, copy=False)], axis=1)
        if padded.size:
            low, high = int(padded.min()), int(padded.max())
            if low < 0 or high >= self.compressed_vocab_size:
                bad = low if low < 0 else high
                raise InvalidArgument(
                    f"compressed id {bad} is outside the compressed vocabulary [0, {self.compressed_vocab_size})"
                )
        return padded

    def _layer_hash(self, padded: np.ndarray, num_tokens: int, layer_id: int) -> np.ndarray:
        """Per-head hashes of one layer, int64 [B, T, num_heads]."""
        spec = self.spec
        context = spec.max_ngram_size - 1
        multipliers = self._multipliers[layer_id]
        primes = self._primes[layer_id]
        batch = padded.shape[0]
        out = np.empty((batch, num_tokens, spec.num_heads), dtype=np.int64)
        # token k positions back: padded[:, context - k : context - k + T]
        mix = padded[:, context:context + num_tokens] * multipliers[0]  # [B, T]
        for k in range(1, spec.max_ngram_size):
            mix = np.bitwise_xor(mix, padded[:, context - k:context - k + num_tokens] * multipliers[k])
            order_heads = slice((k - 1) * spec.n_head_per_ngram, k * spec.n_head_per_ngram)
            # Python's floored modulo: a negative (wrapped) mix still lands in [0, prime).
            np.remainder(mix[:, :, None], primes[None, None, order_heads], out=out[:, :, order_heads])
        return out

    def hash(self, compressed_ids, history=None, layers=None) -> dict[int, np.ndarray]:
        """{layer_id: int64 [B, T, num_heads]} per-head hashes of compressed ids [B, T].

        `history` ([B, max_ngram_size - 1], compressed) holds the tokens before the first
        column, for incremental decoding; without it the n-grams are left-padded with the pad id.
        `layers` restricts the result to some layers (default: all).
        """
        padded = self._padded(compressed_ids, history)
        num_tokens = padded.shape[1] - (self.spec.max_ngram_size - 1)
        layers = self.spec.layer_ids if layers is None else [self._check_layer(l) for l in layers]
        return {l: self._layer_hash(padded, num_tokens, l) for l in layers}

    def row_ids(self, compressed_ids, history=None, global_ids: bool = False, layers=None) -> dict[int, np.ndarray]:
        """{layer_id: int64 [B, T, num_heads]} rows of each layer's table (hash + head offset).

        Local ids index one layer's table, the reference's `multi_head_embedding.embedding`;
        with global_ids=True the layer's base row is added so all layers share one row space.
        """
        hashes = self.hash(compressed_ids, history, layers)
        for layer_id, h in hashes.items():
            h += self._offsets[layer_id]
            if global_ids:
                h += self._layer_base[layer_id]
        return hashes
