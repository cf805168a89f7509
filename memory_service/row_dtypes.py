"""Row formats a table may store: float32, float16, bfloat16, and FP8 records with block scales.

numpy has no bfloat16 of its own; ml_dtypes adds one (a real numpy dtype: casts from
float32 round to nearest even, arrays save to safetensors as BF16). Importing this
module registers it, so np.dtype("bfloat16") works wherever a row dtype is named.

The float formats store a row as head_dim values. FP8_BLOCK_SCALED ("fp8_e4m3_b32", the
format of DeepSeek-V4.1's Engram tables) stores a row as one fixed record of head_dim
E4M3 bytes followed by head_dim / 32 E8M0 scale bytes (264 bytes for head_dim 256): its
stored element is a byte (uint8) and its stored width is the record's length.
fp8_rows.py reads and writes those records.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FP8_BLOCK_SCALED = "fp8_e4m3_b32"
FP8_BLOCK = 32  # values per E8M0 scale in an FP8 record
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # formats gradients can train
# Rows travel and are stored as raw little-endian bytes of one of these.
ROW_DTYPES = FLOAT_DTYPES + (FP8_BLOCK_SCALED,)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def row_dtype(name) -> np.dtype:
    """The numpy dtype of a stored row's elements for a row format name (or a float dtype): uint8 for FP8 records."""
    if isinstance(name, str) and name == FP8_BLOCK_SCALED:
        return np.dtype(np.uint8)
    dtype = np.dtype(name)
    if dtype.name not in FLOAT_DTYPES:
        raise ValueError(f"row dtype must be one of {ROW_DTYPES}, got {dtype.name!r}")
    return dtype


def row_width(name: str, head_dim: int) -> int:
    """Elements of one stored row: head_dim values, or an FP8 record's head_dim + head_dim / 32 bytes."""
    if name == FP8_BLOCK_SCALED:
        if head_dim % FP8_BLOCK:
            raise ValueError(f"{FP8_BLOCK_SCALED} rows need head_dim divisible by {FP8_BLOCK}, got {head_dim}")
        return head_dim + head_dim // FP8_BLOCK
    return head_dim


def is_trainable(name: str) -> bool:
    """Whether gradients can update rows of this format (FP8 records are for serving)."""
    return name in FLOAT_DTYPES


def is_floating(dtype) -> bool:
    """Whether arrays of dtype hold floating-point numbers (numpy's own, or bfloat16)."""
    dtype = np.dtype(dtype)
    return dtype == BFLOAT16 or np.issubdtype(dtype, np.floating)


# The largest magnitude bits below Inf/NaN, per 2-byte float: all exponent bits set means Inf or NaN.
_EXPONENT_BITS_16 = {np.dtype(np.float16): 0x7C00, BFLOAT16: 0x7F80}


def all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite. For 2-byte floats it reads the bits (numpy's isfinite converts each float16 or
    bfloat16 to float32 first and is about 10x slower): a value is finite when its exponent bits are not all set.
    Integer arrays (FP8 records) are always finite here: fp8_rows.check_records reads their NaN codes."""
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.integer):
        return True
    exponent = _EXPONENT_BITS_16.get(values.dtype)
    if exponent is None:
        return bool(np.isfinite(values).all())
    if values.size == 0:
        return True
    return int((values.view(np.uint16) & 0x7FFF).max()) < exponent
