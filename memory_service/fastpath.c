/* Native kernels for the lookup hot path: batch dedup (radix sort) and the row gather.
 *
 * Plain C with no Python API: memory_service/native_build.py compiles this file into a
 * shared library at install time and memory_service/native.py calls it through ctypes;
 * when it is missing, the numpy versions in dedup.py, row_delta.py, store/ and the worker's row
 * cache run instead
 * and give identical results (tests/test_native.py).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Bumped whenever a kernel's signature or meaning changes: native.py refuses a library of another version. */
#define ENGRAM_ABI_VERSION 4

int engram_abi_version(void) { return ENGRAM_ABI_VERSION; }

#define MAX_DIGIT_BITS 13 /* 8192 buckets: 64 KiB of counts, two passes cover 26-bit ids */

/* Stable LSD radix sort of keys[0..n) on bits [lo, hi); tmp has room for n keys.
 * Returns 0, or -1 when the count tables cannot be allocated. */
static int radix_sort_bits(uint64_t *keys, uint64_t *tmp, int64_t n, int lo, int hi) {
    int span = hi - lo;
    if (span <= 0 || n < 2) return 0;
    int passes = (span + MAX_DIGIT_BITS - 1) / MAX_DIGIT_BITS;
    int digit = (span + passes - 1) / passes;
    int64_t buckets = (int64_t)1 << digit, mask = buckets - 1;
    int64_t *counts = calloc((size_t)(buckets * passes), sizeof(int64_t));
    if (!counts) return -1;
    for (int64_t i = 0; i < n; i++) { /* every pass's histogram in one read */
        uint64_t k = keys[i] >> lo;
        for (int p = 0; p < passes; p++) counts[p * buckets + (int64_t)((k >> (p * digit)) & (uint64_t)mask)]++;
    }
    uint64_t *src = keys, *dst = tmp;
    for (int p = 0; p < passes; p++) {
        int64_t *count = counts + p * buckets, sum = 0;
        int shift = lo + p * digit, constant = 0;
        for (int64_t b = 0; b < buckets; b++) {
            int64_t c = count[b];
            if (c == n) constant = 1; /* every key has this digit: the pass would not move anything */
            count[b] = sum;
            sum += c;
        }
        if (constant) continue;
        for (int64_t i = 0; i < n; i++) {
            uint64_t k = src[i];
            dst[count[(int64_t)((k >> shift) & (uint64_t)mask)]++] = k;
        }
        uint64_t *t = src; src = dst; dst = t;
    }
    if (src != keys) memcpy(keys, src, (size_t)n * sizeof(uint64_t));
    free(counts);
    return 0;
}

/* Dedup of ids[0..n) (each in [0, 2^id_bits), id_bits + shift <= 63, n <= 2^shift).
 * keys: out, n words (id << shift | position) sorted by id, positions ascending within an id.
 * unique: out, the distinct ids ascending. tmp: scratch for n words.
 * Returns the number of distinct ids, or -1 on allocation failure. */
int64_t engram_dedup(const int64_t *ids, int64_t n, int id_bits, int shift, uint64_t *keys, uint64_t *tmp, int64_t *unique) {
    for (int64_t i = 0; i < n; i++) keys[i] = ((uint64_t)ids[i] << shift) | (uint64_t)i;
    /* positions are already ascending, and LSD radix is stable: sorting the id bits is enough */
    if (radix_sort_bits(keys, tmp, n, shift, shift + id_bits) != 0) return -1;
    int64_t u = 0;
    uint64_t previous = ~(uint64_t)0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t id = keys[i] >> shift;
        if (id != previous) { unique[u++] = (int64_t)id; previous = id; }
    }
    return u;
}

/* inverse[position] = index into the unique ids, from the sorted keys of engram_dedup. */
void engram_inverse(const uint64_t *keys, int64_t n, int shift, int64_t *inverse) {
    uint64_t mask = ((uint64_t)1 << shift) - 1, previous = ~(uint64_t)0;
    int64_t u = -1;
    for (int64_t i = 0; i < n; i++) {
        uint64_t k = keys[i], id = k >> shift;
        if (id != previous) { u++; previous = id; }
        inverse[k & mask] = u;
    }
}

/* out[i] = the row_nbytes starting at unit index[i] of a region of `units` units of unit_nbytes each
 * (rows are whole units). Indices are clipped to the last whole row like np.take(mode="clip").
 * Rows a few ahead are prefetched: on a large table almost every row is a cache and TLB miss,
 * and the prefetch overlaps them. */
#define GATHER_LOOP(ROW)                                                                       \
    for (int64_t i = 0; i < n; i++) {                                                          \
        if (i + ahead < n) {                                                                   \
            int64_t j = index[i + ahead];                                                      \
            j = j < 0 ? 0 : (j > last ? last : j);                                             \
            const uint8_t *p = region + j * unit_nbytes;                                       \
            for (int64_t b = 0; b < (ROW); b += 64) __builtin_prefetch(p + b, 0, 0);           \
        }                                                                                      \
        int64_t j = index[i];                                                                  \
        j = j < 0 ? 0 : (j > last ? last : j);                                                 \
        memcpy(out + i * (ROW), region + j * unit_nbytes, (size_t)(ROW));                      \
    }

void engram_gather_rows(const uint8_t *region, int64_t units, int64_t unit_nbytes, const int64_t *index, int64_t n,
                        int64_t row_nbytes, uint8_t *out) {
    const int64_t ahead = 8, last = units - row_nbytes / unit_nbytes;
    switch (row_nbytes) { /* fixed sizes let the compiler inline the copy */
    case 64: GATHER_LOOP(64) break;
    case 128: GATHER_LOOP(128) break;
    case 256: GATHER_LOOP(256) break;
    case 512: GATHER_LOOP(512) break;
    default: GATHER_LOOP(row_nbytes) break;
    }
}

/* Partwise dedup, so a client can send the first ids before the whole batch is sorted.
 * engram_group_keys: keys (id << shift | position) grouped by the top `top_bits` of the id
 * bits (stable, so positions stay ascending within a group); starts[0..2^top_bits] are the
 * group offsets (starts[2^top_bits] = n). Returns 0, or -1 on allocation failure. */
int engram_group_keys(const int64_t *ids, int64_t n, int id_bits, int shift, int top_bits, uint64_t *keys, int64_t *starts) {
    int64_t groups = (int64_t)1 << top_bits;
    int low = id_bits - top_bits;
    int64_t *next = calloc((size_t)groups, sizeof(int64_t));
    if (!next) return -1;
    for (int64_t i = 0; i < n; i++) next[(uint64_t)ids[i] >> low]++;
    int64_t sum = 0;
    for (int64_t g = 0; g < groups; g++) { int64_t c = next[g]; starts[g] = sum; next[g] = sum; sum += c; }
    starts[groups] = n;
    for (int64_t i = 0; i < n; i++) keys[next[(uint64_t)ids[i] >> low]++] = ((uint64_t)ids[i] << shift) | (uint64_t)i;
    free(next);
    return 0;
}

/* Sort the keys of groups [g_lo, g_hi) (each group on its `low_bits` id bits: the top bits are
 * the group) and write their distinct ids, ascending, to unique; returns how many, or -1 on
 * allocation failure. tmp: scratch for the largest group's keys. */
int64_t engram_dedup_groups(uint64_t *keys, uint64_t *tmp, const int64_t *starts, int64_t g_lo, int64_t g_hi, int low_bits,
                            int shift, int64_t *unique) {
    for (int64_t g = g_lo; g < g_hi; g++)
        if (radix_sort_bits(keys + starts[g], tmp, starts[g + 1] - starts[g], shift, shift + low_bits) != 0) return -1;
    int64_t u = 0;
    uint64_t previous = ~(uint64_t)0;
    for (int64_t i = starts[g_lo]; i < starts[g_hi]; i++) {
        uint64_t id = keys[i] >> shift;
        if (id != previous) { unique[u++] = (int64_t)id; previous = id; }
    }
    return u;
}

/* Merge two sorted runs of unique ids with two payloads each (rows and optimizer records);
 * where an id is in both, the new run's payloads win. Writes out_ids/out_a/out_b (room for
 * old_n + new_n) and returns the merged count. One pass, each payload copied once. */
int64_t engram_merge_rows(const int64_t *old_ids, const uint8_t *old_a, const uint8_t *old_b, int64_t old_n,
                          const int64_t *new_ids, const uint8_t *new_a, const uint8_t *new_b, int64_t new_n,
                          int64_t a_nbytes, int64_t b_nbytes, int64_t *out_ids, uint8_t *out_a, uint8_t *out_b) {
    int64_t i = 0, j = 0, k = 0;
    while (i < old_n || j < new_n) {
        int take_new = i >= old_n || (j < new_n && new_ids[j] <= old_ids[i]);
        if (take_new) {
            if (i < old_n && old_ids[i] == new_ids[j]) i++; /* replaced */
            out_ids[k] = new_ids[j];
            memcpy(out_a + k * a_nbytes, new_a + j * a_nbytes, (size_t)a_nbytes);
            memcpy(out_b + k * b_nbytes, new_b + j * b_nbytes, (size_t)b_nbytes);
            j++;
        } else {
            out_ids[k] = old_ids[i];
            memcpy(out_a + k * a_nbytes, old_a + i * a_nbytes, (size_t)a_nbytes);
            memcpy(out_b + k * b_nbytes, old_b + i * b_nbytes, (size_t)b_nbytes);
            i++;
        }
        k++;
    }
    return k;
}

/* Which query ids are in a sorted id run: for every hit, positions[c] = its place in query and
 * index[c] = its place in run; returns the number of hits. Queries in ascending order (what
 * a deduplicated lookup sends) gallop forward from the previous match; a query smaller than
 * the one before starts a fresh binary search, so any order works. */
int64_t engram_find_sorted(const int64_t *run, int64_t run_n, const int64_t *query, int64_t n, int64_t *positions,
                           int64_t *index) {
    int64_t j = 0, hits = 0, previous = INT64_MIN;
    for (int64_t i = 0; i < n; i++) {
        int64_t q = query[i], lo, hi;
        if (q < previous) { lo = 0; hi = run_n; }
        else { /* gallop: run[lo - 1] < q is known, find hi with run[hi] >= q */
            lo = j; hi = j;
            int64_t step = 1;
            while (hi < run_n && run[hi] < q) { lo = hi + 1; hi += step; step <<= 1; }
            if (hi > run_n) hi = run_n;
        }
        while (lo < hi) { int64_t mid = lo + (hi - lo) / 2; if (run[mid] < q) lo = mid + 1; else hi = mid; }
        j = lo;
        previous = q;
        if (j < run_n && run[j] == q) { positions[hits] = i; index[hits] = j; hits++; }
    }
    return hits;
}


/* ---- the model worker's row cache (model_worker/row_cache.py): WAYS-way sets of (tag, stamp, count, row).
 * A tag is row id | version << 40; a row id's set is (id * 0x9E3779B97F4A7C15 >> 33) % num_sets. */
#define CACHE_WAYS 4

static inline int64_t cache_set(int64_t id, int64_t num_sets) {
    return (int64_t)(((uint64_t)id * 0x9E3779B97F4A7C15ULL) >> 33) % num_sets;
}

/* Copy the fresh cached rows (tag matches, now - stamp <= max_age) of ids into out, bump their counts and
 * set hit[i]; returns the number of hits. */
int64_t engram_cache_get(const int64_t *tags, const double *stamps, uint32_t *counts, const uint8_t *rows,
                         int64_t num_sets, int64_t row_nbytes, const int64_t *ids, int64_t n, int64_t version_tag,
                         double now, double max_age, uint8_t *out, uint8_t *hit) {
    int64_t hits = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t base = cache_set(ids[i], num_sets) * CACHE_WAYS, tag = ids[i] | version_tag;
        hit[i] = 0;
        for (int w = 0; w < CACHE_WAYS; w++) {
            if (tags[base + w] == tag && now - stamps[base + w] <= max_age) {
                memcpy(out + i * row_nbytes, rows + (base + w) * row_nbytes, (size_t)row_nbytes);
                counts[base + w]++;
                hit[i] = 1;
                hits++;
                break;
            }
        }
    }
    return hits;
}

/* Per-call bookkeeping of the sets a put touches: ids of the call seen in the set so far, ways written. */
typedef struct { int64_t set; int32_t seen; uint8_t written; } cache_slot;

static cache_slot *slot_of(cache_slot *table, int64_t mask, int64_t set) {
    int64_t h = (int64_t)(((uint64_t)set * 0x9E3779B97F4A7C15ULL) >> 20) & mask;
    while (table[h].set != -1 && table[h].set != set) h = (h + 1) & mask;
    table[h].set = set;
    return &table[h];
}

/* Store rows of unique ids (in_rows [n, row_nbytes]) at a version: an id already cached is refreshed in its way;
 * the k-th id of this call in a set (k from 0) takes the set's k-th least used way (counts before the call,
 * ties by way), the first any way, the others only a way used at most once; two ids choosing one way: the
 * earlier one. The same decisions as the numpy path. way_scratch: room for n int64. Returns rows written, or -1
 * when the bookkeeping cannot be allocated. */
int64_t engram_cache_put(int64_t *tags, double *stamps, uint32_t *counts, uint8_t *rows, int64_t num_sets,
                         int64_t row_nbytes, const int64_t *ids, int64_t n, int64_t version_tag, double now,
                         const uint8_t *in_rows, int64_t *way_scratch) {
    int64_t size = 16;
    while (size < 2 * n) size <<= 1;
    cache_slot *table = malloc((size_t)size * sizeof(cache_slot));
    if (!table) return -1;
    for (int64_t h = 0; h < size; h++) { table[h].set = -1; table[h].seen = 0; table[h].written = 0; }
    for (int64_t i = 0; i < n; i++) { /* decide on the state before the call */
        int64_t set = cache_set(ids[i], num_sets), base = set * CACHE_WAYS, tag = ids[i] | version_tag;
        cache_slot *slot = slot_of(table, size - 1, set);
        int rank = slot->seen, way = -1;
        if (slot->seen < CACHE_WAYS) slot->seen++; /* every rank from CACHE_WAYS on is refused alike */
        for (int w = 0; w < CACHE_WAYS; w++) if (tags[base + w] == tag) { way = w; break; }
        if (way < 0) {
            int order[CACHE_WAYS];
            for (int w = 0; w < CACHE_WAYS; w++) { /* stable insertion sort of the ways by count */
                int k = w;
                while (k > 0 && counts[base + order[k - 1]] > counts[base + w]) { order[k] = order[k - 1]; k--; }
                order[k] = w;
            }
            int pick = order[rank < CACHE_WAYS ? rank : CACHE_WAYS - 1];
            if (rank == 0 || (rank < CACHE_WAYS && counts[base + pick] <= 1)) way = pick;
        }
        way_scratch[i] = way;
    }
    int64_t written = 0;
    for (int64_t i = 0; i < n; i++) { /* write, the earlier id first */
        int way = (int)way_scratch[i];
        if (way < 0) continue;
        int64_t set = cache_set(ids[i], num_sets), k = set * CACHE_WAYS + way;
        cache_slot *slot = slot_of(table, size - 1, set);
        if (slot->written & (1 << way)) continue;
        slot->written |= (uint8_t)(1 << way);
        tags[k] = ids[i] | version_tag;
        stamps[k] = now;
        counts[k] = 1;
        memcpy(rows + k * row_nbytes, in_rows + i * row_nbytes, (size_t)row_nbytes);
        written++;
    }
    free(table);
    return written;
}
