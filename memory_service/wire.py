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


# ---------------------------------------------------------------------- LookupResponse fast path
# The rows payload dominates a lookup; protobuf would copy it three times on the server
# (tobytes, message field, serialization) and once more on the client (parsing). These
# encode/decode the same wire bytes by hand: one copy on the server, none on the client.

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _read_varint(data, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


class RawLookup:
    """A LookupResponse whose rows are a numpy array (server side) or a zero-copy memoryview (client side)."""

    __slots__ = ("rows", "shape", "dtype", "version")

    def __init__(self, rows, shape, dtype: int, version: int):
        self.rows, self.shape, self.dtype, self.version = rows, list(shape), dtype, version


def encode_lookup_response(message) -> bytes:
    """Wire bytes of a LookupResponse (a protobuf message or a RawLookup holding a numpy array)."""
    if isinstance(message, pb.LookupResponse):
        return message.SerializeToString()
    rows = np.ascontiguousarray(message.rows)
    packed = b"".join(_varint(d) for d in message.shape)
    head = b"\x0a" + _varint(rows.nbytes)  # field 1 (rows), length-delimited
    tail = b"\x12" + _varint(len(packed)) + packed  # field 2 (shape), packed int64
    if message.dtype:
        tail += b"\x18" + _varint(message.dtype)  # field 3 (dtype)
    if message.version:
        tail += b"\x20" + _varint(message.version)  # field 4 (version)
    return b"".join((head, rows.data.cast("B"), tail))


def decode_lookup_response(data: bytes) -> RawLookup:
    """Parse LookupResponse wire bytes; `rows` is a memoryview into `data` (no copy). Unknown fields are skipped."""
    view = memoryview(data)
    pos, rows, shape, dtype, version = 0, b"", [], 0, 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field_number, wire_type = key >> 3, key & 7
        if wire_type == 2:
            length, pos = _read_varint(data, pos)
            chunk, pos = view[pos:pos + length], pos + length
            if field_number == 1:
                rows = chunk
            elif field_number == 2:
                p = 0
                while p < length:
                    value, p = _read_varint(chunk, p)
                    shape.append(value)
        elif wire_type == 0:
            value, pos = _read_varint(data, pos)
            if field_number == 2:
                shape.append(value)
            elif field_number == 3:
                dtype = value
            elif field_number == 4:
                version = value
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise InvalidArgument(f"malformed LookupResponse (wire type {wire_type})")
    return RawLookup(rows, shape, dtype, version)
