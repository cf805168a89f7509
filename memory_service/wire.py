"""Raw-bytes payloads on the wire: little-endian arrays with explicit dtype and shape."""

from __future__ import annotations

import ctypes

import numpy as np

from memory_service.errors import InvalidArgument
from memory_service.row_dtypes import BFLOAT16
from protos import engram_pb2 as pb

# uint8 payloads are FP8 records (memory_service/fp8_rows.py), the only byte-sized rows there are
DTYPE_TO_ENUM = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, BFLOAT16.name: pb.BFLOAT16, "int64": pb.INT64,
                 "uint8": pb.FP8_E4M3_B32}
ENUM_TO_DTYPE = {v: np.dtype(k).newbyteorder("<") for k, v in DTYPE_TO_ENUM.items()}

# Every message, header included, fits in gRPC's default 4 MiB, so any language's default client reads it.
MAX_MESSAGE_BYTES = 4 << 20
# Payload bytes (rows, ids, gradients) per message; the rest is room for the header fields.
MAX_PAYLOAD_BYTES = MAX_MESSAGE_BYTES - (4 << 10)
ID_BYTES = 8  # one int64 row id


def channel_options() -> list[tuple[str, int]]:
    """Message size limits shared by servers and clients (gRPC's defaults, stated)."""
    return [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


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
    """Wire bytes of a LookupResponse (ready bytes, a protobuf message, or a RawLookup holding a numpy array)."""
    if isinstance(message, bytes):
        return message
    if isinstance(message, pb.LookupResponse):
        return message.SerializeToString()
    rows = np.ascontiguousarray(message.rows).reshape(-1).view(np.uint8)  # 1-D bytes: an empty range encodes too
    packed = b"".join(_varint(d) for d in message.shape)
    head = b"\x0a" + _varint(rows.nbytes)  # field 1 (rows), length-delimited
    tail = b"\x12" + _varint(len(packed)) + packed  # field 2 (shape), packed int64
    if message.dtype:
        tail += b"\x18" + _varint(message.dtype)  # field 3 (dtype)
    if message.version:
        tail += b"\x20" + _varint(message.version)  # field 4 (version)
    return b"".join((head, rows.data, tail))


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


# A bytes object filled in place: PyBytes_FromStringAndSize(NULL, n) is the C API's way to build a
# bytes object before anyone else sees it, which saves one full copy of the rows per reply.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = (ctypes.py_object,)


def lookup_reply(num_rows: int, head_dim: int, dtype, version: int) -> tuple[bytes, np.ndarray]:
    """(complete LookupResponse wire bytes, writable [num_rows, head_dim] view of its rows field).

    Fields go in the order version, dtype, shape, rows (protobuf parsers accept any
    order), so the rows are the tail of the message and can be gathered straight into it.
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    nbytes = num_rows * head_dim * dtype.itemsize
    packed = _varint(num_rows) + _varint(head_dim)
    prefix = ((b"\x20" + _varint(version)) if version else b"") + b"\x18" + _varint(dtype_enum(dtype)) \
        + b"\x12" + _varint(len(packed)) + packed + b"\x0a" + _varint(nbytes)
    message = _new_bytes(None, len(prefix) + nbytes)
    buffer = (ctypes.c_uint8 * (len(prefix) + nbytes)).from_address(_bytes_address(message))
    raw = np.frombuffer(buffer, dtype=np.uint8)
    raw[:len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    rows = raw[len(prefix):].view(dtype).reshape(num_rows, head_dim)
    return message, rows
