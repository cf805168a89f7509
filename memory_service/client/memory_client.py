"""MemoryClient: the data plane of the memory service (lookups, gradient pushes, row writes) as a TableBackend.

A lookup dedups its ids (unique + inverse), splits them by shard (ShardMap) and into
messages under the payload limit, sends every part at once (futures), and writes each
reply straight into one output array. All parts of a batch are served from one table
version: if a swap lands between parts, the parts from the older version are fetched
again pinned to the newer one. A client may be pinned to one version (train or write a
version that is not active yet); otherwise it reads and writes the active version.
Table administration is not here: see memory_service/admin (TableAdmin).
"""

from __future__ import annotations

import time
import uuid

import numpy as np

from memory_service.backend import Once, TableBackend, check_gradients, check_row_ids
from memory_service.client.transport import ShardChannels
from memory_service.dedup import Dedup, PartwiseDedup, dedup_ids, expand_rows
from memory_service.errors import FailedPrecondition, InvalidArgument, NotFound, StaleShardMap
from memory_service.fp8_rows import dequantize
from memory_service.row_dtypes import is_trainable
from memory_service.shard_map import ShardMap
from memory_service.spec import EngramSpec
from memory_service.wire import ID_BYTES, MAX_PAYLOAD_BYTES, decode_array, dtype_enum, encode_ids, enum_dtype
from protos import engram_pb2 as pb


class MemoryClient(TableBackend):
    """One table set on the memory service (one server or the shards of a pool), as a TableBackend."""

    remote = True

    def __init__(self, shards: ShardMap | str | list[str], table: str, token: str | None = None,
                 deadline_s: float = 30.0, retry_budget_s: float = 30.0, tls_root_cert: bytes | None = None,
                 max_payload_bytes: int = MAX_PAYLOAD_BYTES, spec: EngramSpec | None = None, map_provider=None,
                 version: int = 0):
        """`map_provider()` -> (ShardMap, active version) re-reads the map after a stale-map refusal (a pool's directory).

        version: read and write this version (0: whichever is active, followed through swaps).
        """
        self.channels = ShardChannels(shards, token, deadline_s, retry_budget_s, tls_root_cert, map_provider)
        self.table = table
        self.version = int(version)
        self.max_payload_bytes = max_payload_bytes
        self.refresh_info(expected=spec)

    @property
    def shard_map(self) -> ShardMap:
        """The shard map this client routes by."""
        return self.channels.shard_map

    @property
    def version_pin(self) -> int:
        """The version every request names: the client's own, else the pool directory's active one (0: the server's)."""
        return self.version or self.channels.active_version

    # ------------------------------------------------------------------ table info
    def refresh_info(self, expected: EngramSpec | None = None) -> pb.TableInfo:
        """Read the table's spec, sizes and dtype; refuse a spec that differs from `expected`."""
        info = self.channels.call(0, "GetTableInfo", pb.GetTableInfoRequest(table=self.table))
        self.spec = EngramSpec.from_json(info.spec_json)
        self.fingerprint = info.spec_fingerprint
        self.layer_rows = dict(info.layer_rows)
        self.dtype = enum_dtype(info.dtype)  # of a stored row's elements (uint8: FP8 records)
        self.chunk_rows = int(info.chunk_rows)
        # a model trained on float rows may read them quantized (an FP8 table hashed the same way: engram table quantize)
        serving_copy = expected is not None and not is_trainable(self.spec.dtype) and expected.hashing() == self.spec.hashing()
        if expected is not None and expected.fingerprint() != self.fingerprint and not serving_copy:
            raise FailedPrecondition(f"table {self.table!r} on the service has spec fingerprint {self.fingerprint}, "
                                     f"this model expects {expected.fingerprint()}: another spec or compression map",
                                     reason="SPEC_MISMATCH")
        if self.version and self.version not in {v.version for v in info.versions}:
            raise NotFound(f"table {self.table!r} has no version {self.version} (versions "
                           f"{sorted(v.version for v in info.versions)})", reason="VERSION_NOT_FOUND")
        return info

    def num_rows(self, layer_id: int) -> int:
        """Rows in one layer's table."""
        if layer_id not in self.layer_rows:
            raise InvalidArgument(f"table {self.table!r} has no layer {layer_id}; its layers are {sorted(self.layer_rows)}")
        return self.layer_rows[layer_id]

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row on the wire."""
        return self.row_width * self.dtype.itemsize

    def values(self, rows: np.ndarray) -> np.ndarray:
        """float32 values [..., head_dim] of stored rows [..., row_width]: FP8 records dequantized, floats widened."""
        if is_trainable(self.spec.dtype):
            return rows.astype(np.float32, copy=False)
        flat = rows.reshape(-1, self.row_width)
        return dequantize(flat, self.spec.head_dim).reshape(*rows.shape[:-1], self.spec.head_dim)

    def _plan(self, layer: int, sorted_ids: np.ndarray, item_nbytes: int) -> list[tuple[int, int, int]]:
        """(shard, start, stop) contiguous parts of sorted ids, each message under the payload limit."""
        item_nbytes = max(item_nbytes, ID_BYTES)  # a request carries 8 bytes per id whatever the reply's rows weigh
        return self.shard_map.plan(layer, sorted_ids, max(1, self.max_payload_bytes // item_nbytes))

    # ------------------------------------------------------------------ lookups
    def lookup_unique(self, layer_id: int, unique_ids: np.ndarray, version: int = 0,
                      out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Rows [U, head_dim] (table dtype) for ascending unique ids, all from one version.

        Every part (per shard, under the payload limit) is in flight at once; each reply
        lands in its contiguous slice of `out`, which may be reused across calls.
        """
        return self.lookup_unique_async(layer_id, unique_ids, version, out).result()

    def lookup_unique_async(self, layer_id: int, unique_ids: np.ndarray, version: int = 0,
                            out: np.ndarray | None = None) -> "PendingLookup":
        """Send every part of a lookup now; `.result()` collects (rows, version) later (prefetch)."""
        return self.channels.with_fresh_map(lambda: self._start_lookup(layer_id, unique_ids, version, out))

    def _start_lookup(self, layer_id: int, unique_ids: np.ndarray, version: int, out: np.ndarray | None) -> "PendingLookup":
        requested, version = version, version or self.version_pin
        if out is None or out.shape != (unique_ids.size, self.row_width) or out.dtype != self.dtype:
            out = np.empty((unique_ids.size, self.row_width), dtype=self.dtype)
        parts = self._plan(layer_id, unique_ids, self.row_nbytes) if unique_ids.size else []
        calls = self._lookup_calls(layer_id, unique_ids, parts, version)
        return PendingLookup(self, layer_id, unique_ids, parts, calls, self.channels.send(calls), out, version, requested)

    def lookup_layers_async(self, parts: dict[int, np.ndarray], version: int = 0,
                            outs: dict | None = None) -> "PendingLayers":
        """Send the lookups of several layers ({layer: ascending unique ids}) in one LookupLayers call per shard (a
        few under the payload limit); `.result()` gives ({layer: rows [U, row width]}, version), all from it."""
        return self.channels.with_fresh_map(lambda: self._start_layers(parts, version, outs or {}))

    def _start_layers(self, parts: dict[int, np.ndarray], version: int, outs: dict) -> "PendingLayers":
        requested, version = version, version or self.version_pin
        width, per_message = self.row_width, max(1, self.max_payload_bytes // max(self.row_nbytes, ID_BYTES))
        outs = {layer: out if out is not None and out.shape == (parts[layer].size, width) and out.dtype == self.dtype
                else np.empty((parts[layer].size, width), dtype=self.dtype)
                for layer, out in ((layer, outs.get(layer)) for layer in parts)}
        by_shard: dict[int, list[tuple[int, int, int]]] = {}  # shard -> (layer, start, stop) pieces
        for layer, ids in parts.items():
            for shard, start, stop in (self.shard_map.plan(layer, ids, per_message) if ids.size else []):
                by_shard.setdefault(shard, []).append((layer, start, stop))
        groups = []  # (shard, pieces): one call each, under the payload limit
        for shard, pieces in by_shard.items():
            group, rows = [], 0
            for piece in pieces:
                if group and rows + piece[2] - piece[1] > per_message:
                    groups.append((shard, group))
                    group, rows = [], 0
                group.append(piece)
                rows += piece[2] - piece[1]
            groups.append((shard, group))
        calls = self._layer_calls(parts, groups, version)
        return PendingLayers(self, parts, groups, calls, self.channels.send(calls), outs, version, requested)

    def _layer_calls(self, parts: dict[int, np.ndarray], groups, version: int) -> list:
        """One LookupLayers call per (shard, [(layer, start, stop) pieces of parts]) group."""
        return [(shard, "LookupLayers", pb.LookupLayersRequest(
            table=self.table, spec_fingerprint=self.fingerprint, layers=[layer for layer, _, _ in group],
            counts=[stop - start for _, start, stop in group],
            row_ids=b"".join(encode_ids(parts[layer][start:stop]) for layer, start, stop in group),
            version=version, shard_epoch=self.shard_map.epoch)) for shard, group in groups]

    def _lookup_calls(self, layer_id: int, unique: np.ndarray, parts, version: int) -> list:
        return [(shard, "Lookup", pb.LookupRequest(
            table=self.table, layer=layer_id, spec_fingerprint=self.fingerprint, row_ids=encode_ids(unique[start:stop]),
            version=version, shard_epoch=self.shard_map.epoch)) for shard, start, stop in parts]

    def _fetch_parts(self, layer_id: int, unique: np.ndarray, parts, out: np.ndarray, version: int) -> list[int]:
        calls = self._lookup_calls(layer_id, unique, parts, version)
        return self._store_replies(parts, self.channels.call_all(calls), out)

    def _store_replies(self, parts, replies, out: np.ndarray) -> list[int]:
        """Copy each reply's rows into its slice of out (replies may be a generator: each lands as it arrives)."""
        versions = []
        for (shard, start, stop), reply in zip(parts, replies):
            got = decode_array(reply.rows, enum_dtype(reply.dtype), "rows", width=self.row_width)
            if got.shape[0] != stop - start or got.dtype != out.dtype:
                raise FailedPrecondition(f"shard {shard} returned {got.shape[0]} {got.dtype} rows for {stop - start} ids")
            out[start:stop] = got
            versions.append(reply.version)
        return versions

    def lookup_raw(self, layer_id: int, row_ids, version: int = 0, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Rows [N, head_dim] (table dtype) in batch order, and the one version they all came from."""
        ids = check_row_ids(row_ids, self.num_rows(layer_id), layer_id)
        batch = dedup_ids(ids)
        if batch.positions is None:
            return self.lookup_unique(layer_id, ids, version, out)
        rows, served = self.lookup_unique(layer_id, batch.unique, version)
        if out is None or out.shape != (ids.size, self.row_width) or out.dtype != self.dtype:
            out = np.empty((ids.size, self.row_width), dtype=self.dtype)
        expand_rows(rows, batch.inverse(), out)
        return out, served

    def lookup_batch(self, layer_id: int, row_ids, version: int = 0, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """(rows of the unique ids [U, head_dim], inverse [N], version): rows[inverse] is the batch.

        What a prefetcher hands the model: the expansion to batch order is the model's own
        embedding gather (on the device), not a host copy. `out` may be any buffer with at
        least U rows of the table dtype (reused across calls); the rows are its first U.
        """
        ids = check_row_ids(row_ids, self.num_rows(layer_id), layer_id)
        per_message = max(1, self.max_payload_bytes // self.row_nbytes)
        if ids.size > per_message and PartwiseDedup.supports(ids.size, self.num_rows(layer_id)):  # send while the rest is sorted
            pending, batch = self._start_partwise(layer_id, ids, version, out, per_message)
        else:
            batch = dedup_ids(ids)
            target = out[:batch.unique.size] if out is not None and out.shape[0] >= batch.unique.size else None
            pending = self.lookup_unique_async(layer_id, batch.unique, version, target)
        inverse = batch.inverse()  # while the rows travel
        rows, served = pending.result()
        return rows, inverse, served

    def _start_partwise(self, layer_id: int, ids: np.ndarray, version: int, out: np.ndarray | None,
                        per_message: int) -> tuple["PendingLookup", Dedup]:
        """Dedup a batch in ascending slices and send each message as soon as its ids are sorted.

        The first message is a quarter of the size limit, the others full: on Zipf ids (40%
        distinct) the first full message would wait for a third of the sort. Measured with
        `engram bench lookup`: c/b 0.77 -> 0.85 on Zipf ids, uniform unchanged (0.88-0.93).

        Returns (pending lookup of the unique ids, the finished Dedup). A stale shard map
        met on the way finishes the dedup and starts the lookup again the ordinary way.
        """
        requested, version = version, version or self.version_pin
        width = self.row_width
        if out is None or out.shape[0] < ids.size or out.shape[1:] != (width,) or out.dtype != self.dtype:
            out = np.empty((ids.size, width), dtype=self.dtype)
        dedup = PartwiseDedup(ids, piece=per_message // 4, id_bound=self.num_rows(layer_id))  # ids checked already
        unique = dedup.unique_buffer
        parts, calls, futures, sent = [], [], [], 0
        first_message = max(1, per_message // 4)  # a small first message gets the server going sooner

        def send(stop: int, finished: bool) -> int:
            planned = [(shard, sent + a, sent + b) for shard, a, b in self._plan(layer_id, unique[sent:stop], self.row_nbytes)]
            if not finished and planned and planned[-1][2] - planned[-1][1] < (per_message if sent else first_message):
                planned.pop()  # not full yet: more ids may join it
            new_calls = self._lookup_calls(layer_id, unique, planned, version)
            futures.extend(self.channels.send(new_calls))
            parts.extend(planned)
            calls.extend(new_calls)
            return planned[-1][2] if planned else sent

        pieces = iter(dedup)
        try:
            for ready in pieces:
                if ready - sent >= (per_message if sent else first_message):
                    sent = send(ready, finished=False)
            send(dedup.count, finished=True)
        except StaleShardMap:
            for _ in pieces:  # finish sorting; the ordinary path refreshes the map
                pass
            batch = dedup.result()
            return self.lookup_unique_async(layer_id, batch.unique, requested, out[:batch.unique.size]), batch
        batch = dedup.result()
        pending = PendingLookup(self, layer_id, batch.unique, parts, calls, futures, out[:batch.unique.size], version,
                                requested)
        return pending, batch

    def lookup(self, layer_id: int, row_ids: np.ndarray) -> np.ndarray:
        """Rows for int64 ids [N] -> float32 [N, head_dim] (TableBackend; FP8 records dequantized)."""
        rows, _ = self.lookup_raw(layer_id, row_ids)
        return self.values(rows)

    def lookup_tokens(self, layer_id: int, token_ids, compressed: bool = False, version: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
        """(rows [B, T, heads, head_dim], row ids [B, T, heads], version) for token ids [B, T]; the server hashes.

        With several shards, the first one hashes (row ids only) and the rows are looked up by shard.
        """
        tokens = np.atleast_2d(np.asarray(token_ids, dtype=np.int64))
        sharded = self.shard_map.num_shards > 1
        reply = self.channels.call(0, "LookupTokens", pb.LookupTokensRequest(
            table=self.table, layer=layer_id, spec_fingerprint=self.fingerprint, token_ids=encode_ids(tokens),
            shape=list(tokens.shape), compressed=compressed, version=version or self.version, row_ids_only=sharded))
        row_ids = decode_array(reply.row_ids, "<i8", "row_ids").reshape(tuple(reply.shape)[:3])
        if sharded:
            rows, served = self.lookup_raw(layer_id, row_ids.reshape(-1), version)
            return rows.reshape(*row_ids.shape, self.row_width), row_ids, served
        rows = decode_array(reply.rows, enum_dtype(reply.dtype), "rows").reshape(tuple(reply.shape))
        return rows, row_ids, reply.version

    def read_layer(self, layer_id: int, version: int = 0, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a layer in the table dtype (export)."""
        stop = self.num_rows(layer_id) if stop is None else stop
        rows, _ = self.lookup_raw(layer_id, np.arange(start, stop, dtype=np.int64), version)
        return rows

    # ------------------------------------------------------------------ writes
    def apply_gradients(self, layer_id: int, row_ids: np.ndarray, grads: np.ndarray, lr: float, version: int = 0,
                        step: int = 0) -> None:
        """Row-wise Adam on unique rows, each shard's part committed before return (TableBackend).

        Parts refused for a stale map are re-planned under the refreshed map and sent
        again; parts already applied are not re-sent, so no update is applied twice.
        """
        ids = check_row_ids(row_ids, self.num_rows(layer_id), layer_id)
        g = check_gradients(ids, grads, self.spec.head_dim)  # gradients are float32 values, whatever the row format
        ids, g = _sorted(ids, g)
        pending = np.ones(ids.size, dtype=bool)
        for attempt in range(20):
            todo = np.flatnonzero(pending)
            sub_ids, sub_g = ids[todo], g[todo]
            parts = self._plan(layer_id, sub_ids, ID_BYTES + self.spec.head_dim * 4)
            calls = [(shard, "ApplyGradients", pb.ApplyGradientsRequest(
                table=self.table, layer=layer_id, spec_fingerprint=self.fingerprint, row_ids=encode_ids(sub_ids[a:b]),
                gradients=np.ascontiguousarray(sub_g[a:b], dtype="<f4").tobytes(), learning_rate=lr, step=step,
                version=version or self.version_pin, shard_epoch=self.shard_map.epoch, request_id=uuid.uuid4().hex))
                for shard, a, b in parts]
            stale = False
            for (_, a, b), call, future in zip(parts, calls, self.channels.send(calls)):
                try:
                    list(self.channels.results([call], [future]))
                    pending[todo[a:b]] = False
                except StaleShardMap:
                    if self.channels.map_provider is None:
                        raise
                    stale = True
            if not stale:
                return
            time.sleep(min(1.0, 0.05 * 2 ** attempt))
            self.channels.refresh_map()
        raise StaleShardMap(f"gradient push for layer {layer_id} kept meeting a stale shard map")

    def write_rows(self, layer_id: int, row_ids, rows, version: int = 0) -> None:
        """Set rows of a version (table dtype), split and sent to their shards."""
        ids = check_row_ids(row_ids, self.num_rows(layer_id), layer_id)
        values = np.asarray(rows)
        if values.shape != (ids.size, self.row_width):
            raise InvalidArgument(f"rows must be [{ids.size}, {self.row_width}], got {list(values.shape)}")
        ids, values = _sorted(ids, values.astype(self.dtype, copy=False))
        version = version or self.version  # 0: each shard's active one (writes carry no epoch to refresh a pin by)
        calls = [(shard, "WriteRows", pb.WriteRowsRequest(
            table=self.table, layer=layer_id, spec_fingerprint=self.fingerprint, version=version,
            row_ids=encode_ids(ids[a:b]), rows=np.ascontiguousarray(values[a:b]).tobytes(), dtype=dtype_enum(self.dtype),
            request_id=uuid.uuid4().hex)) for shard, a, b in self._plan(layer_id, ids, ID_BYTES + self.row_nbytes)]
        self.channels.call_all(calls)

    def load_rows(self, layer_id: int, start_row: int, rows, version: int) -> None:
        """Whole chunks of rows [start_row, start_row + n) into an inactive version (bulk import), sent to their shards
        in messages of whole chunks; start_row on a chunk boundary (self.chunk_rows), n whole chunks or to the end."""
        values = np.asarray(rows)
        if values.ndim != 2 or values.shape[1] != self.row_width:
            raise InvalidArgument(f"rows must be [n, {self.row_width}], got {list(values.shape)}")
        values = values.astype(self.dtype, copy=False)
        chunk_nbytes = self.chunk_rows * self.row_nbytes
        if chunk_nbytes > self.max_payload_bytes:
            raise InvalidArgument(f"a chunk of {self.chunk_rows} rows is {chunk_nbytes / 2**20:.1f} MiB, over a message: "
                                  "write the rows with write_rows instead")
        ids = np.arange(start_row, start_row + values.shape[0], dtype=np.int64)
        per_message = self.max_payload_bytes // chunk_nbytes * self.chunk_rows
        streams: dict[int, list] = {}  # shard -> its messages, sent as one stream (the shard commits them together)
        for shard, a, b in self.shard_map.plan(layer_id, ids, per_message):
            streams.setdefault(shard, []).append(pb.LoadRowsRequest(
                table=self.table, layer=layer_id, spec_fingerprint=self.fingerprint, version=version,
                start_row=int(ids[a]), rows=np.ascontiguousarray(values[a:b]).tobytes(), dtype=dtype_enum(self.dtype)))
        self.channels.call_all([(shard, "LoadRows", messages) for shard, messages in streams.items()])

    def stats(self) -> list[dict[str, float]]:
        """Counters of every shard."""
        return [dict(r.counters) for r in self.channels.broadcast("Stats", pb.StatsRequest())]

    def close(self) -> None:
        """Close the channels."""
        self.channels.close()


def _sorted(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids ascending, values in the same order."""
    if ids.size > 1 and not np.all(ids[1:] > ids[:-1]):
        order = np.argsort(ids, kind="stable")
        return ids[order], values[order]
    return ids, values


class PendingLookup:
    """A lookup whose parts are in flight; result() waits for them (and re-fetches after a mid-batch swap)."""

    def __init__(self, client: MemoryClient, layer_id: int, unique: np.ndarray, parts, calls, futures, out: np.ndarray,
                 version: int, requested: int = 0):
        """version: the version every part names; requested: the one the caller asked for (0: the active one)."""
        self._client, self._layer, self._unique = client, layer_id, unique
        self._parts, self._calls, self._futures = parts, calls, futures
        self._out, self._version, self._requested = out, version, requested
        self._result: tuple[np.ndarray, int] | None = None

    def result(self) -> tuple[np.ndarray, int]:
        """(rows [U, head_dim], version), waiting for the replies still in flight."""
        if self._result is None:
            client = self._client
            try:  # each part's rows are copied out while later parts are still arriving
                served = client._store_replies(self._parts, client.channels.results(self._calls, self._futures), self._out)
            except StaleShardMap:
                if client.channels.map_provider is None:
                    raise
                client.channels.refresh_map()  # the map moved on (rescale, swap): ask again under the new one
                self._result = client.channels.with_fresh_map(  # what was asked for; 0 follows the new active version
                    lambda: client.lookup_unique(self._layer, self._unique, self._requested, self._out))
                return self._result
            target = self._version or max(served, default=0)
            stale = [part for part, v in zip(self._parts, served) if v != target]
            if stale:  # a swap landed between parts: fetch those again from the newer version
                client._fetch_parts(self._layer, self._unique, stale, self._out, target)
            self._result = (self._out, target)
        return self._result


class PendingLayers:
    """A multi-layer lookup whose calls are in flight; result() waits for them (and re-fetches after a mid-batch swap)."""

    def __init__(self, client: MemoryClient, parts: dict[int, np.ndarray], groups, calls, futures, outs: dict,
                 version: int, requested: int = 0):
        self._client, self._parts, self._groups, self._calls, self._futures = client, parts, groups, calls, futures
        self._outs, self._version, self._requested = outs, version, requested
        self._once = Once(self._collect)  # several layers' consumers: the lookup (and its retries) runs once

    def result(self) -> tuple[dict[int, np.ndarray], int]:
        """({layer: rows [U, row width]}, version), waiting for the replies still in flight; a failure is raised to
        every caller without running the lookup's retries again."""
        return self._once.result()

    def _collect(self) -> tuple[dict[int, np.ndarray], int]:
        client = self._client
        try:
            served = self._store(self._groups, client.channels.results(self._calls, self._futures))
        except StaleShardMap:
            if client.channels.map_provider is None:
                raise
            client.channels.refresh_map()  # the map moved on (rescale, swap): ask again under the new one
            return client.channels.with_fresh_map(
                lambda: client.lookup_layers_async(self._parts, self._requested, self._outs).result())
        target = self._version or max(served, default=0)
        stale = [i for i, version in enumerate(served) if version != target]
        if stale:  # a swap landed between shards: the same requests again (same map epoch), pinned to the newer version
            calls = []
            for i in stale:
                shard, method, request = self._calls[i]
                again = type(request)()
                again.CopyFrom(request)
                again.version = target
                calls.append((shard, method, again))
            again_served = self._store([self._groups[i] for i in stale], client.channels.call_all(calls))
            if any(version != target for version in again_served):
                raise FailedPrecondition(f"shards answered versions {sorted(set(again_served))} for version {target}")
        return self._outs, target

    def _store(self, groups, replies) -> list[int]:
        """Copy each group's reply into its layers' outs (replies may be a generator); the versions served."""
        served = []
        for (shard, group), reply in zip(groups, replies):
            got = decode_array(reply.rows, enum_dtype(reply.dtype), "rows", width=self._client.row_width)
            expected = sum(stop - start for _, start, stop in group)
            if got.shape[0] != expected or got.dtype != self._client.dtype:
                raise FailedPrecondition(f"shard {shard} returned {got.shape[0]} {got.dtype} rows for {expected} ids")
            at = 0
            for layer, start, stop in group:  # the reply holds the pieces one after the other
                self._outs[layer][start:stop] = got[at:at + stop - start]
                at += stop - start
            served.append(reply.version)
        return served
