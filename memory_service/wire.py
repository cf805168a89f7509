"""Raw-bytes payloads on the wire: little-endian arrays with explicit dtype and shape."""

from __future__ import annotations

import numpy as np

from memory_service.errors import InvalidArgument
from protos import engram_pb2 as pb

DTYPE_TO_ENUM = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "int64": pb.INT64}
ENUM_TO_DTYPE = {v: np.dtype(k).newbyteorder("<") for k, v in DTYPE_TO_ENUM.items()}

# Responses stay under this many bytes; clients split bigger batches (gRPC's own cap is set above it).
MAX_PAYLOAD_BYTES = 4 << 20
GRPC_MESSAGE_LIMIT = 16 << 20


def dtype_enum(dtype) -> int:
    """engram.v1.DType of a numpy dtype."""
    name = np.dtype(dtype).name
    if name not in DTYPE_TO_ENUM:
        raise InvalidArgument(f"dtype {name} is not supported on the wire (use one of {sorted(DTYPE_TO_ENUM)})")
    return DTYPE_TO_ENUM[name]


def enum_dtype(value: int) -> np.dtype:
    """numpy dtype of an engram.v1.DType."""
    if value not in ENUM_TO_DTYPE:
        raise InvalidArgument(f"unknown or unspecified dtype enum {value}")
    return ENUM_TO_DTYPE[value]


def decode_array(blob: bytes, dtype, name: str, width: int = 1) -> np.ndarray:
    """A [n] (width == 1) or [n, width] array from raw bytes; a byte count that does not fit is INVALID_ARGUMENT."""
    dtype = np.dtype(dtype).newbyteorder("<")
    item = dtype.itemsize * width
    if len(blob) % item:
        what = f"{dtype.itemsize}" if width == 1 else f"{width} x {dtype.itemsize} = {item}"
        raise InvalidArgument(f"{name}: byte length {len(blob)} is not a multiple of {what}")
    arr = np.frombuffer(blob, dtype=dtype)
    return arr if width == 1 else arr.reshape(-1, width)


def encode_ids(ids: np.ndarray) -> bytes:
    """int64 little-endian bytes of ids."""
    return np.ascontiguousarray(ids, dtype="<i8").tobytes()
