"""A bounded fuzz of every RPC of a real `engram serve`: malformed requests never crash, hang or change what is stored.

Each round mutates a valid request of one method (random bytes, truncation, bit flips,
absurd field values) and sends it with the token, so writes and admin calls reach their
handlers. Every reply must be OK or a precise client-error code: never UNKNOWN or
INTERNAL (a bug of ours), never a timeout (a hang) or UNAVAILABLE (a crash). A refused
write or admin call must leave the stored tables exactly as they were.
"""

import hashlib

import grpc
import numpy as np
import pytest

from memory_service.admin import ServiceAdmin
from memory_service.spec import EngramSpec
from memory_service.wire import encode_ids
from orchestration.local_server import start_server
from protos import engram_pb2 as pb

pytestmark = pytest.mark.slow

TOKEN = "fuzz-token"
ROUNDS_PER_METHOD = 200
SPEC = EngramSpec(engram_vocab_size=[503, 509], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1, 2], pad_id=1)
CHANGES = {"WriteRows", "ApplyGradients", "CreateTable", "CreateVersion", "Swap", "Rollback", "DropVersion", "DropTable"}
ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}
ABSURD_INTS = [0, 1, -1, 2**31 - 1, -2**31, 2**63 - 1, -2**63, 2**64 - 1, 2**40]
ABSURD_FLOATS = [float("nan"), float("inf"), -float("inf"), 3.4e38, -1.0, 1e-45, 0.0]


def valid_requests(fp: str) -> dict:
    """One valid request per method, on table "fz" (the sentinel table "keep" is never named)."""
    head = SPEC.head_dim
    ids = encode_ids(np.array([1, 5, 9]))
    rows = np.ones((3, head), np.float32).tobytes()
    return {
        "Lookup": pb.LookupRequest(table="fz", layer=1, spec_fingerprint=fp, row_ids=ids),
        "LookupLayers": pb.LookupLayersRequest(table="fz", spec_fingerprint=fp, layers=[1, 2], counts=[2, 1], row_ids=ids),
        "LookupTokens": pb.LookupTokensRequest(table="fz", layer=2, token_ids=encode_ids(np.array([3, 4, 5, 6])), shape=[2, 2],
                                               compressed=True),
        "WriteRows": pb.WriteRowsRequest(table="fz", layer=1, spec_fingerprint=fp, row_ids=ids, rows=rows, dtype=pb.FLOAT32,
                                         request_id="a" * 32),
        "ApplyGradients": pb.ApplyGradientsRequest(table="fz", layer=2, spec_fingerprint=fp, row_ids=ids, gradients=rows,
                                                   learning_rate=0.01, request_id="b" * 32),
        "GetTableInfo": pb.GetTableInfoRequest(table="fz"),
        "ListTables": pb.ListTablesRequest(),
        "CreateTable": pb.CreateTableRequest(table="fz2", spec_json=SPEC.to_json(), init_std=0.5, chunk_rows=256),
        "CreateVersion": pb.CreateVersionRequest(table="fz", copy_of=1),
        "Swap": pb.SwapRequest(table="fz", version=2),
        "Rollback": pb.RollbackRequest(table="fz"),
        "DropVersion": pb.DropVersionRequest(table="fz", version=2),
        "DropTable": pb.DropTableRequest(table="fz"),
        "ReadRange": pb.ReadRangeRequest(table="fz", layer=1, start=0, stop=50),
        "Stats": pb.StatsRequest(),
        "Echo": pb.EchoRequest(size=64, payload=b"x" * 8),
    }


def absurd(request, rng) -> bytes:
    """The request with one field set to an extreme value of its type."""
    fields = request.DESCRIPTOR.fields
    if not fields:  # a message without fields: unknown fields are all there is to send
        return b"\x08" + bytes([int(rng.integers(1, 128))])
    field = fields[int(rng.integers(len(fields)))]
    copy = type(request)()
    copy.CopyFrom(request)
    kind = field.type
    try:
        if field.is_repeated:
            getattr(copy, field.name).extend([ABSURD_INTS[int(rng.integers(len(ABSURD_INTS)))] % 2**62] * int(rng.integers(1, 6)))
        elif kind in (field.TYPE_FLOAT, field.TYPE_DOUBLE):
            setattr(copy, field.name, ABSURD_FLOATS[int(rng.integers(len(ABSURD_FLOATS)))])
        elif kind == field.TYPE_STRING:
            setattr(copy, field.name, ["", "x" * 70_000, "../etc", "\u00e9" * 300, "fz"][int(rng.integers(5))])
        elif kind == field.TYPE_BYTES:
            setattr(copy, field.name, bytes(rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8)))
        elif kind == field.TYPE_BOOL:
            setattr(copy, field.name, not getattr(copy, field.name))
        else:
            value = ABSURD_INTS[int(rng.integers(len(ABSURD_INTS)))]
            bits = 32 if kind in (field.TYPE_INT32, field.TYPE_UINT32, field.TYPE_ENUM) else 64
            signed = kind in (field.TYPE_INT32, field.TYPE_INT64, field.TYPE_ENUM)
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            setattr(copy, field.name, min(max(value, lo), hi))
    except (TypeError, ValueError):  # a value protobuf itself refuses to hold
        pass
    return copy.SerializeToString()


def mutate(request, rng) -> bytes:
    """Random bytes, a truncation, bit flips or an absurd field value of a valid request."""
    raw = bytearray(request.SerializeToString())
    how = int(rng.integers(4))
    if how == 0:
        return bytes(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8))
    if how == 1:
        return bytes(raw[: int(rng.integers(0, len(raw) + 1))])
    if how == 2 and raw:
        for _ in range(int(rng.integers(1, 9))):
            position = int(rng.integers(len(raw)))
            raw[position] ^= 1 << int(rng.integers(8))
        return bytes(raw)
    return absurd(request, rng)


def digest(channel) -> str:
    """What the server stores: every table's versions and history, and every row of the original tables' first versions
    (versions the fuzz itself creates are counted, not read: reading them all would make each check slower and slower)."""
    list_tables = channel.unary_unary("/engram.v1.EngramMemory/ListTables", request_serializer=pb.ListTablesRequest.SerializeToString,
                                      response_deserializer=pb.ListTablesResponse.FromString)
    read = channel.unary_unary("/engram.v1.EngramMemory/ReadRange", request_serializer=pb.ReadRangeRequest.SerializeToString,
                               response_deserializer=pb.LookupResponse.FromString)
    h = hashlib.sha256()
    for table in sorted(list_tables(pb.ListTablesRequest(), timeout=30).tables, key=lambda t: t.name):
        h.update(repr((table.name, table.active_version, [v.version for v in table.versions], list(table.swap_history),
                       table.spec_fingerprint)).encode())
        if table.name not in ("fz", "keep"):
            continue
        for version in [v for v in table.versions if v.version <= 2]:
            for layer, rows in sorted(table.layer_rows.items()):
                for start in range(0, rows, 4000):
                    reply = read(pb.ReadRangeRequest(table=table.name, layer=layer, version=version.version, start=start,
                                                     stop=min(rows, start + 4000)), timeout=30)
                    h.update(reply.rows)
    return h.hexdigest()


def test_fuzzed_requests_never_crash_hang_or_change_what_is_stored(tmp_path):
    proc, address = start_server(tmp_path / "store", token=TOKEN)
    try:
        admin = ServiceAdmin(address, token=TOKEN)
        cmap = np.arange(600) % 500  # a compression map: 600 raw ids onto 500
        admin.create_table("fz", SPEC.with_compression(cmap, 500), cmap, init_std=1.0, chunk_rows=256)
        admin.create_table("keep", SPEC, init_std=1.0, chunk_rows=256)
        admin.create_version("fz", copy_of=1)
        fp = admin.info("fz").fingerprint
        channel = grpc.insecure_channel(address)
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        rng = np.random.default_rng(2026)
        counts, bad = {}, []
        state = digest(channel)
        keep_before = [line for line in admin.list_tables() if line.name == "keep"]
        for method, request in valid_requests(fp).items():
            call = channel.unary_unary(f"/engram.v1.EngramMemory/{method}")  # raw bytes both ways
            for _ in range(ROUNDS_PER_METHOD):
                payload = mutate(request, rng)
                try:
                    call(payload, metadata=metadata, timeout=20)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                counts[code] = counts.get(code, 0) + 1
                if code not in ALLOWED:
                    bad.append((method, code, payload[:80]))
                    continue
                if method in CHANGES:
                    after = digest(channel)
                    if code != "OK" and after != state:
                        bad.append((method, f"{code} but the store changed", payload[:80]))
                    state = after
        assert not bad, f"{len(bad)} bad replies, e.g. {bad[:5]}; replies: {counts}"
        assert sum(counts.values()) == ROUNDS_PER_METHOD * len(valid_requests(fp)) and counts.get("INVALID_ARGUMENT", 0) > 500
        assert proc.poll() is None  # still up
        assert [t for t in admin.list_tables() if t.name == "keep"] == keep_before  # never named, never touched
        assert admin.export_rows("keep", 1).shape[0] == admin.info("keep").layer_rows[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
