"""A DeepSeek-V4.1-style config's engram_* keys give our spec, with its exact row counts, or a clear refusal."""

import json

import pytest

from memory_service.compression import CompressedTokenizer
from memory_service.table_meta import layer_rows_for_spec
from memory_service.v4_config import check_compressed_vocab, spec_from_config

V41 = {"engram_layer_ids": [1, 14], "engram_num_embeddings": [384006168, 384016682], "engram_max_ngram_size": 4,
       "engram_n_heads": 8, "engram_head_dim": 256, "engram_vocab_size": 16000000, "engram_pad_token_id": 2,
       "engram_compressed_vocab_size": 99092, "hidden_size": 4096}


def test_v41_config_gives_its_row_counts_and_geometry(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(V41))
    spec = spec_from_config(path)
    assert layer_rows_for_spec(spec) == {1: 384006168, 14: 384016682}
    assert spec.num_heads == 24 and spec.head_dim == 256 and spec.pad_id == 2  # 8 heads for each of orders 2..4
    assert spec.engram_vocab_size == (16000000,) * 3


def test_configs_our_layout_does_not_reproduce_are_refused():
    with pytest.raises(ValueError, match="our hashing layout gives rows"):
        spec_from_config({**V41, "engram_num_embeddings": [384006168, 384016683]})
    with pytest.raises(ValueError, match="engram_head_dim"):
        spec_from_config({k: v for k, v in V41.items() if k != "engram_head_dim"})
    with pytest.raises(ValueError, match="pair up"):
        spec_from_config({**V41, "engram_layer_ids": [1]})
    with pytest.raises(ValueError, match="orders 2..4 need 3"):
        spec_from_config({**V41, "engram_vocab_size": [16000000, 16000000]})
    with pytest.raises(ValueError, match="must be an integer"):
        spec_from_config({**V41, "engram_n_heads": "8"})


def test_a_scaled_down_config_and_the_compressed_vocabulary_check(small_tokenizer):
    small = {**V41, "engram_vocab_size": [3001, 3001, 3001], "engram_n_heads": 8, "engram_head_dim": 16}
    with pytest.raises(ValueError, match="our hashing layout gives rows"):
        spec_from_config({**small, "engram_num_embeddings": [1, 1]})
    spec = spec_from_config(_with_rows(small))
    assert set(layer_rows_for_spec(spec)) == {1, 14} and spec.num_heads == 24 and spec.head_dim == 16
    compressed = len(CompressedTokenizer.from_tokenizer_file(small_tokenizer))
    check_compressed_vocab({**small, "engram_compressed_vocab_size": compressed}, compressed)
    with pytest.raises(ValueError, match="compresses to"):
        check_compressed_vocab(V41, compressed)


def _with_rows(config: dict) -> dict:
    """The config with the row counts our layout gives it (as a real scaled-down export would carry)."""
    from memory_service.spec import EngramSpec

    spec = EngramSpec(engram_vocab_size=tuple(config["engram_vocab_size"]), max_ngram_size=4,
                      n_embed_per_ngram=config["engram_n_heads"] * config["engram_head_dim"],
                      n_head_per_ngram=config["engram_n_heads"], layer_ids=(1, 14), pad_id=2, seed=0)
    rows = layer_rows_for_spec(spec)
    return {**config, "engram_num_embeddings": [rows[1], rows[14]]}
