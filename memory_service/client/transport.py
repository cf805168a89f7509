"""How the client talks to shards: channels, deadlines, retries, and the stale shard map protocol.

Every call has a deadline. UNAVAILABLE and DEADLINE_EXCEEDED are retried with backoff
within a retry budget (writes carry a request id, so a retried write is applied once).
A shard that refuses a request with reason STALE_SHARD_MAP, or one that stays
unavailable while the directory moved on to a newer map, raises StaleShardMap: the
caller re-reads the map from its map provider (a pool's directory) and plans again.
Server errors come back as memory_service.errors exceptions (code + reason).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import grpc

from memory_service.errors import ShardUnavailable, StaleShardMap
from memory_service.shard_map import ShardMap
from memory_service.status import error_from_rpc
from memory_service.wire import channel_options, decode_lookup_response
from protos import engram_pb2 as pb
from protos import engram_pb2_grpc as pb_grpc

CALL_THREADS = 32  # calls in flight at once per client (a lookup of 65k rows is about 10 messages)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
RAW_REPLY_METHODS = {"Lookup": pb.LookupRequest, "LookupLayers": pb.LookupLayersRequest,
                     "ReadRange": pb.ReadRangeRequest}  # rows arrive as zero-copy views


def parse_address(url: str) -> str:
    """'grpc://host:port' or 'host:port' -> 'host:port'."""
    address = url[len("grpc://"):] if url.startswith("grpc://") else url
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"memory service address must look like grpc://HOST:PORT or HOST:PORT, got {url!r}")
    return address


def as_shard_map(shards: ShardMap | str | list[str]) -> ShardMap:
    """A ShardMap from a map, one address, or a list of addresses (one shard each)."""
    if isinstance(shards, ShardMap):
        return shards
    return ShardMap([parse_address(a) for a in ([shards] if isinstance(shards, str) else shards)])


class ShardChannels:
    """Channels to the shards of a map and the calls made on them.

    `map_provider()` -> (ShardMap, active version) re-reads the map after a stale-map
    refusal (a pool's directory); without one a stale map is an error for the caller.
    """

    def __init__(self, shards: ShardMap | str | list[str], token: str | None = None, deadline_s: float = 30.0,
                 retry_budget_s: float = 30.0, tls_root_cert: bytes | None = None, map_provider=None):
        self.shard_map = as_shard_map(shards)
        self.map_provider = map_provider
        self.active_version = 0  # with a map provider: the directory's active version
        self.token = token
        self.deadline_s = deadline_s
        self.retry_budget_s = retry_budget_s
        self.tls_root_cert = tls_root_cert
        self._channels: list[grpc.Channel] = []
        self._retired: list[grpc.Channel] = []  # channels of earlier maps: calls may still be in flight on them
        self._stubs: list[pb_grpc.EngramMemoryStub] = []
        self._map_lock = threading.Lock()  # the prefetch, push and main threads may refresh at once
        self._pool = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="engram-call")  # threads made as needed
        self._open()
        if map_provider is not None:
            self.refresh_map()

    # ------------------------------------------------------------------ channels and maps
    def _open(self) -> None:
        self._retired.extend(self._channels)  # closed by close(): another thread may be waiting on them
        options = channel_options()
        if self.tls_root_cert:
            credentials = grpc.ssl_channel_credentials(self.tls_root_cert)
            self._channels = [grpc.secure_channel(a, credentials, options=options) for a in self.shard_map.addresses]
        else:
            self._channels = [grpc.insecure_channel(a, options=options) for a in self.shard_map.addresses]
        self._stubs = [pb_grpc.EngramMemoryStub(c) for c in self._channels]
        for channel, stub in zip(self._channels, self._stubs):
            for method, request_cls in RAW_REPLY_METHODS.items():
                setattr(stub, method, channel.unary_unary(f"/engram.v1.EngramMemory/{method}",
                                                          request_serializer=request_cls.SerializeToString,
                                                          response_deserializer=decode_lookup_response))

    def set_shard_map(self, shard_map: ShardMap) -> None:
        """Switch to another shard map (after a stale-map refusal)."""
        with self._map_lock:
            if shard_map.addresses != self.shard_map.addresses:
                self.shard_map = shard_map
                self._open()
            self.shard_map = shard_map

    def refresh_map(self) -> None:
        """Re-read the shard map and active version from the map provider."""
        if self.map_provider is None:
            raise StaleShardMap("the shard map is stale and this client has no map provider to refresh it")
        shard_map, version = self.map_provider()
        self.set_shard_map(shard_map)
        self.active_version = version

    def map_moved(self) -> bool:
        """Whether the directory has a newer map than this client (only with a map provider)."""
        if self.map_provider is None:
            return False
        try:
            shard_map, _ = self.map_provider()
        except Exception:  # noqa: BLE001 - the directory itself unreachable: keep retrying the shard
            return False
        return shard_map.epoch != self.shard_map.epoch

    def with_fresh_map(self, operation, attempts: int = 20):
        """Run operation(); after a stale-map refusal, refresh the map and run it again."""
        delay = 0.05
        for attempt in range(attempts):
            try:
                return operation()
            except StaleShardMap:
                if self.map_provider is None or attempt == attempts - 1:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                self.refresh_map()

    def stub(self, shard: int):
        """The stub of a shard of the current map; a call planned on a map with more shards is stale."""
        stubs = self._stubs
        if shard >= len(stubs):
            raise StaleShardMap(f"shard {shard} is not in the current map ({len(stubs)} shards): plan again")
        return stubs[shard]

    # ------------------------------------------------------------------ calls
    def metadata(self):
        """Call metadata: the bearer token, when there is one."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def call(self, shard: int, method: str, request, retry: bool = True):
        """One unary call with a deadline, retried on UNAVAILABLE / DEADLINE_EXCEEDED within the retry budget."""
        deadline = time.monotonic() + self.retry_budget_s
        delay = 0.05
        while True:
            try:
                return getattr(self.stub(shard), method)(_sent(request), timeout=self.deadline_s, metadata=self.metadata())
            except grpc.RpcError as e:
                if e.code() in RETRYABLE and self.map_moved():
                    raise StaleShardMap(f"{method}: shard {self.shard_map.addresses[shard]} unavailable and the shard map "
                                        "has changed; refresh it") from e
                if not retry or e.code() not in RETRYABLE or time.monotonic() + delay > deadline:
                    if e.code() in RETRYABLE:
                        raise ShardUnavailable(f"shard {shard} ({self.shard_map.addresses[shard]}) {method}: "
                                               f"{e.code().name} for {self.retry_budget_s:.0f}s: {e.details()}") from e
                    raise error_from_rpc(e, f"{method} on {self.shard_map.addresses[shard]}: ") from e
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def send(self, calls: list[tuple[int, str, object]]) -> list:
        """Start several (shard, method, request) calls at once; returns their futures (whose result() raises the
        call's grpc.RpcError). A request that is a list is the messages of a client stream (LoadRows).

        Each call is a blocking call on a thread of this client's own pool, not gRPC's `.future()`: on a channel
        with no call in flight, `.future()` starts a new polling thread and waits for it to run, about 1 ms a call
        on this 2-core machine (2.3 ms of a decoding step's 5 ms of client time, profiled). A call's deadline
        starts when a thread takes it: beyond CALL_THREADS calls in flight, the rest wait their turn first."""
        return [self._pool.submit(getattr(self.stub(s), m), _sent(r), timeout=self.deadline_s, metadata=self.metadata())
                for s, m, r in calls]

    def results(self, calls: list[tuple[int, str, object]], futures: list):
        """Yield the results of started calls in order as each arrives; a failed one is retried alone."""
        for (shard, method, request), future in zip(calls, futures):
            try:
                yield future.result()
            except (CancelledError, ValueError) as e:  # the client was closed: queued calls cancelled, channels closed
                raise ShardUnavailable(f"shard {shard} {method}: the client was closed with the call in flight") from e
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    raise error_from_rpc(e, f"{method} on {self.shard_map.addresses[shard]}: ") from e
                yield self.call(shard, method, request)

    def call_all(self, calls: list[tuple[int, str, object]]) -> list:
        """Send several calls at once (futures); a failed one is retried alone; results in order."""
        return list(self.results(calls, self.send(calls)))

    def broadcast(self, method: str, request, retry: bool = True) -> list:
        """The same call on every shard of the map, one after the other; replies in shard order."""
        return [self.call(s, method, request, retry=retry) for s in range(self.shard_map.num_shards)]

    def close(self) -> None:
        """Close the channels."""
        self._pool.shutdown(wait=False, cancel_futures=True)  # queued calls never start on a closed channel
        for channel in self._channels + self._retired:
            channel.close()
        self._retired = []


def _sent(request):
    """What a stub takes: a message, or for a client stream (a list of messages) a fresh iterator over them, so a
    retried stream sends them all again."""
    return iter(request) if isinstance(request, list) else request
