"""FP8 rows with block scales (row format "fp8_e4m3_b32"): DeepSeek-V4.1's Engram table format.

One row of head_dim values is one record of head_dim + head_dim / 32 bytes:

    bytes [0, head_dim)                       E4M3 (float8_e4m3fn) codes q, one per value
    bytes [head_dim, head_dim + head_dim/32)  E8M0 (float8_e8m0fnu) scales s, one per block of 32 values

and value j of the row is q[j] * 2^(s[j // 32] - 127). A checkpoint keeps the codes and
the scales as two tensors ([rows, head_dim] F8_E4M3 and [rows, head_dim / 32] F8_E8M0);
the store keeps the record, so one row is one contiguous read. Records travel raw and are
dequantized where they are used: `dequantize` in numpy (a lookup table per byte),
`dequantize_torch` with torch's own float8 dtypes on the worker's device.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from memory_service.errors import InvalidArgument
from memory_service.row_dtypes import FP8_BLOCK, row_width

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
E8M0_BIAS = 127
_E4M3_NAN_BITS = 0x7F  # S.1111.111: the only NaN codes of e4m3fn (no infinities)
_E8M0_NAN = 0xFF
_OVERFLOW_SCALE = E8M0_BIAS + 119  # 448 < 2^9: below a scale of 2^119 no code reaches 2^128
# float32 value of every byte, read by ml_dtypes' own conversions
_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
_E8M0_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)


def split(records: np.ndarray, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [N, head_dim], scales uint8 [N, head_dim / 32]) views of records uint8 [N, width]."""
    if records.ndim != 2 or records.shape[1] != row_width("fp8_e4m3_b32", head_dim):
        raise InvalidArgument(f"FP8 records of head_dim {head_dim} are [n, {row_width('fp8_e4m3_b32', head_dim)}] "
                              f"bytes, got {list(records.shape)}")
    return records[:, :head_dim], records[:, head_dim:]


def join(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Records uint8 [N, head_dim + head_dim / 32] from codes [N, head_dim] and scales [N, head_dim / 32] (any 1-byte
    dtype: float8 or uint8)."""
    codes, scales = np.asarray(codes), np.asarray(scales)
    n, head_dim = codes.shape
    if scales.shape != (n, head_dim // FP8_BLOCK) or codes.dtype.itemsize != 1 or scales.dtype.itemsize != 1:
        raise InvalidArgument(f"FP8 codes [{n}, {head_dim}] need 1-byte scales [{n}, {head_dim // FP8_BLOCK}], got "
                              f"{codes.dtype} codes and {scales.dtype} scales {list(scales.shape)}")
    out = np.empty((n, row_width("fp8_e4m3_b32", head_dim)), dtype=np.uint8)
    out[:, :head_dim] = codes.view(np.uint8)
    out[:, head_dim:] = scales.view(np.uint8)
    return out


def check_records(records: np.ndarray, head_dim: int) -> None:
    """InvalidArgument when a record holds a NaN code (E4M3 0x7F/0xFF), a NaN scale (E8M0 0xFF), or a value that
    overflows float32 (a code times its scale at or above 2^128: only scales from 2^119 up can reach it)."""
    codes, scales = split(records, head_dim)
    if not codes.size:
        return
    # maxima, not comparisons: 0x7F is the largest a code's low 7 bits can be, 0xFF the largest scale (2.6x faster
    # than counting matches on a 64 MiB load, which the bulk import checks before every commit)
    if int((codes & _E4M3_NAN_BITS).max()) == _E4M3_NAN_BITS:
        raise InvalidArgument("FP8 rows contain NaN codes (E4M3 0x7F or 0xFF); refusing to store them",
                              reason="NON_FINITE_VALUE")
    top_scale = int(scales.max())
    if top_scale == _E8M0_NAN:
        raise InvalidArgument("FP8 rows contain NaN scales (E8M0 0xFF); refusing to store them", reason="NON_FINITE_VALUE")
    big = np.flatnonzero((scales >= _OVERFLOW_SCALE).any(axis=1)) if top_scale >= _OVERFLOW_SCALE else ()
    if len(big) and not np.isfinite(dequantize(records[big], head_dim)).all():
        raise InvalidArgument("FP8 rows hold values of 2^128 or more (a large code times a scale near 2^127), beyond "
                              "float32; refusing to store them", reason="NON_FINITE_VALUE")


def dequantize(records: np.ndarray, head_dim: int, out: np.ndarray | None = None) -> np.ndarray:
    """float32 [N, head_dim] values of records uint8 [N, head_dim + head_dim / 32] (exact: every FP8 code times a
    power of two is a float32, subnormals included, up to the 2^128 check_records refuses)."""
    codes, scales = split(np.asarray(records), head_dim)
    n = codes.shape[0]
    values = _E4M3_VALUES[codes] if out is None else np.take(_E4M3_VALUES, codes, out=out)  # [N, head_dim]
    with np.errstate(over="ignore"):  # a record beyond float32 gives inf here; check_records refuses those
        values.reshape(n, head_dim // FP8_BLOCK, FP8_BLOCK)[...] *= _E8M0_VALUES[scales][:, :, None]
    return values


def dequantize_torch(records, head_dim: int, dtype=None, device=None):
    """Values [N, head_dim] in `dtype` (default float32) on `device` of records (uint8 [N, width] numpy array or
    tensor), decoded by torch's float8_e4m3fn and float8_e8m0fnu: the records are copied to the device as bytes
    (264 per row for head_dim 256) and widened there. float32 is exact; bfloat16 rounds each value once, like a cast
    of the float32 value (values below bf16's smallest, 2^-133, become 0)."""
    import torch

    dtype = dtype or torch.float32
    # bf16 has float32's exponent range: a code times a scale, computed in bf16, rounds once, as the cast would
    work = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
    records = torch.as_tensor(records).to(device, non_blocking=True)
    if records.dim() != 2 or records.shape[1] != row_width("fp8_e4m3_b32", head_dim):
        raise InvalidArgument(f"FP8 records of head_dim {head_dim} are [n, {row_width('fp8_e4m3_b32', head_dim)}] "
                              f"bytes, got {list(records.shape)}")
    n = records.shape[0]
    codes = records[:, :head_dim].contiguous().view(torch.float8_e4m3fn).to(work)  # [N, head_dim]
    scales = records[:, head_dim:].contiguous().view(torch.float8_e8m0fnu).to(work)  # [N, head_dim / 32]
    values = codes.view(n, head_dim // FP8_BLOCK, FP8_BLOCK) * scales.unsqueeze(-1)  # [N, blocks, 32]
    return values.view(n, head_dim).to(dtype)


def quantize(values: np.ndarray) -> np.ndarray:
    """Records uint8 [N, head_dim + head_dim / 32] of finite values [N, head_dim] (any float dtype): per block of 32,
    the scale is the smallest power of two 2^e with amax / 2^e <= 448 (e in [-127, 127]), and each value is
    value / 2^e rounded to the nearest E4M3 (ties to even)."""
    x = np.asarray(values, dtype=np.float32)
    n, head_dim = x.shape
    if head_dim % FP8_BLOCK:
        raise InvalidArgument(f"FP8 rows need head_dim divisible by {FP8_BLOCK}, got {head_dim}")
    if not np.isfinite(x).all():
        raise InvalidArgument("cannot quantize NaN or Inf values to FP8")
    blocks = x.reshape(n, head_dim // FP8_BLOCK, FP8_BLOCK)  # [N, blocks, 32]
    amax = np.abs(blocks).max(axis=-1)  # [N, blocks]
    with np.errstate(divide="ignore"):
        exponent = np.ceil(np.log2(amax / np.float32(E4M3_MAX)))
    exponent = np.clip(np.nan_to_num(exponent, neginf=-E8M0_BIAS), -E8M0_BIAS, E8M0_BIAS).astype(np.int32)
    exponent += (np.ldexp(amax, -exponent) > E4M3_MAX) & (exponent < E8M0_BIAS)  # log2's rounding, corrected
    scaled = np.ldexp(blocks, -exponent[:, :, None]).reshape(n, head_dim)  # exact: a power of two
    codes = np.clip(scaled, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)  # nearest, ties to even
    records = join(codes, (exponent + E8M0_BIAS).astype(np.uint8))
    big = np.flatnonzero((exponent + E8M0_BIAS >= _OVERFLOW_SCALE).any(axis=1))
    if big.size:  # values near float32's largest may round up to 2^128: step those codes down to the largest finite
        part = records[big]
        over = ~np.isfinite(dequantize(part, head_dim))
        part[:, :head_dim][over] -= 1  # E4M3 magnitudes are ordered as their bits: one code down (sign kept)
        records[big] = part
    return records




class QuantizationError:
    """The error of a quantization done a block at a time, accumulated: add(values, records) per block."""

    def __init__(self):
        self.count, self.sum_sq_error, self.sum_sq_value, self.max_abs_error = 0, 0.0, 0.0, 0.0

    def add(self, values: np.ndarray, records: np.ndarray) -> None:
        """Count one block: values [n, head_dim] and their records."""
        x = np.asarray(values, dtype=np.float32)
        diff = dequantize(records, x.shape[1]) - x
        self.count += x.size
        self.sum_sq_error += float(np.square(diff, dtype=np.float64).sum())
        self.sum_sq_value += float(np.square(x, dtype=np.float64).sum())
        self.max_abs_error = max(self.max_abs_error, float(np.abs(diff).max()) if x.size else 0.0)

    def report(self) -> dict[str, float]:
        """max and RMS absolute error, and RMS error over RMS value, of every value added."""
        rms_error = (self.sum_sq_error / self.count) ** 0.5 if self.count else 0.0
        return {"values": self.count, "max_abs_error": self.max_abs_error, "rms_error": rms_error,
                "relative_rms_error": (self.sum_sq_error / self.sum_sq_value) ** 0.5 if self.sum_sq_value else 0.0}
