"""The memory service's gRPC server: one TableStore behind engram.v1, health and reflection.

`engram serve --path DIR --port P` runs it standalone (binds 127.0.0.1 by default);
the Ray shard actors host the same server inside each actor.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import signal
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memory_service.servicer import EngramMemoryServicer, add_servicer_to_server
from memory_service.store import TableStore
from memory_service.wire import channel_options
from protos import engram_pb2 as pb

# Handler threads: rows are gathered under the GIL, so more threads than cores only contend
# (8 threads made 8 concurrent 4 MiB lookups 3x slower than 2 on 2 cores).
DEFAULT_WORKERS = max(2, min(4, os.cpu_count() or 2))
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EngramMemory"].full_name
log = logging.getLogger("engram.server")


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_exposure(host: str, token: str | None, tls: bool, allow_unauthenticated: bool) -> None:
    """Refuse a server reachable from other machines with writes and admin open to anyone (unless asked for)."""
    if is_loopback(host):
        return
    if not token and not allow_unauthenticated:
        raise ValueError(f"binding {host} makes the service reachable from other machines, and without a token anyone "
                         "there could write and drop tables: give --token (or $ENGRAM_TOKEN), or pass "
                         "--allow-unauthenticated if that is really what you want")
    if token and not tls:
        log.warning("serving on %s without TLS: the token travels in clear text (give --tls-cert and --tls-key)", host)


def build_server(store: TableStore, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, max_workers: int = DEFAULT_WORKERS,
                 allow_unauthenticated: bool = False) -> tuple[grpc.Server, int, EngramMemoryServicer]:
    """A started-ready (not yet started) server for a store; returns (server, bound port, servicer).

    A host other than loopback needs a token unless allow_unauthenticated (see check_exposure).
    """
    check_exposure(host, token, bool(tls_cert or tls_key), allow_unauthenticated)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="engram-rpc"),
                         options=channel_options())
    servicer = EngramMemoryServicer(store, token=token)
    add_servicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        credentials = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {address} (in use, or not an address of this machine)")
    return server, bound, servicer


def keep_warm(store: TableStore, every_s: float, stop: threading.Event) -> None:
    """Read the active version of every table (pages into the page cache); again every every_s seconds if > 0."""
    while not stop.is_set():
        started, total = time.perf_counter(), 0
        try:
            for meta in store.list_tables():
                total += store.warm(meta.name, stop=stop)
        except Exception:  # noqa: BLE001 - a table dropped meanwhile, a store closing: try again next round
            log.exception("warming the tables failed")
        log.info("warmed %.1f GiB of rows in %.1f s", total / 2**30, time.perf_counter() - started)
        if every_s <= 0 or stop.wait(every_s):
            return


def serve(path: str, host: str = "127.0.0.1", port: int = 50051, token: str | None = None,
          tls_cert: str | None = None, tls_key: str | None = None, ready=None, max_workers: int | None = None,
          metrics_port: int | None = None, max_delta_rows: int | None = None, allow_unauthenticated: bool = False,
          warm_every_s: float | None = None) -> None:
    """Run a server on a store directory until SIGTERM/SIGINT, then stop gracefully (and /metrics on metrics_port).

    warm_every_s: None leaves the page cache alone; 0 reads the active version of every table once at start (in the
    background: lookups are served meanwhile); > 0 reads them again every that many seconds, against a host that
    evicts idle page cache."""
    from memory_service.metrics import MetricsServer

    check_exposure(host, token, bool(tls_cert or tls_key), allow_unauthenticated)  # before opening anything
    if warm_every_s is not None and (not math.isfinite(warm_every_s) or warm_every_s < 0):
        raise ValueError(f"--keep-warm takes seconds >= 0, got {warm_every_s}")
    store = TableStore(path, **({"max_delta_rows": max_delta_rows} if max_delta_rows else {}))
    workers = max_workers or int(os.environ.get("ENGRAM_SERVER_THREADS", DEFAULT_WORKERS))
    try:
        server, bound, servicer = build_server(store, host, port, token, tls_cert, tls_key, max_workers=workers,
                                               allow_unauthenticated=allow_unauthenticated)
    except BaseException:
        store.close()
        raise
    server.start()
    metrics = None
    if metrics_port is not None:
        metrics = MetricsServer(servicer.counters, host, metrics_port, labels={"service": f"{host}:{bound}"})
        log.info("metrics on http://%s:%d/metrics", host, metrics.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    warmer = None
    if warm_every_s is not None:
        warmer = threading.Thread(target=keep_warm, args=(store, warm_every_s, stop), name="engram-warm", daemon=True)
        warmer.start()
    if ready is not None:
        ready(bound)
    try:
        stop.wait()
    finally:
        if metrics is not None:
            metrics.stop()
        server.stop(grace=5).wait()
        if warmer is not None:
            warmer.join()  # it stops between batches once `stop` is set; the store must outlive its reads
        store.close()
