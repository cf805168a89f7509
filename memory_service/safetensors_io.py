"""safetensors files read and written a block of rows at a time (bounded memory, sequential I/O).

The format (public, huggingface/safetensors): an 8-byte little-endian header length n, n
bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?: {...}}`
padded with spaces to a multiple of 8, then the tensors' raw little-endian bytes, offsets
relative to the end of the header. The writer lays tensors out as the reference library
does (largest element first, then by name; compact JSON; space padding), so a file it
writes is byte for byte the file the library writes for the same tensors.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memory_service.errors import InvalidArgument

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER_BYTES = 100 << 20


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
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(f"{path}: tensor {name!r} has a malformed entry {info!r}") from None
        if dtype not in ITEMSIZE:
            raise InvalidArgument(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        if end - begin != nbytes or begin < 0 or 8 + n + end > size:
            raise InvalidArgument(f"{path}: tensor {name!r} ({dtype} {list(shape)}) has data offsets [{begin}, {end}] "
                                  f"that do not fit its size ({nbytes:,} bytes) or the file ({size:,} bytes)")
        entries[name] = TensorEntry(name, dtype, shape, 8 + n + begin, nbytes)
    return entries


def read_rows(path: str | Path, entry: TensorEntry, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Raw bytes uint8 [stop - start, row_nbytes] of rows [start, stop) of a tensor, read with plain reads (the
    kernel's readahead keeps a sequential import at disk speed)."""
    row_nbytes = entry.row_nbytes
    if out is None:
        out = np.empty((stop - start, row_nbytes), dtype=np.uint8)
    view, done = memoryview(out.reshape(-1)), 0
    with open(path, "rb", buffering=0) as f:
        f.seek(entry.begin + start * row_nbytes)
        while done < out.nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise InvalidArgument(f"{path} ends inside tensor {entry.name!r}")
            done += got
    return out


def write_file(path: str | Path, tensors: dict[str, tuple[str, tuple[int, ...]]], write_rows, block_rows: int = 1 << 16,
               progress=None) -> None:
    """Write a safetensors file of tensors {name: (dtype, shape)} whose bytes come from write_rows(name, start, stop)
    -> uint8 [stop - start, row_nbytes], a block of rows at a time. progress(bytes) as blocks are written."""
    order = sorted(tensors, key=lambda name: (-ITEMSIZE[tensors[name][0]], name))
    header, offset = {}, 0
    for name in order:
        dtype, shape = tensors[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            dtype, shape = tensors[name]
            rows = shape[0] if shape else 1
            for start in range(0, rows, block_rows):
                block = np.ascontiguousarray(write_rows(name, start, min(rows, start + block_rows)))
                f.write(block.data)
                if progress is not None:
                    progress(block.nbytes)
