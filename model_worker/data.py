"""Built-in corpus and tokenizer: the Python standard library's own source files.

Every machine with Python has this text (about 30 MB of .py files), so nothing is
downloaded. Files are split into train/val by a hash of their relative path (stable
across machines and runs). A byte-level BPE tokenizer is trained locally on the train
split with `tokenizers` and cached, as are the token arrays; `--tokenizer file.json`
and `--data path` replace either.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
DEFAULT_VOCAB_SIZE = 8192


def cache_dir() -> Path:
    """Where tokenizers and token arrays are cached ($ENGRAM_CACHE_DIR or ~/.cache/engram)."""
    path = Path(os.environ.get("ENGRAM_CACHE_DIR", Path.home() / ".cache" / "engram"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def stdlib_root() -> Path:
    """Directory of this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: str | os.PathLike | None = None) -> tuple[Path, list[Path]]:
    """(root, sorted .py/.txt files under root); the stdlib without site-packages by default."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.exists():
        raise FileNotFoundError(f"data path not found: {root}")
    if root.is_file():
        return root.parent, [root]
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix in (".py", ".txt", ".md") and p.is_file()
        and "site-packages" not in p.parts and "__pycache__" not in p.parts
    )
    if not files:
        raise ValueError(f"no .py, .txt or .md files under {root}")
    return root, files


def is_val_file(relpath: str, val_percent: int) -> bool:
    """Deterministic split: a file is in val when the hash of its relative path falls below val_percent."""
    digest = hashlib.sha1(relpath.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < val_percent


def read_text(path: Path) -> str | None:
    """File text as UTF-8, or None if it does not decode (a few stdlib test files are latin-1 on purpose)."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def split_texts(root: Path, files: list[Path], val_percent: int = 3) -> tuple[list[str], list[str]]:
    """(train texts, val texts) by the path-hash split; a single file is split by lines instead."""
    if len(files) == 1:
        text = read_text(files[0]) or ""
        lines = text.splitlines(keepends=True)
        cut = max(1, int(len(lines) * (1 - val_percent / 100)))
        return ["".join(lines[:cut])], ["".join(lines[cut:])]
    train, val = [], []
    for path in files:
        text = read_text(path)
        if text is None or not text.strip():
            continue
        (val if is_val_file(path.relative_to(root).as_posix(), val_percent) else train).append(text)
    if not train or not val:
        raise ValueError(f"corpus under {root} is too small to split into train and val ({len(files)} files)")
    return train, val


def corpus_key(root: Path, files: list[Path]) -> str:
    """Cheap identity of a corpus: relative paths and sizes."""
    h = hashlib.sha1(str(root).encode())
    for path in files:
        h.update(f"{path.relative_to(root).as_posix()}:{path.stat().st_size};".encode())
    return h.hexdigest()[:16]


def train_tokenizer(texts: list[str], vocab_size: int, out_path: Path):
    """Train a byte-level BPE tokenizer on texts and save it as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tmp = _private_tmp(out_path)
    tokenizer.save(str(tmp))
    tmp.replace(out_path)
    return tokenizer


def _private_tmp(path: Path) -> Path:
    """A temporary name beside path that no other process or thread uses (same suffix: np.savez keeps .npz)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizers tokenizer.json, with a clear error when the file is missing or bad."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} (give a tokenizers tokenizer.json, or omit --tokenizer to train one)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{path} is not a valid tokenizers tokenizer.json: {e}") from e


def encode_texts(tokenizer, texts: list[str], eos_id: int) -> np.ndarray:
    """Token ids of all texts, each followed by EOS, as one int32 array."""
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    parts = []
    for enc in encoded:
        parts.append(np.asarray(enc.ids, dtype=np.int32))
        parts.append(np.asarray([eos_id], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


@dataclass
class Corpus:
    """Tokenized train/val streams and the tokenizer that made them."""

    tokenizer_path: Path
    train_ids: np.ndarray  # int32 [N_train]
    val_ids: np.ndarray  # int32 [N_val]
    vocab_size: int
    eos_id: int
    pad_id: int

    def tokenizer(self):
        """The tokenizers.Tokenizer behind the ids."""
        return load_tokenizer(self.tokenizer_path)


def special_id(tokenizer, token: str, fallback: int) -> int:
    """Id of a special token, or `fallback` when the tokenizer does not have it."""
    tid = tokenizer.token_to_id(token)
    return int(tid) if tid is not None else fallback


def load_corpus(data: str | os.PathLike | None = None, tokenizer_path: str | os.PathLike | None = None,
                vocab_size: int = DEFAULT_VOCAB_SIZE, val_percent: int = 3, log=print) -> Corpus:
    """Tokenized corpus (stdlib by default), training and caching the tokenizer when none is given."""
    root, files = corpus_files(data)
    key = corpus_key(root, files)
    train_texts, val_texts = split_texts(root, files, val_percent)
    if tokenizer_path is None:
        tokenizer_path = cache_dir() / f"tokenizer-{key}-v{vocab_size}.json"
        if not tokenizer_path.is_file():
            log(f"training a {vocab_size}-token BPE tokenizer on {len(train_texts)} files (cached at {tokenizer_path})")
            train_tokenizer(train_texts, vocab_size, tokenizer_path)
    tokenizer_path = Path(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    tok_digest = hashlib.sha1(tokenizer_path.read_bytes()).hexdigest()[:16]
    tokens_path = cache_dir() / f"tokens-{key}-{tok_digest}-val{val_percent}.npz"
    eos = special_id(tokenizer, EOS_TOKEN, 0)
    pad = special_id(tokenizer, PAD_TOKEN, eos)
    if tokens_path.is_file():
        with np.load(tokens_path) as z:
            train_ids, val_ids = z["train"], z["val"]
    else:
        log(f"tokenizing {len(train_texts) + len(val_texts)} files (cached at {tokens_path})")
        train_ids = encode_texts(tokenizer, train_texts, eos)
        val_ids = encode_texts(tokenizer, val_texts, eos)
        tmp = _private_tmp(tokens_path)  # several workers on one machine may tokenize at once
        np.savez(tmp, train=train_ids, val=val_ids)
        tmp.replace(tokens_path)
    return Corpus(tokenizer_path, train_ids, val_ids, tokenizer.get_vocab_size(with_added_tokens=True), eos, pad)


def sample_batch(ids: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random windows: inputs and next-token targets, int64 [B, T] each."""
    if len(ids) <= seq_len + 1:
        raise ValueError(f"token stream of {len(ids)} tokens is shorter than seq_len + 1 = {seq_len + 1}")
    starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
    window = starts[:, None] + np.arange(seq_len + 1)[None, :]  # [B, T+1]
    chunk = ids[window].astype(np.int64)
    return chunk[:, :-1], chunk[:, 1:]


def eval_batches(ids: np.ndarray, batch_size: int, seq_len: int, max_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fixed, evenly spaced windows over a stream (the same every call), for validation loss."""
    num_windows = min(batch_size * max_batches, (len(ids) - 1) // seq_len)
    if num_windows < 1:
        raise ValueError(f"validation stream of {len(ids)} tokens is shorter than seq_len + 1 = {seq_len + 1}")
    starts = np.linspace(0, len(ids) - seq_len - 1, num_windows).astype(np.int64)
    window = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = ids[window].astype(np.int64)
    return [(chunk[i:i + batch_size, :-1], chunk[i:i + batch_size, 1:]) for i in range(0, num_windows, batch_size)]


def unigram_cross_entropy(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> float:
    """Val cross-entropy (nats/token) of the add-one-smoothed train unigram distribution: the baseline to beat."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_ids].mean())
