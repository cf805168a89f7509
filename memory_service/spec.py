"""EngramSpec: the one description of an Engram table set.

Field names follow the reference `EngramConfig` (deepseek-ai/Engram,
`engram_demo_v1.py`) so a reference config maps 1:1:
`EngramSpec(**dataclasses.asdict(reference_cfg))` works unchanged. The fields that
the reference does not have (compressed vocabulary, row dtype) have defaults.

The spec's fingerprint travels in every RPC of the memory service; two parties
whose fingerprints differ disagree on row ids or row layout and must not talk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from memory_service.row_dtypes import FP8_BLOCK, FP8_BLOCK_SCALED, ROW_DTYPES, row_dtype, row_width
from memory_service.row_optim import OPTIMIZER_STATES

_INT64_MAX = int(np.iinfo(np.int64).max)

# Limits that keep a spec workable (tables, primes and records a store can build); far above any real model's
# (DeepSeek-V4.1: n-grams 2..4, 8 heads of 256 per order, layers 1 and 14).
MAX_NGRAM_SIZE = 16
MAX_HEADS_PER_NGRAM = 256
MAX_EMBED_PER_NGRAM = 1 << 16
MAX_LAYER_ID = 4095
MAX_LAYERS = 64
MAX_TOTAL_HEADS = 1 << 14  # layers x orders x heads: each head's prime is searched for
MAX_KERNEL_SIZE = 64
MAX_PAD_ID = (1 << 40) - 1


def _as_int_tuple(name: str, value) -> tuple[int, ...]:
    """Turn a list/tuple/array of integers into a tuple of Python ints, or raise ValueError."""
    if isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a list of integers, got the single integer {value}")
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a list of integers, got {value!r}") from None
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise ValueError(f"{name} must hold integers, got {item!r} in {value!r}")
        out.append(int(item))
    return tuple(out)


@dataclass(frozen=True)
class EngramSpec:
    """Hashing and layout of the Engram tables of one model (reference field names)."""

    engram_vocab_size: tuple[int, ...] = field(default=(129280 * 5, 129280 * 5))
    """Base table size per n-gram order 2..max_ngram_size; each head's size is the next
    unused prime at or above it."""
    max_ngram_size: int = 3
    """Largest n-gram order; orders 2..max_ngram_size are hashed."""
    n_embed_per_ngram: int = 512
    """Width of one n-gram order's embedding, split evenly over its heads."""
    n_head_per_ngram: int = 8
    """Hash heads per n-gram order; each head has its own prime-sized table."""
    layer_ids: tuple[int, ...] = field(default=(1, 15))
    """Transformer layers that carry an Engram module (each has its own tables)."""
    pad_id: int = 2
    """Raw tokenizer id used to left-pad n-grams at the start of a sequence."""
    seed: int = 0
    """Seed of the hash multipliers (layer l draws from seed + 10007 * l)."""
    kernel_size: int = 4
    """Kernel of the causal depthwise short conv (its dilation is max_ngram_size)."""
    tokenizer_name_or_path: str | None = None
    """Reference field, kept for 1:1 mapping; informational, not part of the fingerprint."""
    compressed_vocab_size: int | None = None
    """Size of the compressed vocabulary the hashes run over (None until a map is bound)."""
    compression_digest: str = ""
    """sha256 of the compression map (old id -> new id), '' until a map is bound."""
    dtype: str = "float32"
    """Row format in the tables and on the wire: a float dtype, or "fp8_e4m3_b32" (row_dtypes.py)."""
    optimizer_state: str = "exact"
    """Row-wise Adam state a store keeps per row: "exact" (m, v per value, float32) or "compact" (m in bfloat16, one v
    per row): row_optim.py. Invisible to clients, so not part of the fingerprint."""

    def __post_init__(self):
        object.__setattr__(self, "engram_vocab_size", _as_int_tuple("engram_vocab_size", self.engram_vocab_size))
        object.__setattr__(self, "layer_ids", _as_int_tuple("layer_ids", self.layer_ids))
        for name in ("max_ngram_size", "n_embed_per_ngram", "n_head_per_ngram", "pad_id", "seed", "kernel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot work."""
        if not 2 <= self.max_ngram_size <= MAX_NGRAM_SIZE:
            raise ValueError(f"max_ngram_size must be in [2, {MAX_NGRAM_SIZE}] (bigrams are the smallest order), "
                             f"got {self.max_ngram_size}")
        num_orders = self.max_ngram_size - 1
        if len(self.engram_vocab_size) != num_orders:
            raise ValueError(
                f"engram_vocab_size needs one size per n-gram order 2..{self.max_ngram_size} "
                f"({num_orders} values), got {len(self.engram_vocab_size)}: {list(self.engram_vocab_size)}"
            )
        for order, size in enumerate(self.engram_vocab_size, start=2):
            if size < 2:
                raise ValueError(f"engram_vocab_size for {order}-grams must be >= 2, got {size}")
            if size > 2**40:
                raise ValueError(f"engram_vocab_size for {order}-grams is {size}; above 2**40 rows per head is not supported")
        if not 1 <= self.n_head_per_ngram <= MAX_HEADS_PER_NGRAM:
            raise ValueError(f"n_head_per_ngram must be in [1, {MAX_HEADS_PER_NGRAM}], got {self.n_head_per_ngram}")
        if not 1 <= self.n_embed_per_ngram <= MAX_EMBED_PER_NGRAM:
            raise ValueError(f"n_embed_per_ngram must be in [1, {MAX_EMBED_PER_NGRAM}], got {self.n_embed_per_ngram}")
        if self.n_embed_per_ngram % self.n_head_per_ngram:
            raise ValueError(
                f"n_embed_per_ngram ({self.n_embed_per_ngram}) must be divisible by "
                f"n_head_per_ngram ({self.n_head_per_ngram}): each head gets an equal slice"
            )
        if not self.layer_ids:
            raise ValueError("layer_ids must name at least one layer")
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"layer_ids must not repeat a layer, got {list(self.layer_ids)}")
        if len(self.layer_ids) > MAX_LAYERS or min(self.layer_ids) < 0 or max(self.layer_ids) > MAX_LAYER_ID:
            raise ValueError(f"layer_ids must be at most {MAX_LAYERS} layers in [0, {MAX_LAYER_ID}], "
                             f"got {list(self.layer_ids)[:8]}{'...' if len(self.layer_ids) > 8 else ''}")
        if len(self.layer_ids) * num_orders * self.n_head_per_ngram > MAX_TOTAL_HEADS:
            raise ValueError(f"{len(self.layer_ids)} layers x {num_orders} orders x {self.n_head_per_ngram} heads is over "
                             f"the {MAX_TOTAL_HEADS} hash heads a table set may have")
        if not 0 <= self.pad_id <= MAX_PAD_ID:
            raise ValueError(f"pad_id must be in [0, 2**40), got {self.pad_id}")
        if not 0 <= self.seed <= _INT64_MAX:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if not 1 <= self.kernel_size <= MAX_KERNEL_SIZE:
            raise ValueError(f"kernel_size must be in [1, {MAX_KERNEL_SIZE}], got {self.kernel_size}")
        if self.dtype not in ROW_DTYPES:
            raise ValueError(f"dtype must be one of {ROW_DTYPES}, got {self.dtype!r}")
        if self.dtype == FP8_BLOCK_SCALED and self.head_dim % FP8_BLOCK:
            raise ValueError(f"{FP8_BLOCK_SCALED} rows need a head_dim divisible by {FP8_BLOCK}, got {self.head_dim}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATES}, got {self.optimizer_state!r}")
        if self.compressed_vocab_size is not None:
            if isinstance(self.compressed_vocab_size, bool) or not isinstance(self.compressed_vocab_size, (int, np.integer)):
                raise ValueError(f"compressed_vocab_size must be an integer, got {self.compressed_vocab_size!r}")
            if not 1 <= int(self.compressed_vocab_size) <= _INT64_MAX // 4:
                raise ValueError(f"compressed_vocab_size must be in [1, 2**61], got {self.compressed_vocab_size}")
            object.__setattr__(self, "compressed_vocab_size", int(self.compressed_vocab_size))

    # ------------------------------------------------------------- derived sizes
    @property
    def num_orders(self) -> int:
        """Number of n-gram orders hashed (2..max_ngram_size)."""
        return self.max_ngram_size - 1

    @property
    def num_heads(self) -> int:
        """Hash heads per layer: all orders' heads, in reference order."""
        return self.num_orders * self.n_head_per_ngram

    @property
    def head_dim(self) -> int:
        """Width of one row (one head's embedding)."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def engram_hidden_size(self) -> int:
        """Width of the concatenated embedding of one token (all heads)."""
        return self.num_orders * self.n_embed_per_ngram

    @property
    def row_nbytes(self) -> int:
        """Bytes of one stored row (head_dim values, or an FP8 record)."""
        return row_width(self.dtype, self.head_dim) * row_dtype(self.dtype).itemsize

    # ------------------------------------------------------------- identity
    def canonical(self) -> dict:
        """The fields that decide row ids and layout, as a plain JSON-able dict."""
        data = dataclasses.asdict(self)
        data.pop("tokenizer_name_or_path")
        data.pop("optimizer_state")
        data["engram_vocab_size"] = list(self.engram_vocab_size)
        data["layer_ids"] = list(self.layer_ids)
        return data

    def hashing(self) -> dict:
        """The fields that decide row ids and table sizes (canonical() without the row format): two specs that agree
        here index the same rows, whatever format each stores them in."""
        data = self.canonical()
        data.pop("dtype")
        return data

    def fingerprint(self) -> str:
        """Stable hex digest of the canonical encoding (includes the compression map digest); computed once per spec
        (every lookup checks it)."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":")).encode()
            cached = hashlib.sha256(blob).hexdigest()[:32]
            object.__setattr__(self, "_fingerprint", cached)  # frozen: not a field, so eq, hash and asdict ignore it
        return cached

    def with_compression(self, lookup_table: np.ndarray, compressed_vocab_size: int) -> "EngramSpec":
        """Return this spec bound to a compression map (its size and digest)."""
        return dataclasses.replace(
            self,
            compressed_vocab_size=int(compressed_vocab_size),
            compression_digest=compression_digest(lookup_table),
        )

    def to_json(self) -> str:
        """Serialise every field (the reference ones included) as JSON."""
        data = dataclasses.asdict(self)
        data["engram_vocab_size"] = list(self.engram_vocab_size)
        data["layer_ids"] = list(self.layer_ids)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EngramSpec":
        """Inverse of to_json; unknown keys raise ValueError."""
        data = json.loads(text)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "EngramSpec":
        """Build from a dict (e.g. a reference config's asdict); unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EngramSpec fields: {unknown}; known fields are {sorted(known)}")
        return cls(**data)


def compression_digest(lookup_table: np.ndarray) -> str:
    """sha256 of a compression map's little-endian int64 bytes."""
    table = np.ascontiguousarray(lookup_table, dtype="<i8")
    return hashlib.sha256(table.tobytes()).hexdigest()
