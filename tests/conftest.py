"""Shared fixtures: reference vectors, a small real-text corpus and tokenizer (trained once per session)."""

import json
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def reference_hashing() -> dict:
    """Golden vectors produced by running the reference NgramHashMapping (see tests/data/README.md)."""
    return json.loads((DATA / "reference_hashing.json").read_text())


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A directory of ~80 real standard-library source files (a fraction of the built-in corpus)."""
    from model_worker.data import corpus_files

    root, files = corpus_files()
    picked = [f for f in files if f.parent == root and f.stat().st_size > 4000][:80]
    out = tmp_path_factory.mktemp("corpus")
    for f in picked:
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def small_tokenizer(small_corpus, tmp_path_factory) -> Path:
    """A 1024-token byte-level BPE trained on the small corpus."""
    from model_worker.data import corpus_files, split_texts, train_tokenizer

    root, files = corpus_files(small_corpus)
    train, _ = split_texts(root, files)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(train, 1024, path)
    return path
