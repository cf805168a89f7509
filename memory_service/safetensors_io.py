"""safetensors files read and written a block of rows at a time (bounded memory, sequential I/O).

The format (public, huggingface/safetensors): an 8-byte little-endian header length n, n
bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?: {...}}`
padded with spaces to a multiple of 8, then the tensors' raw little-endian bytes, offsets
relative to the end of the header. The writer lays tensors out as the library does
(metadata first; tensors by the library's dtype order, then by name; compact JSON; space
padding), so a file it writes is byte for byte the file the library writes for the same
tensors and metadata (checked against safetensors 0.8).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memory_service.errors import InvalidArgument

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER_BYTES = 100 << 20
# the order the library writes tensors in (its dtype enum, descending), ties broken by name
LIBRARY_DTYPE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E8M0", "F8_E4M3",
                       "F8_E5M2", "I8", "U8", "BOOL")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are in a safetensors file."""

    name: str
    dtype: str  # safetensors dtype name: F8_E4M3, F8_E8M0, BF16, ...
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row (first dimension) of the tensor."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * ITEMSIZE[self.dtype]


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file by name; InvalidArgument when the header is malformed or the file is short."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidArgument(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise InvalidArgument(f"{path}: header length {n:,} does not fit the file ({size:,} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"{path}: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"{path}: the header is not a JSON object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, offsets = info["dtype"], list(info["shape"]), list(info["data_offsets"])
        except (KeyError, TypeError):
            raise InvalidArgument(f"{path}: tensor {name!r} has a malformed entry {info!r}") from None
        if not all(type(v) is int and v >= 0 for v in shape + offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise InvalidArgument(f"{path}: tensor {name!r} needs a shape and two data offsets of non-negative "
                                  f"integers, begin <= end; got shape {shape} and offsets {offsets}")
        if dtype not in ITEMSIZE:
            raise InvalidArgument(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        (begin, end), nbytes = offsets, int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        if end - begin != nbytes or 8 + n + end > size:
            raise InvalidArgument(f"{path}: tensor {name!r} ({dtype} {shape}) has data offsets [{begin}, {end}] "
                                  f"that do not fit its size ({nbytes:,} bytes) or the file ({size:,} bytes)")
        entries[name] = TensorEntry(name, dtype, tuple(shape), 8 + n + begin, nbytes)
    spans = sorted((e.begin, e.begin + e.nbytes, e.name) for e in entries.values() if e.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise InvalidArgument(f"{path}: tensors {first!r} and {second!r} overlap")
    return entries


def read_rows(path: str | Path, entry: TensorEntry, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Raw bytes uint8 [stop - start, row_nbytes] of rows [start, stop) of a tensor, read with plain reads (the
    kernel's readahead keeps a sequential import at disk speed)."""
    if out is None:
        out = np.empty((stop - start, entry.row_nbytes), dtype=np.uint8)
    return read_into(path, entry.begin + start * entry.row_nbytes, out, f"{path} ends inside tensor {entry.name!r}")


def read_into(path: str | Path, offset: int, out: np.ndarray, short: str) -> np.ndarray:
    """Fill a C-contiguous array with the file's bytes from offset, with plain unbuffered reads; InvalidArgument
    (message `short`) when the file ends first."""
    if not out.flags.c_contiguous:
        raise ValueError("read_into fills a C-contiguous array (a reshape of another would be a copy)")
    view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < out.nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise InvalidArgument(short)
            done += got
    return out


def write_file(path: str | Path, tensors: dict[str, tuple[str, tuple[int, ...]]], read_block, block_rows: int = 1 << 16,
               metadata: dict[str, str] | None = None, progress=None) -> None:
    """Write a safetensors file of 2-D tensors {name: (dtype, shape)} with the same number of rows, whose bytes come
    from read_block(start, stop) -> {name: uint8 [stop - start, row_nbytes]} a block of rows at a time (each block
    read once, every tensor's part written at its own offset). progress(bytes) as blocks are written."""
    order = sorted(tensors, key=lambda name: (LIBRARY_DTYPE_ORDER.index(tensors[name][0]), name))
    rows = {shape[0] for _, shape in tensors.values()}
    if len(rows) != 1 or any(len(shape) != 2 for _, shape in tensors.values()):
        raise InvalidArgument(f"write_file writes 2-D tensors of one row count, got {tensors}")
    header, offset = ({"__metadata__": dict(metadata)} if metadata else {}), 0
    for name in order:
        dtype, shape = tensors[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    data_start = 8 + len(blob)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        f.truncate(data_start + offset)
        fd, (num_rows,) = f.fileno(), rows
        for start in range(0, num_rows, block_rows):
            blocks = read_block(start, min(num_rows, start + block_rows))
            for name in order:
                block = np.ascontiguousarray(blocks[name])
                begin, end = header[name]["data_offsets"]
                at = data_start + begin + start * ((end - begin) // num_rows)  # rows [start, ...) of this tensor
                view, done = memoryview(block.reshape(-1).view(np.uint8)), 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], at + done)
                if progress is not None:
                    progress(block.nbytes)
