"""The native lookup kernels (fastpath.c) through ctypes, with numpy fallbacks decided by the caller.

The library is compiled at install time (setup.py) or by `python -m memory_service.native_build`;
importing this module never compiles. `KERNELS` is None when the library is missing, cannot
be loaded or is of another kernel ABI (one warning says so), or when ENGRAM_NATIVE=0;
callers then use their numpy path, which gives the same results. Measured on the
2-core machine of DESIGN.md: dedup of 262,144 uniform ids 2-2.6 ms against 4.8-5 ms for
the packed numpy sort; the inverse 0.4 ms against 1.1 ms; a row gather out of a 2 GiB map
about 15% faster than np.take (prefetching rows ahead).
"""

from __future__ import annotations

import ctypes
import logging
import os

import numpy as np

from memory_service import native_build

log = logging.getLogger("engram.native")

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


ABI_VERSION = 4  # fastpath.c's ENGRAM_ABI_VERSION this module's signatures are written for


def _load():
    """The built library, or None (with one warning saying why) when it is missing, unloadable or of another ABI."""
    if os.environ.get("ENGRAM_NATIVE", "1") == "0":
        return None
    library = native_build.LIBRARY
    fix = "build it with `python -m memory_service.native_build` (pip install does this)"
    if not library.exists():
        log.warning("native kernels not built (%s missing): using the numpy paths; %s", library.name, fix)
        return None
    try:
        lib = ctypes.CDLL(str(library))
        lib.engram_abi_version.restype = _INT
        abi = lib.engram_abi_version()
    except (OSError, AttributeError) as e:
        log.warning("native kernels unusable (%s): using the numpy paths; %s", e, fix)
        return None
    if abi != ABI_VERSION:
        log.warning("%s has kernel ABI %d, this code needs %d: using the numpy paths; %s", library.name, abi, ABI_VERSION, fix)
        return None
    if native_build.stale():
        log.warning("%s is older than fastpath.c; %s", library.name, fix)
    lib.engram_dedup.argtypes = [_P, _I64, _INT, _INT, _P, _P, _P]
    lib.engram_dedup.restype = _I64
    lib.engram_inverse.argtypes = [_P, _I64, _INT, _P]
    lib.engram_inverse.restype = None
    lib.engram_gather_rows.argtypes = [_P, _I64, _I64, _P, _I64, _I64, _P]
    lib.engram_gather_rows.restype = None
    lib.engram_group_keys.argtypes = [_P, _I64, _INT, _INT, _INT, _P, _P]
    lib.engram_group_keys.restype = _INT
    lib.engram_dedup_groups.argtypes = [_P, _P, _P, _I64, _I64, _INT, _INT, _P]
    lib.engram_dedup_groups.restype = _I64
    lib.engram_merge_rows.argtypes = [_P, _P, _P, _I64, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P]
    lib.engram_merge_rows.restype = _I64
    lib.engram_find_sorted.argtypes = [_P, _I64, _P, _I64, _P, _P]
    lib.engram_find_sorted.restype = _I64
    _D = ctypes.c_double
    lib.engram_cache_get.argtypes = [_P, _P, _P, _P, _I64, _I64, _P, _I64, _I64, _D, _D, _P, _P]
    lib.engram_cache_get.restype = _I64
    lib.engram_cache_put.argtypes = [_P, _P, _P, _P, _I64, _I64, _P, _I64, _I64, _D, _P, _P]
    lib.engram_cache_put.restype = _I64
    return lib


KERNELS = _load()


def available() -> bool:
    """Whether the native kernels are in use."""
    return KERNELS is not None


def dedup(ids: np.ndarray, shift: int, id_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, unique) of int64 ids [N]: keys int64 [N] = sorted (id << shift | position), unique int64 [U] ascending.

    Needs ids in [0, 2^id_bits), N <= 2^shift and id_bits + shift <= 62.
    """
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n = ids.size
    keys = np.empty(n, dtype=np.int64)
    scratch = np.empty(n, dtype=np.int64)
    unique = np.empty(n, dtype=np.int64)
    count = KERNELS.engram_dedup(ids.ctypes.data, n, id_bits, shift, keys.ctypes.data, scratch.ctypes.data,
                                 unique.ctypes.data)
    if count < 0:
        raise MemoryError("native dedup could not allocate its count tables")
    return keys, unique[:count]


def group_keys(ids: np.ndarray, shift: int, id_bits: int, top_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, starts): keys int64 [N] = (id << shift | position) grouped by the id's top `top_bits` bits, stably;
    starts int64 [2^top_bits + 1]: where each group begins. Same conditions as dedup(), top_bits <= id_bits."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    keys = np.empty(ids.size, dtype=np.int64)
    starts = np.empty((1 << top_bits) + 1, dtype=np.int64)
    if KERNELS.engram_group_keys(ids.ctypes.data, ids.size, id_bits, shift, top_bits, keys.ctypes.data, starts.ctypes.data):
        raise MemoryError("native grouping could not allocate its counts")
    return keys, starts


def dedup_groups(keys: np.ndarray, starts: np.ndarray, first_group: int, end_group: int, low_bits: int, shift: int,
                 scratch: np.ndarray, unique_out: np.ndarray) -> int:
    """Sort the keys of groups [first_group, end_group) in place and write their distinct ids to unique_out; returns how many.

    scratch: int64, at least as long as the largest group; unique_out: int64 with room for the groups' keys.
    """
    count = KERNELS.engram_dedup_groups(keys.ctypes.data, scratch.ctypes.data, starts.ctypes.data, first_group, end_group,
                                        low_bits, shift, unique_out.ctypes.data)
    if count < 0:
        raise MemoryError("native dedup could not allocate its count tables")
    return count


def merge_rows(old: tuple[np.ndarray, np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray, np.ndarray]):
    """Merge (ids, a, b) runs: ids int64 ascending and unique within a run, a/b C-contiguous [N, ...] payloads.

    Where an id is in both runs the new payloads win. Returns the merged (ids, a, b).
    """
    (old_ids, old_a, old_b), (new_ids, new_a, new_b) = old, new
    arrays = (old_ids, old_a, old_b, new_ids, new_a, new_b)
    if any(not x.flags.c_contiguous for x in arrays) or old_ids.dtype != np.int64 or new_ids.dtype != np.int64:
        raise ValueError("merge_rows needs C-contiguous arrays and int64 ids")
    for o, n in ((old_a, new_a), (old_b, new_b)):
        if o.dtype != n.dtype or o.shape[1:] != n.shape[1:]:
            raise ValueError(f"merge_rows: payloads differ ({o.dtype}{o.shape[1:]} vs {n.dtype}{n.shape[1:]})")
    if old_a.shape[0] != old_ids.size or old_b.shape[0] != old_ids.size or new_a.shape[0] != new_ids.size \
            or new_b.shape[0] != new_ids.size:
        raise ValueError("merge_rows: a payload's length differs from its ids'")
    total = old_ids.size + new_ids.size
    out_ids = np.empty(total, dtype=np.int64)
    out_a = np.empty((total,) + old_a.shape[1:], dtype=old_a.dtype)
    out_b = np.empty((total,) + old_b.shape[1:], dtype=old_b.dtype)
    a_nbytes = old_a.itemsize * int(np.prod(old_a.shape[1:], dtype=np.int64))
    b_nbytes = old_b.itemsize * int(np.prod(old_b.shape[1:], dtype=np.int64))
    count = KERNELS.engram_merge_rows(old_ids.ctypes.data, old_a.ctypes.data, old_b.ctypes.data, old_ids.size,
                                      new_ids.ctypes.data, new_a.ctypes.data, new_b.ctypes.data, new_ids.size,
                                      a_nbytes, b_nbytes, out_ids.ctypes.data, out_a.ctypes.data, out_b.ctypes.data)
    return out_ids[:count], out_a[:count], out_b[:count]


def find_sorted(run: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in query, indexes into run) of the query ids found in run; run int64 ascending unique, query int64 any order."""
    run = np.ascontiguousarray(run, dtype=np.int64)
    query = np.ascontiguousarray(query, dtype=np.int64)
    positions = np.empty(query.size, dtype=np.int64)
    index = np.empty(query.size, dtype=np.int64)
    hits = KERNELS.engram_find_sorted(run.ctypes.data, run.size, query.ctypes.data, query.size, positions.ctypes.data,
                                      index.ctypes.data)
    return positions[:hits], index[:hits]


def inverse(keys: np.ndarray, shift: int) -> np.ndarray:
    """int64 [N]: index into the unique ids of each batch position, from dedup()'s sorted keys."""
    out = np.empty(keys.size, dtype=np.int64)
    KERNELS.engram_inverse(keys.ctypes.data, keys.size, shift, out.ctypes.data)
    return out


def gather_rows(region: np.ndarray, first_unit: np.ndarray, out: np.ndarray) -> None:
    """out[i] = the row starting at unit first_unit[i] (clipped to the last whole row) of a region.

    region: uint8 [R, unit] C-contiguous; first_unit: int64 [N]; out: uint8 [N, row_nbytes],
    C-contiguous, row_nbytes a multiple of unit and at most R units.
    """
    units, unit = region.shape
    if region.ndim != 2 or not region.flags.c_contiguous or out.ndim != 2 or not out.flags.c_contiguous \
            or out.shape[0] != first_unit.size or out.shape[1] % unit or not 0 < out.shape[1] <= units * unit:
        raise ValueError(f"gather_rows: region {region.shape} and out {out.shape} do not fit")
    first_unit = np.ascontiguousarray(first_unit, dtype=np.int64)
    KERNELS.engram_gather_rows(region.ctypes.data, units, unit, first_unit.ctypes.data, first_unit.size, out.shape[1],
                               out.ctypes.data)



def _cache_arrays(tags: np.ndarray, stamps: np.ndarray, counts: np.ndarray, rows: np.ndarray) -> tuple[int, int]:
    """(num_sets, row bytes) of a row cache layer's arrays, after checking their layout."""
    num_sets = tags.shape[0]
    if tags.dtype != np.int64 or stamps.dtype != np.float64 or counts.dtype != np.uint32 \
            or any(not a.flags.c_contiguous or a.shape[:2] != tags.shape for a in (tags, stamps, counts, rows)) \
            or tags.shape[1:] != (4,):
        raise ValueError("cache arrays: tags int64, stamps float64, counts uint32, rows, all C-contiguous [sets, 4, ...]")
    return num_sets, rows.nbytes // (num_sets * 4)


def cache_get(tags, stamps, counts, rows, ids: np.ndarray, version_tag: int, now: float, max_age: float,
              out: np.ndarray) -> np.ndarray:
    """The row cache's get (model_worker/row_cache.py) in one pass: fresh cached rows of ids [U] into out [U, ...]
    (C-contiguous, the rows' dtype), their counts bumped; the hit mask [U]."""
    num_sets, row_nbytes = _cache_arrays(tags, stamps, counts, rows)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if not out.flags.c_contiguous or not out.flags.writeable or out.dtype != rows.dtype \
            or out.shape != (ids.size,) + rows.shape[2:]:
        raise ValueError("cache_get: out must be a writable C-contiguous [U, row] array of the cache's dtype")
    hit = np.empty(ids.size, dtype=bool)
    KERNELS.engram_cache_get(tags.ctypes.data, stamps.ctypes.data, counts.ctypes.data, rows.ctypes.data, num_sets,
                             row_nbytes, ids.ctypes.data, ids.size, version_tag, now, max_age, out.ctypes.data,
                             hit.ctypes.data)
    return hit


def cache_put(tags, stamps, counts, rows, ids: np.ndarray, version_tag: int, now: float, new_rows: np.ndarray) -> int:
    """The row cache's put in one pass (the numpy path's decisions); returns the rows written."""
    num_sets, row_nbytes = _cache_arrays(tags, stamps, counts, rows)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if new_rows.shape != (ids.size,) + rows.shape[2:]:
        raise ValueError(f"cache_put: rows {new_rows.shape} for {ids.size} ids of the cache's rows {rows.shape[2:]}")
    new_rows = np.ascontiguousarray(new_rows, dtype=rows.dtype)
    scratch = np.empty(ids.size, dtype=np.int64)
    written = KERNELS.engram_cache_put(tags.ctypes.data, stamps.ctypes.data, counts.ctypes.data, rows.ctypes.data,
                                       num_sets, row_nbytes, ids.ctypes.data, ids.size, version_tag, now,
                                       new_rows.ctypes.data, scratch.ctypes.data)
    if written < 0:
        raise MemoryError("native cache put could not allocate its bookkeeping")
    return written
