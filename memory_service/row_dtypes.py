"""Row dtypes a table may store: float32, float16 and bfloat16.

numpy has no bfloat16 of its own; ml_dtypes adds one (a real numpy dtype: casts from
float32 round to nearest even, arrays save to safetensors as BF16). Importing this
module registers it, so np.dtype("bfloat16") works wherever a row dtype is named.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# Rows travel and are stored as raw little-endian bytes of one of these.
ROW_DTYPES = ("float32", "float16", "bfloat16")
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def row_dtype(name) -> np.dtype:
    """The numpy dtype of a row dtype name (or dtype)."""
    dtype = np.dtype(name)
    if dtype.name not in ROW_DTYPES:
        raise ValueError(f"row dtype must be one of {ROW_DTYPES}, got {dtype.name!r}")
    return dtype


def is_floating(dtype) -> bool:
    """Whether arrays of dtype hold floating-point numbers (numpy's own, or bfloat16)."""
    dtype = np.dtype(dtype)
    return dtype == BFLOAT16 or np.issubdtype(dtype, np.floating)


# The largest magnitude bits below Inf/NaN, per 2-byte float: all exponent bits set means Inf or NaN.
_EXPONENT_BITS_16 = {np.dtype(np.float16): 0x7C00, BFLOAT16: 0x7F80}


def all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite. For 2-byte floats it reads the bits (numpy's isfinite converts each float16 or
    bfloat16 to float32 first and is about 10x slower): a value is finite when its exponent bits are not all set."""
    values = np.asarray(values)
    exponent = _EXPONENT_BITS_16.get(values.dtype)
    if exponent is None:
        return bool(np.isfinite(values).all())
    if values.size == 0:
        return True
    return int((values.view(np.uint16) & 0x7FFF).max()) < exponent
