"""gRPC servicer of engram.v1.EngramMemory: decode raw bytes, call the store, encode raw bytes.

Thin by design: all logic lives in TableStore (and the hashing modules for token
lookups). Every error a caller can cause maps to a precise status code and leaves the
server up and the store unchanged.
"""

from __future__ import annotations

import functools
import hmac
import logging
import threading
import time

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from memory_service.compression import CompressedTokenizer
from memory_service.errors import EngramError, FailedPrecondition, InvalidArgument, ResourceExhausted, ShardUnavailable
from memory_service.hashing import NgramHasher
from memory_service.store import TableStore
from memory_service.table_meta import TableMeta
from memory_service.wire import (MAX_PAYLOAD_BYTES, RawLookup, decode_array, dtype_enum, encode_ids,
                                 encode_lookup_response, enum_dtype, lookup_reply)
from protos import engram_pb2 as pb
from protos import engram_pb2_grpc as pb_grpc

log = logging.getLogger("engram.server")


def rpc(kind: str):
    """Wrap a handler: auth for writes/admin, error -> status code mapping, counters."""

    def wrap(method):
        @functools.wraps(method)
        def handler(self, request, context):
            if kind in ("write", "admin"):
                self._authorize(context)
            started = time.perf_counter()
            try:
                return method(self, request, context)
            except EngramError as e:
                self.errors += 1
                context.abort(getattr(grpc.StatusCode, e.code), str(e))
            except (ValueError, KeyError) as e:
                self.errors += 1
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
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
        versions=[pb.VersionInfo(version=v, source=info["source"], created_unix=info["created"]) for v, info in sorted(meta.versions.items())],
        layer_rows=meta.layer_rows, chunk_rows=meta.chunk_rows, dtype=dtype_enum(meta.dtype), head_dim=meta.head_dim,
        has_compression_map=meta.has_compression, swap_history=meta.history,
    )


class EngramMemoryServicer(pb_grpc.EngramMemoryServicer):
    """Serves one TableStore."""

    def __init__(self, store: TableStore, token: str | None = None, max_payload_bytes: int = MAX_PAYLOAD_BYTES):
        self.store = store
        self.token = token
        self.max_payload_bytes = max_payload_bytes
        self.errors = 0
        self.seconds: dict[str, float] = {}
        self._seconds_lock = threading.Lock()
        self._hashers: dict[str, tuple[CompressedTokenizer | None, NgramHasher]] = {}
        self._echo = b""

    # ------------------------------------------------------------------ helpers
    def _authorize(self, context) -> None:
        if not self.token:
            return
        metadata = dict(context.invocation_metadata())
        given = metadata.get("authorization", "")
        if not given:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "this call writes or administers tables: send 'authorization: Bearer <token>'")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "the bearer token is not valid for this server")

    def _check_epoch(self, epoch: int) -> None:
        current = self.store.shard_state["epoch"]
        if epoch and current and epoch < current:
            raise FailedPrecondition(f"stale shard map: request epoch {epoch}, shard epoch {current}; refresh the map")
        if epoch and epoch > current:
            raise ShardUnavailable(f"shard is at map epoch {current}, behind the request's {epoch}: being updated, retry")

    def _check_size(self, num_rows: int, row_nbytes: int, what: str) -> None:
        size = num_rows * row_nbytes
        if size > self.max_payload_bytes:
            raise ResourceExhausted(f"{what} of {num_rows} rows is {size / 2**20:.1f} MiB, over the {self.max_payload_bytes / 2**20:.1f} MiB "
                                    f"limit: split it into batches of at most {self.max_payload_bytes // row_nbytes} rows")

    def _fingerprint(self, value: str) -> str:
        if not value:
            raise InvalidArgument("spec_fingerprint is required (GetTableInfo returns it)")
        return value

    # ------------------------------------------------------------------ reads
    @rpc("read")
    def Lookup(self, request, context):
        self._check_epoch(request.shard_epoch)
        ids = decode_array(request.row_ids, "<i8", "row_ids")
        self.store.check_owned(request.table, request.layer, ids)
        reply = []

        def into_reply(num_rows, head_dim, dtype, version):
            message, rows = lookup_reply(num_rows, head_dim, dtype, version)
            reply.append(message)
            return rows

        self.store.lookup(request.table, request.layer, ids, request.version, self._fingerprint(request.spec_fingerprint),
                          out=into_reply, max_bytes=self.max_payload_bytes)
        return reply[0]  # complete wire bytes: rows were gathered straight into the message

    def _hasher(self, meta: TableMeta):
        key = f"{meta.name}:{meta.spec.fingerprint()}"
        if key not in self._hashers:
            cmap = self.store.compression_map(meta.name)
            compressor = CompressedTokenizer(cmap) if cmap is not None else None
            hasher = (NgramHasher.from_compressor(meta.spec, compressor) if compressor is not None
                      else NgramHasher(meta.spec, meta.spec.compressed_vocab_size))
            self._hashers[key] = (compressor, hasher)
        return self._hashers[key]

    @rpc("read")
    def LookupTokens(self, request, context):
        meta = self.store.table_info(request.table)
        if request.spec_fingerprint and request.spec_fingerprint != meta.spec.fingerprint():
            raise FailedPrecondition(f"spec fingerprint {request.spec_fingerprint!r} does not match table {meta.name!r}")
        tokens = decode_array(request.token_ids, "<i8", "token_ids")
        shape = tuple(request.shape) or (1, tokens.size)
        if len(shape) != 2 or shape[0] * shape[1] != tokens.size:
            raise InvalidArgument(f"shape {list(shape)} does not fit {tokens.size} token ids (give [batch, time])")
        if meta.spec.compressed_vocab_size is None:
            raise FailedPrecondition(f"table {meta.name!r} has no compressed vocabulary size in its spec: use Lookup with row ids")
        compressor, hasher = self._hasher(meta)
        tokens = tokens.reshape(shape)
        if not request.compressed:
            if compressor is None:
                raise FailedPrecondition(f"table {meta.name!r} has no compression map: send compressed ids (compressed=true)")
            tokens = compressor(tokens)
        if request.layer not in meta.layer_rows:
            raise InvalidArgument(f"table {meta.name!r} has no layer {request.layer}; its layers are {sorted(meta.layer_rows)}")
        row_ids = hasher.row_ids(tokens, layers=(request.layer,))[request.layer]
        self._check_size(row_ids.size, meta.row_nbytes, "token lookup response")
        unique, inverse = np.unique(row_ids.reshape(-1), return_inverse=True)
        rows, version = self.store.lookup(meta.name, request.layer, unique, request.version)
        full = rows[inverse].reshape(*row_ids.shape, meta.head_dim)
        return pb.LookupTokensResponse(rows=full.tobytes(), shape=list(full.shape), dtype=dtype_enum(full.dtype),
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
        if request.size > self.max_payload_bytes * 4:
            raise ResourceExhausted(f"echo of {request.size} bytes is over the limit")
        if len(self._echo) != request.size:
            self._echo = bytes(request.size)
        return pb.EchoResponse(payload=self._echo)

    # ------------------------------------------------------------------ writes
    @rpc("write")
    def WriteRows(self, request, context):
        meta = self.store.table_info(request.table)
        ids = decode_array(request.row_ids, "<i8", "row_ids")
        dtype = enum_dtype(request.dtype)
        if dtype != meta.dtype:
            raise InvalidArgument(f"rows are {dtype.name} but table {meta.name!r} stores {meta.dtype.name}")
        rows = decode_array(request.rows, dtype, "rows", width=meta.head_dim)
        self.store.check_owned(request.table, request.layer, ids, write=True)
        if rows.shape[0] != ids.size:
            raise InvalidArgument(f"{ids.size} row ids but {rows.shape[0]} rows of width {meta.head_dim}")
        self._check_size(ids.size, meta.row_nbytes, "write")
        version = self.store.write_rows(request.table, request.layer, ids, rows, request.version,
                                        self._fingerprint(request.spec_fingerprint), request.request_id or None)
        return pb.WriteRowsResponse(version=version, rows_written=ids.size)

    @rpc("write")
    def ApplyGradients(self, request, context):
        self._check_epoch(request.shard_epoch)
        meta = self.store.table_info(request.table)
        ids = decode_array(request.row_ids, "<i8", "row_ids")
        grads = decode_array(request.gradients, "<f4", "gradients", width=meta.head_dim)
        self.store.check_owned(request.table, request.layer, ids, write=True)
        if grads.shape[0] != ids.size:
            raise InvalidArgument(f"{ids.size} row ids but {grads.shape[0]} gradient rows of width {meta.head_dim}")
        self._check_size(ids.size, meta.head_dim * 4, "gradient push")
        version = self.store.apply_gradients(request.table, request.layer, ids, grads, float(request.learning_rate),
                                             request.version, self._fingerprint(request.spec_fingerprint),
                                             request.request_id or None)
        return pb.ApplyGradientsResponse(version=version, rows_updated=ids.size)

    # ------------------------------------------------------------------ admin
    @rpc("admin")
    def CreateTable(self, request, context):
        from memory_service.spec import EngramSpec

        try:
            spec = EngramSpec.from_json(request.spec_json)
        except (ValueError, TypeError) as e:
            raise InvalidArgument(f"spec_json is not a valid EngramSpec: {e}") from e
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
        except DecodeError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request_cls.__name__}: {e}")
        return handler(request, context)
    return parse_then_handle


def add_servicer_to_server(servicer: EngramMemoryServicer, server: grpc.Server) -> None:
    """Register every engram.v1 method; LookupResponse replies use the one-copy encoder."""
    service = pb.DESCRIPTOR.services_by_name["EngramMemory"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        serializer = encode_lookup_response if response_cls is pb.LookupResponse else response_cls.SerializeToString
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _parsing(getattr(servicer, method.name), request_cls), response_serializer=serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
