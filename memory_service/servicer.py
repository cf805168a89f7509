"""gRPC servicer of engram.v1.EngramMemory: decode raw bytes, check them, call the store, encode raw bytes.

This is the edge where untrusted requests arrive: sizes, string lengths, specs and
epochs are checked here; the store checks what only it can (ids against its tables,
values that would store non-finite rows). Our own errors (memory_service.errors) leave
as their status code plus an ErrorInfo reason (status.py); any other exception is a bug
of ours: INTERNAL, logged here with its traceback. A refused request changes nothing.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import threading
import time
from collections import OrderedDict

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from memory_service.compression import CompressedTokenizer
from memory_service.errors import (
    Cancelled,
    EngramError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    ShardUnavailable,
    StaleShardMap,
    Unauthenticated,
    shown,
)
from memory_service.hashing import NgramHasher
from memory_service.spec import EngramSpec
from memory_service.status import abort
from memory_service.store import TableStore
from memory_service.store.bulk_load import RowLoad
from memory_service.store.ledger import MAX_REQUEST_ID_BYTES
from memory_service.table_meta import TableMeta
from memory_service.wire import (
    ID_BYTES,
    MAX_PAYLOAD_BYTES,
    RawLookup,
    decode_array,
    dtype_enum,
    encode_ids,
    encode_lookup_response,
    enum_dtype,
    lookup_reply,
)
from protos import engram_pb2 as pb
from protos import engram_pb2_grpc as pb_grpc

log = logging.getLogger("engram.server")

MAX_SPEC_JSON_BYTES = 64 << 10
LOAD_BATCH_BYTES = 64 << 20  # a LoadRows stream is written (one synced commit) every this many bytes of rows
HASHERS_KEPT = 16  # token hashers of recently asked tables (each holds a compression map)


def rpc(kind: str):
    """Wrap a handler: auth for writes/admin, our errors -> their status, anything else -> INTERNAL (logged)."""

    def wrap(method):
        @functools.wraps(method)
        def handler(self, request, context):
            started = time.perf_counter()
            try:
                if kind in ("write", "admin"):
                    self._authorize(context)
                return method(self, request, context)
            except EngramError as e:
                self.errors += 1
                abort(context, e)
            except Exception as e:  # noqa: BLE001 - a bug of ours, not the caller's: say so, keep the traceback
                self.errors += 1
                log.exception("%s failed", method.__name__)
                abort(context, EngramError(f"internal error in {method.__name__} ({type(e).__name__}); "
                                           "the server logged its traceback"))
            finally:
                with self._seconds_lock:
                    self.seconds[method.__name__] = self.seconds.get(method.__name__, 0.0) + time.perf_counter() - started
        return handler
    return wrap


def table_info_message(meta: TableMeta) -> pb.TableInfo:
    """TableInfo proto of a table's metadata."""
    return pb.TableInfo(
        name=meta.name, spec_json=meta.spec.to_json(), spec_fingerprint=meta.spec.fingerprint(),
        active_version=meta.active,
        versions=[pb.VersionInfo(version=v, source=info["source"], created_unix=info["created"])
                  for v, info in sorted(meta.versions.items())],
        layer_rows=meta.layer_rows, chunk_rows=meta.chunk_rows, dtype=dtype_enum(meta.dtype), head_dim=meta.head_dim,
        has_compression_map=meta.has_compression, swap_history=meta.history,
    )


def parse_spec(spec_json: str) -> EngramSpec:
    """The EngramSpec of a request (InvalidArgument when it is too large, not JSON, or not a valid spec)."""
    if len(spec_json) > MAX_SPEC_JSON_BYTES:
        raise InvalidArgument(f"spec_json is {len(spec_json)} bytes, over the {MAX_SPEC_JSON_BYTES}-byte limit")
    try:
        data = json.loads(spec_json)
        if not isinstance(data, dict):
            raise ValueError("it is not a JSON object")
        return EngramSpec.from_dict(data)
    except (ValueError, TypeError, RecursionError) as e:
        raise InvalidArgument(f"spec_json is not a valid EngramSpec: {str(e)[:300]}", reason="INVALID_SPEC") from None


def request_id_of(request) -> str | None:
    """The request's idempotency id (None when empty; InvalidArgument when too long)."""
    request_id = request.request_id
    if len(request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidArgument(f"request_id is {len(request_id.encode())} bytes; at most {MAX_REQUEST_ID_BYTES} "
                              "(a uuid is 32)")
    return request_id or None


class EngramMemoryServicer(pb_grpc.EngramMemoryServicer):
    """Serves one TableStore."""

    def __init__(self, store: TableStore, token: str | None = None, max_payload_bytes: int = MAX_PAYLOAD_BYTES):
        self.store = store
        self.token = token
        self.max_payload_bytes = max_payload_bytes
        self.errors = 0
        self.seconds: dict[str, float] = {}
        self._seconds_lock = threading.Lock()
        self._hashers: OrderedDict[str, tuple[CompressedTokenizer | None, NgramHasher]] = OrderedDict()
        self._hashers_lock = threading.Lock()
        self._echo = b""

    # ------------------------------------------------------------------ checks at the edge
    def _authorize(self, context) -> None:
        if not self.token:
            return
        given = dict(context.invocation_metadata()).get("authorization", "")
        if not given:
            raise Unauthenticated("this call writes or administers tables: send 'authorization: Bearer <token>'")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise PermissionDenied("the bearer token is not valid for this server")

    def _check_epoch(self, epoch: int) -> None:
        current = self.store.shard_state["epoch"]
        if epoch and not current:
            raise FailedPrecondition(f"the request names shard map epoch {epoch}, but this server is not a shard of a "
                                     "pool: send epoch 0", reason="NOT_A_SHARD")
        if epoch and epoch < current:
            raise StaleShardMap(f"stale shard map: request epoch {epoch}, shard epoch {current}; refresh the map")
        if epoch > current:
            raise ShardUnavailable(f"shard is at map epoch {current}, behind the request's {epoch}: being updated, retry",
                                   reason="SHARD_BEHIND")

    def _check_size(self, num_rows: int, row_nbytes: int, what: str) -> None:
        size = num_rows * row_nbytes
        if size > self.max_payload_bytes:
            raise ResourceExhausted(f"{what} of {num_rows} rows is {size / 2**20:.1f} MiB, over the "
                                    f"{self.max_payload_bytes / 2**20:.1f} MiB "
                                    f"limit: split it into batches of at most {self.max_payload_bytes // row_nbytes} rows")

    @staticmethod
    def _fingerprint(value: str) -> str:
        if not value:
            raise InvalidArgument("spec_fingerprint is required (GetTableInfo returns it)")
        return value

    # ------------------------------------------------------------------ reads
    @rpc("read")
    def Lookup(self, request, context):
        self._check_epoch(request.shard_epoch)
        ids = decode_array(request.row_ids, "<i8", "row_ids")
        return self._rows_reply(request.table, [(request.layer, ids)], request.version, request.spec_fingerprint)

    @rpc("read")
    def LookupLayers(self, request, context):
        self._check_epoch(request.shard_epoch)
        ids = decode_array(request.row_ids, "<i8", "row_ids")
        counts = list(request.counts)  # Python ints: a sum of huge counts cannot wrap around
        if len(request.layers) != len(counts) or any(c < 0 for c in counts) or sum(counts) != ids.size:
            raise InvalidArgument(f"LookupLayers: {len(request.layers)} layers and {len(counts)} counts (sum "
                                  f"{sum(counts)}) do not describe {ids.size} row ids: give one non-negative count per "
                                  "layer, summing to the ids sent")
        bounds = np.concatenate([[0], np.cumsum(counts)])
        parts = [(int(layer), ids[bounds[i]:bounds[i + 1]]) for i, layer in enumerate(request.layers)]
        return self._rows_reply(request.table, parts, request.version, request.spec_fingerprint)

    def _rows_reply(self, table: str, parts: list, version: int, fingerprint: str) -> bytes:
        """LookupResponse wire bytes of (layer, ids) parts' rows, gathered straight into the message (ownership
        checked first)."""
        for layer, ids in parts:
            self.store.check_owned(table, layer, ids)
        reply = []

        def into_reply(num_rows, head_dim, dtype, version):
            message, rows = lookup_reply(num_rows, head_dim, dtype, version)
            reply.append(message)
            return rows

        self.store.lookup_layers(table, parts, version, self._fingerprint(fingerprint), out=into_reply,
                                 max_bytes=self.max_payload_bytes)
        return reply[0]  # complete wire bytes: rows were gathered straight into the message

    def _hasher(self, meta: TableMeta) -> tuple[CompressedTokenizer | None, NgramHasher]:
        key = f"{meta.name}:{meta.spec.fingerprint()}"
        with self._hashers_lock:
            if key in self._hashers:
                self._hashers.move_to_end(key)
                return self._hashers[key]
        cmap = self.store.compression_map(meta.name)
        compressor = CompressedTokenizer(cmap) if cmap is not None else None
        hasher = (NgramHasher.from_compressor(meta.spec, compressor) if compressor is not None
                  else NgramHasher(meta.spec, meta.spec.compressed_vocab_size))
        with self._hashers_lock:
            self._hashers[key] = (compressor, hasher)
            while len(self._hashers) > HASHERS_KEPT:
                self._hashers.popitem(last=False)
        return compressor, hasher

    @rpc("read")
    def LookupTokens(self, request, context):
        meta = self.store.table_info(request.table)
        if request.spec_fingerprint:
            meta.check_request(request.layer, request.spec_fingerprint)
        tokens = decode_array(request.token_ids, "<i8", "token_ids")
        shape = tuple(request.shape) or (1, tokens.size)
        if len(shape) != 2 or min(shape) < 0 or shape[0] * shape[1] != tokens.size:
            raise InvalidArgument(f"shape {list(shape)[:4]} does not fit {tokens.size} token ids (give [batch, time])")
        if meta.spec.compressed_vocab_size is None:
            raise FailedPrecondition(f"table {shown(meta.name)} has no compressed vocabulary size in its spec: use Lookup "
                                     "with row ids", reason="NO_COMPRESSION")
        meta.check_request(request.layer, None)
        compressor, hasher = self._hasher(meta)
        tokens = tokens.reshape(shape)
        if not request.compressed:
            if compressor is None:
                raise FailedPrecondition(f"table {shown(meta.name)} has no compression map: send compressed ids "
                                         "(compressed=true)", reason="NO_COMPRESSION")
            tokens = compressor(tokens)
        per_row = ID_BYTES + (0 if request.row_ids_only else meta.row_nbytes)  # every reply carries the row ids
        self._check_size(tokens.size * meta.spec.num_heads, per_row, "token lookup response")
        row_ids = hasher.row_ids(tokens, layers=(request.layer,))[request.layer]  # [B, T, heads]
        out_shape = [*row_ids.shape, meta.row_width]
        if request.row_ids_only:
            return pb.LookupTokensResponse(shape=out_shape, dtype=dtype_enum(meta.dtype), row_ids=encode_ids(row_ids))
        owned = self.store.shard_state["owned"].get(meta.name) is not None
        unique, inverse = np.unique(row_ids.reshape(-1), return_inverse=True)
        if owned:  # a shard of a pool holds a range of the rows: the caller looks the rows up by shard
            try:
                self.store.check_owned(meta.name, request.layer, unique)
            except StaleShardMap:
                raise FailedPrecondition("the hashed rows lie on several shards of a pool: ask for row ids only "
                                         "(row_ids_only) and look them up by shard", reason="ROWS_ON_OTHER_SHARDS") from None
        rows, version = self.store.lookup(meta.name, request.layer, unique, request.version)
        full = rows[inverse].reshape(out_shape)
        return pb.LookupTokensResponse(rows=full.tobytes(), shape=out_shape, dtype=dtype_enum(full.dtype),
                                       version=version, row_ids=encode_ids(row_ids))

    @rpc("read")
    def ReadRange(self, request, context):
        meta = self.store.table_info(request.table)
        self._check_size(max(0, request.stop - request.start), meta.row_nbytes, "range")
        rows, version = self.store.read_range(request.table, request.layer, request.start, request.stop, request.version)
        return RawLookup(rows, rows.shape, dtype_enum(rows.dtype), version)

    @rpc("read")
    def GetTableInfo(self, request, context):
        return table_info_message(self.store.table_info(request.table))

    @rpc("read")
    def ListTables(self, request, context):
        return pb.ListTablesResponse(tables=[table_info_message(m) for m in self.store.list_tables()])

    @rpc("read")
    def Stats(self, request, context):
        return pb.StatsResponse(counters=self.counters())

    def counters(self) -> dict[str, float]:
        """Store counters and sizes, errors, the shard epoch and seconds spent per RPC (Stats and /metrics)."""
        counters = self.store.stats()
        counters["errors"] = float(self.errors)
        counters["shard_epoch"] = float(self.store.shard_state["epoch"])
        with self._seconds_lock:
            counters.update({f"seconds.{k}": v for k, v in self.seconds.items()})
        return counters

    @rpc("read")
    def Echo(self, request, context):
        if request.size > self.max_payload_bytes:
            raise ResourceExhausted(f"echo of {request.size} bytes is over the {self.max_payload_bytes}-byte payload limit")
        if len(self._echo) != request.size:
            self._echo = bytes(request.size)
        return pb.EchoResponse(payload=self._echo)

    # ------------------------------------------------------------------ writes
    @rpc("write")
    def WriteRows(self, request, context):
        meta = self.store.table_info(request.table)
        request_id = request_id_of(request)
        ids = decode_array(request.row_ids, "<i8", "row_ids")
        dtype = enum_dtype(request.dtype)
        if dtype != meta.dtype:
            raise InvalidArgument(f"rows are {dtype.name} but table {shown(meta.name)} stores {meta.dtype.name}")
        rows = decode_array(request.rows, dtype, "rows", width=meta.row_width)
        self.store.check_owned(request.table, request.layer, ids, write=True)
        if rows.shape[0] != ids.size:
            raise InvalidArgument(f"{ids.size} row ids but {rows.shape[0]} rows of width {meta.row_width}")
        self._check_size(ids.size, meta.row_nbytes, "write")
        version = self.store.write_rows(request.table, request.layer, ids, rows, request.version,
                                        self._fingerprint(request.spec_fingerprint), request_id)
        return pb.WriteRowsResponse(version=version, rows_written=ids.size)

    @rpc("write")
    def LoadRows(self, requests, context):
        """A stream of whole-chunk loads into one inactive version of one table; written in shared commits of up to
        WRITE_BATCH_BYTES (the messages of one commit are all checked first: a bad one writes none of them, the
        commits before it stay, and a load is idempotent, so the caller sends the stream again)."""
        loaded, batch, batch_bytes, first = 0, [], 0, None
        for request in requests:
            first = first or request
            if (request.table, request.version) != (first.table, first.version):
                raise InvalidArgument(f"a LoadRows stream loads one version of one table: it began with "
                                      f"{shown(first.table)} v{first.version}, then named {shown(request.table)} "
                                      f"v{request.version}")
            meta = self.store.table_info(request.table)
            dtype = enum_dtype(request.dtype)
            if dtype != meta.dtype:
                raise InvalidArgument(f"rows are {dtype.name} but table {shown(meta.name)} stores {meta.dtype.name}")
            rows = decode_array(request.rows, dtype, "rows", width=meta.row_width)
            self._check_size(rows.shape[0], meta.row_nbytes, "load")
            batch.append(RowLoad(request.table, request.layer, int(request.start_row), rows, int(request.version),
                                 self._fingerprint(request.spec_fingerprint)))
            batch_bytes += rows.nbytes
            if batch_bytes >= LOAD_BATCH_BYTES:
                loaded += self.store.load(batch)
                batch, batch_bytes = [], 0
        if batch:
            loaded += self.store.load(batch)
        return pb.WriteRowsResponse(version=first.version if first else 0, rows_written=loaded)

    @rpc("write")
    def ApplyGradients(self, request, context):
        self._check_epoch(request.shard_epoch)
        meta = self.store.table_info(request.table)
        request_id = request_id_of(request)
        ids = decode_array(request.row_ids, "<i8", "row_ids")
        grads = decode_array(request.gradients, "<f4", "gradients", width=meta.head_dim)
        self.store.check_owned(request.table, request.layer, ids, write=True)
        if grads.shape[0] != ids.size:
            raise InvalidArgument(f"{ids.size} row ids but {grads.shape[0]} gradient rows of width {meta.head_dim}")
        self._check_size(ids.size, meta.head_dim * 4, "gradient push")
        version = self.store.apply_gradients(request.table, request.layer, ids, grads, float(request.learning_rate),
                                             request.version, self._fingerprint(request.spec_fingerprint), request_id)
        return pb.ApplyGradientsResponse(version=version, rows_updated=ids.size)

    # ------------------------------------------------------------------ admin
    @rpc("admin")
    def CreateTable(self, request, context):
        spec = parse_spec(request.spec_json)
        cmap = decode_array(request.compression_map, "<i8", "compression_map") if request.compression_map else None
        meta = self.store.create_table(request.table, spec, cmap, request.init_std, request.init_seed, request.chunk_rows or None)
        return table_info_message(meta)

    @rpc("admin")
    def CreateVersion(self, request, context):
        source = request.WhichOneof("source")
        if source == "copy_of":
            version = self.store.create_version(request.table, copy_of=request.copy_of)
        elif source == "init_std":
            version = self.store.create_version(request.table, init_std=request.init_std, init_seed=request.init_seed)
        elif source == "empty":
            version = self.store.create_version(request.table, init_std=0.0)
        else:
            raise InvalidArgument("CreateVersion needs a source: copy_of, empty or init_std")
        return pb.CreateVersionResponse(version=version)

    @rpc("admin")
    def Swap(self, request, context):
        active, previous = self.store.swap(request.table, request.version)
        return pb.SwapResponse(active_version=active, previous_version=previous)

    @rpc("admin")
    def Rollback(self, request, context):
        active, previous = self.store.rollback(request.table)
        return pb.SwapResponse(active_version=active, previous_version=previous)

    @rpc("admin")
    def DropVersion(self, request, context):
        self.store.drop_version(request.table, request.version)
        return pb.DropVersionResponse()

    @rpc("admin")
    def DropTable(self, request, context):
        self.store.drop_table(request.table)
        return pb.DropTableResponse()


def _parsing(handler, request_cls):
    """Parse the request inside the handler, so malformed bytes get INVALID_ARGUMENT (not INTERNAL)."""

    def parse_then_handle(raw: bytes, context):
        try:
            request = request_cls.FromString(raw)
        except (DecodeError, RecursionError) as e:
            abort(context, _malformed(request_cls, e))
        return handler(request, context)
    return parse_then_handle


def _parsing_stream(handler, request_cls):
    """The same for a client stream: each message is parsed as the handler reads it; a malformed one ends the call
    with INVALID_ARGUMENT (raised inside the handler, whose errors become statuses)."""

    def parse_then_handle(raws, context):
        def requests():
            received = iter(raws)
            while True:
                try:
                    raw = next(received)
                except StopIteration:
                    return
                except grpc.RpcError:  # cancelled or past its deadline: not a server error, and no commit follows
                    raise Cancelled(f"the client ended its {request_cls.__name__} stream early") from None
                try:
                    yield request_cls.FromString(raw)
                except (DecodeError, RecursionError) as e:
                    raise _malformed(request_cls, e) from None
        return handler(requests(), context)
    return parse_then_handle


def _malformed(request_cls, error: Exception) -> InvalidArgument:
    return InvalidArgument(f"malformed {request_cls.__name__}: {str(error)[:200]}", reason="MALFORMED_REQUEST")


def add_servicer_to_server(servicer: EngramMemoryServicer, server: grpc.Server) -> None:
    """Register every engram.v1 method; LookupResponse replies use the one-copy encoder."""
    service = pb.DESCRIPTOR.services_by_name["EngramMemory"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        serializer = encode_lookup_response if response_cls is pb.LookupResponse else response_cls.SerializeToString
        if method.client_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                _parsing_stream(getattr(servicer, method.name), request_cls), response_serializer=serializer)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _parsing(getattr(servicer, method.name), request_cls), response_serializer=serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
