"""The Engram spec of a DeepSeek-V4.1-style model config (its `engram_*` keys), checked against our layout.

V4.1's config.json (as public loaders read it) describes its Engram tables with:

    engram_layer_ids               [1, 14]
    engram_num_embeddings          [384006168, 384016682]   rows of each layer's table
    engram_max_ngram_size          4                        orders 2..4
    engram_n_heads                 8                        hash heads per order
    engram_head_dim                256                      width of one head's row
    engram_vocab_size              16000000                 base table size, one for every order (or one per order)
    engram_pad_token_id            2
    engram_compressed_vocab_size   99092                    check value of the tokenizer's compression map

Our prime layout (memory_service/hashing.py, the reference demo's) reproduces the row counts
exactly for V4.1's config; a config whose counts it does not reproduce is refused, since its
rows would be indexed differently from how we hash.
"""

from __future__ import annotations

import json
from pathlib import Path

from memory_service.spec import EngramSpec
from memory_service.table_meta import layer_rows_for_spec

REQUIRED = ("engram_layer_ids", "engram_num_embeddings", "engram_max_ngram_size", "engram_n_heads", "engram_head_dim",
            "engram_vocab_size", "engram_pad_token_id")


def load_config(config: dict | str | Path) -> dict:
    """A config dict, or the JSON file holding it."""
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None


def spec_from_config(config: dict | str | Path, seed: int = 0, dtype: str = "float32") -> EngramSpec:
    """The EngramSpec of a V4.1-style config; ValueError when keys are missing or malformed, or when our layout
    does not give the config's row counts."""
    config = load_config(config)
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ValueError(f"the config has no {', '.join(missing)}: not a model config with Engram tables")
    layer_ids = _ints(config, "engram_layer_ids")
    num_rows = _ints(config, "engram_num_embeddings")
    if len(layer_ids) != len(num_rows) or not layer_ids:
        raise ValueError(f"engram_layer_ids {layer_ids} and engram_num_embeddings {num_rows} must pair up, one each")
    max_ngram = _int(config, "engram_max_ngram_size")
    heads, head_dim = _int(config, "engram_n_heads"), _int(config, "engram_head_dim")
    if max_ngram < 2 or heads < 1 or head_dim < 1:
        raise ValueError(f"engram_max_ngram_size must be >= 2 and heads, head_dim >= 1; got {max_ngram}, {heads}, {head_dim}")
    vocab = config["engram_vocab_size"]
    vocab = _ints(config, "engram_vocab_size") if isinstance(vocab, list) else [_int(config, "engram_vocab_size")] * (max_ngram - 1)
    if len(vocab) != max_ngram - 1:
        raise ValueError(f"engram_vocab_size has {len(vocab)} entries; orders 2..{max_ngram} need {max_ngram - 1}")
    spec = EngramSpec(engram_vocab_size=tuple(vocab), max_ngram_size=max_ngram, n_embed_per_ngram=heads * head_dim,
                      n_head_per_ngram=heads, layer_ids=tuple(layer_ids), pad_id=_int(config, "engram_pad_token_id"),
                      seed=seed, dtype=dtype)
    ours = layer_rows_for_spec(spec)
    theirs = dict(zip(layer_ids, num_rows))
    if ours != theirs:
        raise ValueError(f"our hashing layout gives rows {ours} per layer, the config says {theirs}: its tables are "
                         "indexed by another layout (another seed or prime search), so they cannot be served here")
    return spec


def check_compressed_vocab(config: dict | str | Path, compressed_size: int) -> None:
    """Refuse a tokenizer whose compression map's size differs from the config's engram_compressed_vocab_size."""
    config = load_config(config)
    if "engram_compressed_vocab_size" not in config:
        return  # nothing to check against
    expected = _int(config, "engram_compressed_vocab_size")
    if compressed_size != expected:
        raise ValueError(f"the tokenizer compresses to {compressed_size:,} ids, the config says {expected:,}: "
                         "another tokenizer, or another normalisation")


def _int(config: dict, key: str) -> int:
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def _ints(config: dict, key: str) -> list[int]:
    values = config[key]
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{key} must be a list of integers, got {values!r}")
    return values
