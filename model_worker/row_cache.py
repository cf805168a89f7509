"""A bounded cache of Engram rows on the model worker, in front of a remote table.

N-gram traffic is Zipfian, so a small cache of hot rows saves most lookups. The cache is
set-associative (4 ways per set, the set chosen by a hash of the row id) with a frequency count
per way that ages (halves) every `AGE_EVERY` probes: a hot row keeps its way, a row seen once is
the first to go. A get or a put is one native pass over the batch (memory_service/fastpath.c), or,
without the native library, a handful of numpy calls making the same decisions: no per-row Python.
Entries are tagged (version << 40) | row id, so a cached layer holds under 2^40 rows and versions
stay under 2^23 (both refused otherwise).

Entries are keyed by (layer, row id, table version) and stamped with the time they were fetched:

- a lookup pinned to a version (a request that began on it) takes only rows of that version;
- a lookup that follows the active version (a request's first) uses the version it last saw, and
  asks the service again (all of its rows, bypassing the cache) once that knowledge is older than
  `version_check_s` (1 s), which is how a swap reaches new requests;
- no row older than `max_staleness_s` (10 s by default) is served, so a table trained while it is
  served is seen at most that late (plus the lookup's own time).

Training cannot use it exactly: a step must see every earlier push, including other workers'.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from memory_service import native
from memory_service.backend import LayerOf, Once

log = logging.getLogger("engram.row_cache")

WAYS = 4
AGE_EVERY = 64  # probes between halvings of the frequency counts
ENTRY_OVERHEAD = 8 + 8 + 4  # tag, fetch time, count
VERSION_SHIFT = 40  # a tag is (version << 40) | row id: layers hold under 2^40 rows, versions stay under 2^23


MAX_ROWS = 1 << VERSION_SHIFT  # rows a cached layer may hold
MAX_VERSION = 1 << (63 - VERSION_SHIFT)


def _version_tag(version: int) -> int:
    """The version's part of a tag (ValueError outside [0, 2^23): the tag would alias another version's)."""
    if not 0 <= version < MAX_VERSION:
        raise ValueError(f"the row cache keys versions below {MAX_VERSION}, got {version}")
    return version << VERSION_SHIFT


class _LayerCache:
    """One layer's sets: tags (row id, version), fetch times, counts and the rows themselves."""

    def __init__(self, num_sets: int, width: int, dtype):
        self.tags = np.full((num_sets, WAYS), -1, dtype=np.int64)
        self.stamps = np.full((num_sets, WAYS), -np.inf, dtype=np.float64)  # an empty way is never fresh
        self.counts = np.zeros((num_sets, WAYS), dtype=np.uint32)
        self.rows = np.zeros((num_sets, WAYS, width), dtype=dtype)
        self.num_sets = num_sets

    def sets_of(self, ids: np.ndarray) -> np.ndarray:
        """The set of each row id (a multiplicative hash: neighbouring ids spread out)."""
        return ((ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)).astype(np.int64) % self.num_sets


class RowCache:
    """Rows of one table, several layers, within a byte budget; thread-safe."""

    def __init__(self, budget_bytes: int, layers: list[int], width: int, dtype, max_staleness_s: float = 10.0,
                 clock=time.monotonic):
        """clock: seconds as a float, what the staleness bound and the version check count (a benchmark that
        interleaves this worker with others gives it a clock of its own steps' time only)."""
        if budget_bytes < 0 or max_staleness_s < 0:
            raise ValueError("the cache budget and the staleness bound must be >= 0")
        dtype = np.dtype(dtype)
        per_entry = width * dtype.itemsize + ENTRY_OVERHEAD
        num_sets = max(1, budget_bytes // max(1, len(layers)) // (per_entry * WAYS))
        self.layers = {layer: _LayerCache(num_sets, width, dtype) for layer in layers}
        self.max_staleness_s = max_staleness_s
        self.clock = clock
        self.nbytes = sum(c.rows.nbytes + c.tags.nbytes + c.stamps.nbytes + c.counts.nbytes for c in self.layers.values())
        self.lock = threading.Lock()
        self.hits = self.misses = self.probes = 0

    def get(self, layer: int, ids: np.ndarray, version: int, out: np.ndarray) -> np.ndarray:
        """Copy the cached, fresh rows of `version` for unique ids [U] into out [U, width]; returns the hit mask [U]."""
        cache = self.layers[layer]
        now = self.clock()
        version_tag = _version_tag(version)
        with self.lock:
            if native.available() and out.flags.c_contiguous:  # one pass in C, the same result
                hit = native.cache_get(cache.tags, cache.stamps, cache.counts, cache.rows, ids, version_tag, now,
                                       self.max_staleness_s, out)
                found = int(hit.sum())
            else:
                sets = cache.sets_of(ids)  # [U]
                match = (cache.tags[sets] == (ids | version_tag)[:, None]) & (now - cache.stamps[sets] <= self.max_staleness_s)
                hit = match.any(axis=1)  # [U]
                sets, way = sets[hit], match[hit].argmax(axis=1)  # [hits]
                out[hit] = cache.rows[sets, way]
                cache.counts[sets, way] += 1
                found = sets.size
            self.probes += 1
            if self.probes % AGE_EVERY == 0:
                for c in self.layers.values():
                    c.counts >>= 1
            self.hits += found
            self.misses += ids.size - found
        return hit

    def put(self, layer: int, ids: np.ndarray, rows: np.ndarray, version: int, fetched_at: float | None = None) -> None:
        """Store fetched rows [N, width] of unique ids [N] at `version` in their sets' least used ways. fetched_at:
        when the lookup was sent (the cache's clock), which the staleness bound counts from."""
        if ids.size == 0:
            return
        cache = self.layers[layer]
        now = self.clock() if fetched_at is None else fetched_at
        version_tag = _version_tag(version)
        with self.lock:
            if native.available():  # one pass in C, the same decisions
                native.cache_put(cache.tags, cache.stamps, cache.counts, cache.rows, ids, version_tag, now, rows)
                return
            tags = ids | version_tag
            sets = cache.sets_of(ids)
            same = cache.tags[sets] == tags[:, None]  # [N, WAYS]: already cached (stale), refreshed in place
            refresh = same.any(axis=1)
            counts = cache.counts[sets]  # [N, WAYS]
            way = np.where(refresh, same.argmax(axis=1), counts.argmin(axis=1))  # [N]
            keep = np.ones(ids.size, dtype=bool)
            order = np.argsort(sets, kind="stable")
            collide = sets[order][1:] == sets[order][:-1]  # [N - 1]: neighbours in set order share a set
            if collide.any():
                # new ids of one batch that fall in one set take its ways from the least used up: the first any
                # way, the others only ways holding cold rows (used at most once since the last ageing), so hot rows
                # stay; then a refreshed id and a new one that chose the same way: one of them takes it
                run_start = np.flatnonzero(np.r_[True, ~collide])  # [sets] first position of each set in order
                rank = np.empty_like(order)
                rank[order] = np.arange(ids.size) - np.repeat(run_start, np.diff(np.r_[run_start, ids.size]))
                later = np.flatnonzero((rank > 0) & ~refresh)
                by_use = np.argsort(counts[later], axis=1, kind="stable")  # [later, WAYS] least used first
                way[later] = by_use[np.arange(later.size), np.minimum(rank[later], WAYS - 1)]
                keep[later] = (rank[later] < WAYS) & (counts[later, way[later]] <= 1)
                taken = np.flatnonzero(keep)
                _, first = np.unique(sets[taken] * WAYS + way[taken], return_index=True)
                keep[:] = False
                keep[taken[first]] = True
                sets, way, tags, rows = sets[keep], way[keep], tags[keep], rows[keep]
            cache.tags[sets, way] = tags
            cache.stamps[sets, way] = now
            cache.counts[sets, way] = 1
            cache.rows[sets, way] = rows

    def count_misses(self, count: int) -> None:
        """Rows looked up without asking the cache (a version check): misses all the same."""
        with self.lock:
            self.misses += count

    def stats(self) -> dict:
        """Hits, misses, hit rate and the bytes the cache holds."""
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "bytes": self.nbytes}


class CachedTables:
    """A remote TableBackend with a RowCache in front: lookups serve what the cache holds and fetch the rest.

    Pinned lookups (version > 0) take rows of that version only; unpinned ones (a request's first) use the active
    version last seen and ask the service again (bypassing the cache for that lookup) once that knowledge is
    older than version_check_s: a swap reaches new requests within it."""

    remote = True

    def __init__(self, backend, cache: RowCache, version_check_s: float = 1.0):
        too_big = [layer for layer in cache.layers if backend.num_rows(layer) > MAX_ROWS]
        if too_big:
            raise ValueError(f"layers {too_big} hold more than 2^{VERSION_SHIFT} rows: the row cache's tags cannot "
                             "key them (serve them without a cache)")
        self.backend, self.cache, self.version_check_s = backend, cache, version_check_s
        self.dtype = backend.dtype
        self._active, self._checked = 0, -float("inf")
        self._lock = threading.Lock()

    def __getattr__(self, name):  # everything else (num_rows, apply_gradients, close, ...) is the backend's
        return getattr(self.backend, name)

    def lookup_layers_async(self, parts: dict[int, np.ndarray], version: int = 0,
                            outs: dict | None = None) -> "_CachedLookup":
        """Start a lookup of several layers: cached rows now, the others sent to the service in one multi-layer
        lookup (pinned to the version served); `.result()` gives ({layer: rows}, version)."""
        outs = dict(outs or {})
        for layer, ids in parts.items():
            width, out = self.cache.layers[layer].rows.shape[-1], outs.get(layer)
            if out is None or out.shape != (ids.size, width) or out.dtype != self.dtype:
                outs[layer] = np.empty((ids.size, width), dtype=self.dtype)
        with self._lock:
            fresh = self.cache.clock() - self._checked <= self.version_check_s
            target = version or (self._active if fresh else 0)
        if not target:  # the active version is not known (or too old): ask the service for all of it
            self.cache.count_misses(sum(ids.size for ids in parts.values()))
            hits = {layer: np.zeros(ids.size, dtype=bool) for layer, ids in parts.items()}
            return _CachedLookup(self, parts, hits, outs, 0, self.backend.lookup_layers_async(parts, 0, outs))
        hits = {layer: self.cache.get(layer, ids, target, outs[layer]) for layer, ids in parts.items()}
        missing = {layer: ids[~hits[layer]] for layer, ids in parts.items() if not hits[layer].all()}
        direct = {layer: outs[layer] for layer in missing if not hits[layer].any()}  # nothing cached: replies land in out
        pending = self.backend.lookup_layers_async(missing, target, direct) if missing else None
        return _CachedLookup(self, parts, hits, outs, target, pending)

    def lookup_unique_async(self, layer_id: int, unique_ids: np.ndarray, out: np.ndarray | None = None,
                            version: int = 0) -> LayerOf:
        """A one-layer lookup_layers_async."""
        return LayerOf(self.lookup_layers_async({layer_id: unique_ids}, version, {layer_id: out}), layer_id)

    def lookup_unique(self, layer_id: int, unique_ids: np.ndarray, version: int = 0,
                      out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Rows and the version they are of (waits)."""
        return self.lookup_unique_async(layer_id, unique_ids, out, version).result()

    def learned(self, version: int) -> None:
        """A reply that followed the active version named it: take it as the active one for a while."""
        with self._lock:
            self._active, self._checked = version, self.cache.clock()


class _CachedLookup:
    """A lookup whose misses may still be in flight; result() merges them in and caches them."""

    def __init__(self, tables: CachedTables, parts: dict[int, np.ndarray], hits: dict[int, np.ndarray], outs: dict,
                 version: int, pending):
        self.tables, self.parts, self.hits, self.outs = tables, parts, hits, outs
        self.version, self.pending = version, pending
        self.sent = tables.cache.clock()  # the rows are at least this old when they arrive
        self._once = Once(self._merge)  # several layers' consumers: merged and cached once

    def result(self) -> tuple[dict[int, np.ndarray], int]:
        """({layer: rows}, version) once the misses arrived; a failure is raised to every caller, not redone."""
        return self._once.result()

    def _merge(self) -> tuple[dict[int, np.ndarray], int]:
        version = self.version
        if self.pending is not None:
            fetched, served = self.pending.result()  # {layer: [misses, width]}
            if not version:  # followed the active version: all rows came from the service
                self.tables.learned(served)
                version = served
            for layer, rows in fetched.items():
                miss = ~self.hits[layer]
                if rows is not self.outs[layer]:
                    self.outs[layer][miss] = rows
                try:  # the cache is best effort: the rows are in outs already
                    self.tables.cache.put(layer, self.parts[layer][miss], rows, version, fetched_at=self.sent)
                except (MemoryError, ValueError):
                    log.warning("could not cache %d rows of layer %d", int(miss.sum()), layer, exc_info=True)
        return self.outs, version
