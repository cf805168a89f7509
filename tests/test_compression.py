import numpy as np
import pytest

from memory_service.compression import CompressedTokenizer

TOKENIZERS = {"bytelevel_n3": "tokenizer_bytelevel.json", "metaspace_n4": "tokenizer_metaspace.json"}


@pytest.mark.parametrize("case", sorted(TOKENIZERS))
def test_map_equals_reference(case, data_dir, reference_hashing):
    """The old->new map equals the one the reference CompressedTokenizer built for the same tokenizer.json."""
    compressor = CompressedTokenizer.from_tokenizer_file(data_dir / TOKENIZERS[case])
    expected = np.asarray(reference_hashing[case]["lookup_table"])
    assert compressor.lookup_table.dtype == np.int64
    np.testing.assert_array_equal(compressor.lookup_table, expected)
    assert len(compressor) == reference_hashing[case]["compressed_vocab_size"]
    assert 0.1 < compressor.reduction < 0.6


def test_rules_merge_case_accent_and_space_variants(data_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data_dir / "tokenizer_bytelevel.json"))
    compressor = CompressedTokenizer.from_tokenizer(tok)
    ids = {t: tok.token_to_id(t) for t in ("Python", "PYTHON")}
    assert compressor(np.array([ids["Python"]]))[0] == compressor(np.array([ids["PYTHON"]]))[0]
    # A partial UTF-8 byte decodes to U+FFFD and keys on its raw token: two such bytes stay distinct.
    partial = [i for i in range(tok.get_vocab_size()) if "\ufffd" in tok.decode([i])]
    assert len(partial) >= 2
    assert len(set(compressor(np.array(partial)).tolist())) == len(set(tok.id_to_token(i) for i in partial))
    # first-occurrence order: the first id keeps new id 0 and new ids never skip
    assert compressor.lookup_table[0] == 0
    assert np.all(np.diff(np.maximum.accumulate(compressor.lookup_table)) <= 1)


def test_save_load_roundtrip(tmp_path, data_dir):
    compressor = CompressedTokenizer.from_tokenizer_file(data_dir / "tokenizer_metaspace.json")
    compressor.save(tmp_path / "map.npy")
    loaded = CompressedTokenizer.load(tmp_path / "map.npy")
    np.testing.assert_array_equal(loaded.lookup_table, compressor.lookup_table)
    assert len(loaded) == len(compressor)


def test_out_of_vocabulary_ids_raise(data_dir):
    compressor = CompressedTokenizer.from_tokenizer_file(data_dir / "tokenizer_metaspace.json")
    with pytest.raises(ValueError, match=r"token id 800 at index \(0, 2\) is outside the tokenizer vocabulary \[0, 800\)"):
        compressor(np.array([[1, 2, 800]]))
    with pytest.raises(ValueError, match="token id -1"):
        compressor(np.array([-1, 3]))
    with pytest.raises(ValueError, match="must be integers"):
        compressor(np.array([1.0, 2.0]))


def test_missing_or_bad_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found: .*nope.json"):
        CompressedTokenizer.from_tokenizer_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers tokenizer.json"):
        CompressedTokenizer.from_tokenizer_file(bad)
    with pytest.raises(FileNotFoundError, match="compression map not found"):
        CompressedTokenizer.load(tmp_path / "none.npy")


def test_invalid_maps_rejected():
    with pytest.raises(ValueError, match="not dense"):
        CompressedTokenizer(np.array([0, 2, 2]))
    with pytest.raises(ValueError, match="negative"):
        CompressedTokenizer(np.array([0, -1]))
