import dataclasses
from dataclasses import dataclass, field
from typing import List

import numpy as np
import pytest

from memory_service.spec import EngramSpec


@dataclass
class ReferenceEngramConfig:
    """Field-for-field the reference repository's EngramConfig (its defaults)."""

    tokenizer_name_or_path: str = "deepseek-ai/DeepSeek-V3"
    engram_vocab_size: List[int] = field(default_factory=lambda: [129280 * 5, 129280 * 5])
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    layer_ids: List[int] = field(default_factory=lambda: [1, 15])
    pad_id: int = 2
    seed: int = 0
    kernel_size: int = 4


def test_reference_config_constructs_unchanged():
    ref = ReferenceEngramConfig()
    spec = EngramSpec(**dataclasses.asdict(ref))
    assert spec.engram_vocab_size == (646400, 646400)
    assert spec.layer_ids == (1, 15)
    assert spec.head_dim == 64 and spec.num_heads == 16 and spec.engram_hidden_size == 1024
    assert spec.tokenizer_name_or_path == "deepseek-ai/DeepSeek-V3"
    assert spec == EngramSpec.from_dict(dataclasses.asdict(ref))


@pytest.mark.parametrize("changes, message", [
    (dict(engram_vocab_size=[1000]), "one size per n-gram order"),
    (dict(max_ngram_size=1, engram_vocab_size=[]), r"max_ngram_size must be in \[2, 16\]"),
    (dict(n_embed_per_ngram=30, n_head_per_ngram=4), "must be divisible by"),
    (dict(layer_ids=[]), "at least one layer"),
    (dict(layer_ids=[1, 1]), "must not repeat"),
    (dict(layer_ids=[-1]), r"layer_ids must be at most 64 layers in \[0, 4095\]"),
    (dict(layer_ids=[2**40]), "layer_ids must be at most"),
    (dict(n_embed_per_ngram=2**30, n_head_per_ngram=2), "n_embed_per_ngram must be in"),
    (dict(n_head_per_ngram=512, n_embed_per_ngram=512), "n_head_per_ngram must be in"),
    (dict(seed=-1), "seed must be in"),
    (dict(layer_ids=list(range(40)), n_head_per_ngram=256, n_embed_per_ngram=256), "hash heads"),
    (dict(engram_vocab_size=[1, 1000]), "must be >= 2"),
    (dict(n_head_per_ngram=0), r"n_head_per_ngram must be in \[1, 256\]"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(pad_id=-3), "pad_id"),
    (dict(layer_ids=5), "list of integers"),
    (dict(engram_vocab_size=[10.5, 20]), "must hold integers"),
    (dict(compressed_vocab_size=0), "compressed_vocab_size"),
])
def test_invalid_specs_raise_precise_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        EngramSpec(**{**dataclasses.asdict(ReferenceEngramConfig()), **changes})


def test_fingerprint_is_stable_and_sensitive():
    a = EngramSpec(engram_vocab_size=[1000, 1000], layer_ids=[1])
    b = EngramSpec(engram_vocab_size=(1000, 1000), layer_ids=(1,))
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 32
    assert dataclasses.replace(a, seed=1).fingerprint() != a.fingerprint()
    assert dataclasses.replace(a, dtype="float16").fingerprint() != a.fingerprint()
    # the tokenizer name is informational only
    assert dataclasses.replace(a, tokenizer_name_or_path="x").fingerprint() == a.fingerprint()
    bound = a.with_compression(np.arange(10), 10)
    assert bound.fingerprint() != a.fingerprint()
    other_map = a.with_compression(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 9]), 10)
    assert other_map.fingerprint() != bound.fingerprint()


def test_json_roundtrip_and_unknown_fields():
    spec = EngramSpec(engram_vocab_size=[500, 600, 700], max_ngram_size=4, layer_ids=[0, 3], dtype="float16")
    assert EngramSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="unknown EngramSpec fields"):
        EngramSpec.from_dict({**dataclasses.asdict(spec), "hidden_size": 3})
