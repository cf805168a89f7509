"""Reading and writing records at addresses inside LMDB's memory map.

LMDB maps the environment's data file read-only; chunk values live in overflow pages
that never move while the value exists. Lookups gather rows straight out of that map
(snapshots.py). Folding pushed rows into their chunks writes them in place, through a
second, writable MAP_SHARED mapping of the same file: both mappings share the page
cache, so readers see the bytes, and the next commit's fdatasync makes them durable.
Readers never see a half-written row: every row being written is still in the delta
their snapshot overlays (write_path.py waits for older snapshots to end first).

Linux only: the base of LMDB's own mapping is read from /proc/self/maps.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np

from memory_service import native

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


def region(address: int, nbytes: int, writeable: bool = False) -> np.ndarray:
    """A uint8 view of nbytes of memory at address (no copy)."""
    view = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=np.uint8)
    view.flags.writeable = writeable
    return view


def _lmdb_map_base(data_file: Path, map_size: int) -> int:
    """Start address of LMDB's own mapping of data_file (the one of exactly map_size bytes at offset 0)."""
    target = os.path.realpath(data_file)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target and int(fields[2], 16) == 0:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if end - start == map_size:
                    return start
    raise RuntimeError(f"LMDB's mapping of {target} ({map_size} bytes) is not in /proc/self/maps")


class WritableMap:
    """A writable shared mapping of an environment's data file, addressed like LMDB's read-only one."""

    def __init__(self, env_dir: Path, map_size: int):
        data_file = Path(env_dir) / "data.mdb"
        self.lmdb_base = _lmdb_map_base(data_file, map_size)
        self.map_size = map_size
        fd = os.open(data_file, os.O_RDWR)
        try:
            address = _libc.mmap(None, map_size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)  # the mapping keeps the file
        if address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {data_file} failed")
        self.base = address

    def _offsets(self, addresses: np.ndarray) -> np.ndarray:
        return np.where(addresses >= 0, addresses - self.lmdb_base, -1)

    def _byte_index(self, offsets: np.ndarray, nbytes: int) -> np.ndarray:
        """int64 [K * nbytes]: every byte of the records at the given (non-negative) offsets (numpy fallback)."""
        return (offsets[:, None] + np.arange(nbytes)[None, :]).reshape(-1)

    def read(self, addresses: np.ndarray, out: np.ndarray) -> None:
        """out[i] = the record at LMDB-map address addresses[i] (zeros where < 0); out uint8 [N, nbytes]."""
        offsets = self._offsets(addresses)
        if native.available():
            native.gather_at(self.base, offsets, out)
            return
        out[...] = 0
        rows = np.flatnonzero(offsets >= 0)
        whole = region(self.base, self.map_size)
        out[rows] = whole[self._byte_index(offsets[rows], out.shape[1])].reshape(rows.size, out.shape[1])

    def write(self, addresses: np.ndarray, records: np.ndarray) -> None:
        """Write record i (uint8 [N, nbytes]) over the bytes at LMDB-map address addresses[i] (skipped where < 0)."""
        offsets = self._offsets(addresses)
        if native.available():
            native.scatter_at(self.base, offsets, records)
            return
        rows = np.flatnonzero(offsets >= 0)
        whole = region(self.base, self.map_size, writeable=True)
        whole[self._byte_index(offsets[rows], records.shape[1])] = records[rows].reshape(-1)

    def close(self) -> None:
        """Unmap."""
        if self.base:
            _libc.munmap(self.base, self.map_size)
            self.base = 0
