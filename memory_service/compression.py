"""Tokenizer compression: merge token ids whose text differs only by case, accents or spacing.

Rules (the reference `CompressedTokenizer`, deepseek-ai/Engram): each id is decoded
alone; a text holding U+FFFD (a partial UTF-8 sequence) keys on the raw token string;
any other text keys on NFKC -> NFD -> strip accents -> lowercase -> collapse runs of
space/tab/CR/LF to one space -> strip, a text that is a lone space staying a space, an
empty result falling back to the original text. New ids are given in order of first
occurrence. Only the map (old id -> new id, int64) matters downstream; it is saved
beside checkpoints so a model always uses the map it was trained with.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from memory_service.errors import InvalidArgument

_SENTINEL = "\ue000"  # private-use char that protects a lone space from Strip

# transformers' `clean_up_tokenization` replacements, applied only when asked for
# (reference tokenizers loaded through transformers with clean_up_tokenization_spaces=True).
_CLEANUP_PAIRS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def _build_normalizer():
    """The reference's normalizer pipeline, built with the `tokenizers` library."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _SENTINEL),
        normalizers.Strip(),
        normalizers.Replace(_SENTINEL, " "),
    ])


def compression_keys(texts: list[str], raw_tokens: list[str]) -> list[str]:
    """Key of each decoded token text under the reference's rules."""
    normalizer = _build_normalizer()
    keys = []
    for text, raw in zip(texts, raw_tokens):
        if "\ufffd" in text:
            keys.append(raw)
        else:
            norm = normalizer.normalize_str(text)
            keys.append(norm if norm else text)
    return keys


def map_from_keys(keys: list[str]) -> tuple[np.ndarray, int]:
    """Old id -> new id (first-occurrence order) for a list of per-id keys."""
    key_to_new: dict[str, int] = {}
    lookup = np.empty(len(keys), dtype=np.int64)
    for old_id, key in enumerate(keys):
        lookup[old_id] = key_to_new.setdefault(key, len(key_to_new))
    return lookup, len(key_to_new)


class CompressedTokenizer:
    """Maps raw token ids to compressed ids with one vectorised table lookup."""

    def __init__(self, lookup_table: np.ndarray, num_compressed: int | None = None):
        table = np.asarray(lookup_table)
        if table.ndim != 1 or table.size == 0:
            raise InvalidArgument(f"a compression map must be a non-empty 1-D array, got shape {table.shape}")
        if not np.issubdtype(table.dtype, np.integer):
            raise InvalidArgument(f"a compression map must hold integers, got dtype {table.dtype}")
        table = table.astype(np.int64, copy=False)
        size = int(table.max()) + 1
        if table.min() < 0:
            raise InvalidArgument("a compression map must not contain negative ids")
        if num_compressed is not None and int(num_compressed) != size:
            raise InvalidArgument(f"compression map says {num_compressed} compressed ids but its largest id is {size - 1}")
        if len(np.unique(table)) != size:
            raise InvalidArgument("compression map is not dense: some compressed ids in [0, max] are never used")
        self.lookup_table = table
        self.num_compressed = size

    # ------------------------------------------------------------ building
    @classmethod
    def from_tokenizer(cls, tokenizer, clean_up_tokenization_spaces: bool = False) -> "CompressedTokenizer":
        """Build the map from a `tokenizers.Tokenizer` (every id, added tokens included)."""
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        texts = tokenizer.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)
        if clean_up_tokenization_spaces:
            for old, new in _CLEANUP_PAIRS:
                texts = [t.replace(old, new) for t in texts]
        raw_tokens = [tokenizer.id_to_token(i) or "" for i in range(vocab_size)]
        lookup, _ = map_from_keys(compression_keys(texts, raw_tokens))
        return cls(lookup)

    @classmethod
    def from_tokenizer_file(cls, path: str | os.PathLike, clean_up_tokenization_spaces: bool = False) -> "CompressedTokenizer":
        """Build the map from a `tokenizer.json` file."""
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (give a tokenizers tokenizer.json)")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise InvalidArgument(f"{path} is not a valid tokenizers tokenizer.json: {e}") from e
        return cls.from_tokenizer(tokenizer, clean_up_tokenization_spaces)

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the map as a .npy file of int64 (old id -> new id)."""
        np.save(Path(path), self.lookup_table, allow_pickle=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompressedTokenizer":
        """Read a map written by save()."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"compression map not found: {path}")
        return cls(np.load(path, allow_pickle=False))

    # ------------------------------------------------------------ use
    def __len__(self) -> int:
        return self.num_compressed

    @property
    def vocab_size(self) -> int:
        """Size of the raw vocabulary this map covers."""
        return int(self.lookup_table.shape[0])

    @property
    def reduction(self) -> float:
        """Fraction of raw ids saved by merging (the paper reports 0.23 on a 128k vocabulary)."""
        return 1.0 - self.num_compressed / self.vocab_size

    def __call__(self, token_ids) -> np.ndarray:
        """Compress an integer array of raw ids (any shape); ids outside the vocabulary raise InvalidArgument."""
        ids = np.asarray(token_ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise InvalidArgument(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.size:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                where = tuple(int(i) for i in np.argwhere(ids == bad)[0])
                raise InvalidArgument(
                    f"token id {bad} at index {where} is outside the tokenizer vocabulary [0, {self.vocab_size})"
                )
        return self.lookup_table[ids.astype(np.int64, copy=False)]
