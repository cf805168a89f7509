"""`engram serve-model`: a trained model served over HTTP by Ray Serve, its Engram rows read from a memory pool.

    engram cluster up                                                    # a Ray head and a memory pool
    engram serve-model --checkpoint runs/small/checkpoint --memory pool --replicas 2
    curl -s 127.0.0.1:8000/v1/completions -d '{"prompt": "def main():", "max_tokens": 32}'
    engram serve-model scale 3                                           # replicas, not memory shards
    engram serve-model status | down

Each replica (a Ray Serve replica actor, on a GPU when the cluster has them) loads the checkpoint
(from a path every node can read), opens the table on the pool with a row cache in front
(row_cache.py) and runs a DecodingEngine; HTTP requests join its running batch. Routes:

    POST /v1/completions   the JSON API of model_worker/completions.py; "stream": true answers with
                           server-sent events ("data: {json}" per event, then "data: [DONE]")
    GET  /v1/stats         this replica's engine, row cache and request counters
    GET  /healthz          200 while the replica's engine runs (Ray Serve's own health check, check_health(),
                           replaces a replica whose engine loop died or is stuck)

Replicas follow the table's active version (or the one --version pins): a swap reaches requests that
start after it, and a request reads one version from its first token to its last. A memory shard
that dies is waited for (the memory client retries within its budget while Ray restarts the shard);
a replica that dies is replaced by Ray Serve, and its callers retry. Replicas scale with
`engram serve-model scale N` (Ray Serve's external scaler: the others keep serving), independently
of the memory shards (`engram shards scale`).
"""


import contextlib
import json
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from memory_service.errors import (
    EngramError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ShardUnavailable,
    Unauthenticated,
)
from model_worker.completions import BadRequest, CompletionService

DEPLOYMENT = "ModelServer"
READY_TIMEOUT_S = 300
STUCK_S = 180  # a replica whose engine has work but made no step for this long fails its health check
http = FastAPI(title="Engram completions", description="Text completions from an Engram-MoE model; rows from a memory pool")


def error_reply(error: BaseException) -> tuple[int, dict]:
    """(HTTP status, {"error": {"message", "type", "retryable"}}) for what failed a request. Only what may pass is
    retryable (503): a shard away, a stopped engine; the others would fail again."""
    message = f"{type(error).__name__}: {error}"
    if isinstance(error, BadRequest):
        status, kind, message = 400, "invalid_request", str(error)
    elif isinstance(error, (ShardUnavailable, ResourceExhausted)):
        status, kind = 503, "table_unavailable"
    elif isinstance(error, NotFound):  # a pinned version dropped, the table gone
        status, kind = 404, "table_not_found"
    elif isinstance(error, FailedPrecondition):
        status, kind = 409, "table_state"
    elif isinstance(error, (Unauthenticated, PermissionDenied)):
        status, kind = 500, "server_configuration"
    elif isinstance(error, RuntimeError) and "decoding engine" in str(error):  # stopped, or its loop died
        status, kind = 503, "engine_unavailable"
    elif isinstance(error, EngramError):
        status, kind = 500, "table_error"
    else:
        status, kind = 500, "engine_error"
    return status, {"error": {"message": message, "type": kind, "retryable": status == 503}}


def _error(error: BaseException) -> JSONResponse:
    status, body = error_reply(error)
    return JSONResponse(body, status_code=status)


@serve.deployment(name=DEPLOYMENT, health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=10)
@serve.ingress(http)
class ModelServer:
    """One replica: a model, its tables on the pool behind a row cache, and a decoding engine."""

    def __init__(self, settings: dict):
        from model_worker import checkpoint as ckpt
        from model_worker.generate import Generator
        from orchestration.pool_tables import tables_for

        self.settings = settings
        checkpoint = ckpt.require_checkpoint(settings["checkpoint"])
        memory, table, version = ckpt.tables_location(checkpoint, settings["memory"])
        version = settings["version"] if settings["version"] is not None else 0  # default: follow the active one
        tables = tables_for(memory, table, settings["token"], version)
        generator = Generator.from_checkpoint(checkpoint, tables, device=settings["device"],
                                              row_cache_bytes=settings["cache_mb"] << 20)
        self.service = CompletionService(generator, max_batch=settings["max_batch"], model_name=settings["model_name"],
                                         table=tables.description)
        self.replica = serve.get_replica_context().replica_id.unique_id

    @http.post("/v1/completions")
    async def completions(self, request: Request):
        """A completion (JSON), or its events (server-sent) with "stream": true."""
        try:
            body = await request.json()
        except ValueError:
            return _error(BadRequest("the request body is not JSON"))
        try:
            if isinstance(body, dict) and body.get("stream") is True:
                return StreamingResponse(self._sse(self.service.stream(body)), media_type="text/event-stream")
            reply = await self.service.complete(body)
        except Exception as e:  # noqa: BLE001 - the request's error, said with its status; the engine goes on
            return _error(e)
        reply["replica"] = self.replica
        return JSONResponse(reply)

    async def _sse(self, events):
        async with contextlib.aclosing(events):  # a client that leaves closes the events: their slots are freed
            try:
                async for event in events:
                    yield f"data: {json.dumps(event)}\n\n"
            except Exception as e:  # noqa: BLE001 - the status is sent already: the error is the last event
                yield f"data: {json.dumps(error_reply(e)[1])}\n\n"
        yield "data: [DONE]\n\n"

    @http.get("/v1/stats")
    def stats(self) -> dict:
        """This replica's counters: engine steps and tokens, row cache hit rate and bytes, requests."""
        return {**self.service.stats(), "replica": self.replica, "pid": os.getpid()}

    @http.get("/healthz")
    def healthz(self) -> dict:
        """200 while the engine runs."""
        self.check_health()
        return {"ok": True, "replica": self.replica}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine loop died, or has work and made no step for STUCK_S, is
        replaced."""
        engine = self.service.engine
        if engine._thread is None or not engine._thread.is_alive():
            raise RuntimeError("the decoding engine's loop is not running")
        if (engine.live or engine.waiting) and time.monotonic() - engine.last_step_at > STUCK_S:
            raise RuntimeError(f"the decoding engine has made no step for {STUCK_S} s with requests waiting")

    def __del__(self):
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


# ---------------------------------------------------------------------- the driver side
def replica_options(ray, cpus: float | None = None) -> dict:
    """Actor options of a replica: one GPU when the cluster has GPUs, else one CPU (or `cpus`)."""
    from orchestration.worker import worker_options

    options = worker_options(ray)
    if cpus is not None:
        options["num_cpus"] = cpus
    return options


def deploy(checkpoint: str, memory: str | None, replicas: int = 1, name: str = "engram", route_prefix: str = "/",
           host: str = "127.0.0.1", port: int = 8000, version: int | None = None, token: str | None = None,
           device: str = "auto", max_batch: int = 32, cache_mb: int = 64, replica_cpus: float | None = None,
           proxies: str = "head", log=print) -> str:
    """Start (or update) the serving application `name` on the Ray cluster this process is connected to; returns
    its completions URL once every replica is up. Checks what it can before starting replicas."""
    import ray

    from model_worker import checkpoint as ckpt
    from orchestration.pool_tables import is_pool, pool_admin

    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    if max_batch < 1 or cache_mb < 0:
        raise ValueError("--max-batch must be >= 1 and --cache-mb >= 0")
    directory = ckpt.require_checkpoint(Path(checkpoint).resolve())
    where, table, _ = ckpt.tables_location(directory, memory)
    if is_pool(where):  # the pool and its table exist (a clear error now, not replicas failing to start)
        admin = pool_admin(where.partition(":")[2] or "default", token)
        try:
            info = admin.info(table)
        finally:
            admin.close()
        versions = sorted(v.version for v in info.versions)
        if version and version not in versions:
            raise ValueError(f"table {table!r} has no version {version} (it has {versions})")
    settings = {"checkpoint": str(directory), "memory": memory, "version": version, "token": token, "device": device,
                "max_batch": max_batch, "cache_mb": cache_mb, "model_name": directory.parent.name or directory.name}
    serve.start(http_options={"host": host, "port": port},
                proxy_location="HeadOnly" if proxies == "head" else "EveryNode")
    server = ModelServer.options(num_replicas=replicas, max_ongoing_requests=4 * max_batch,
                                 ray_actor_options=replica_options(ray, replica_cpus))
    log(f"starting {replicas} replica(s) of {directory} (tables: {where or 'in the checkpoint'}"
        f"{'/' + table if table else ''})")
    try:
        serve.run(server.bind(settings), name=name, route_prefix=route_prefix, blocking=False,
                  external_scaler_enabled=True)
    except Exception as e:  # noqa: BLE001 - Serve's error carries the replica's traceback: keep its last line
        last = [line for line in str(e).strip().splitlines() if line.strip()][-1:] or [type(e).__name__]
        raise ValueError(f"the model replicas failed to start: {last[0]}") from e
    http = serve.context._get_global_client().http_config  # Serve may have been started before, elsewhere
    return f"http://{http.host}:{http.port}{route_prefix.rstrip('/')}/v1/completions"


def scale(num_replicas: int, name: str = "engram", wait_s: float = READY_TIMEOUT_S) -> dict:
    """Set the number of replicas (Ray Serve's external scaler: running replicas keep serving); waits until that
    many run. Returns status()."""
    import ray
    from ray.serve._private.common import DeploymentID  # what Ray's own /scale REST endpoint hands the controller
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    if num_replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {num_replicas} (engram serve-model down stops the application)")
    status(name)  # refuses an application that is not there
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    ray.get(controller.update_deployment_replicas.remote(DeploymentID(name=DEPLOYMENT, app_name=name), num_replicas))
    deadline = time.monotonic() + wait_s
    while True:
        current = status(name)
        if current["replicas"].get("RUNNING", 0) == num_replicas and sum(current["replicas"].values()) == num_replicas:
            return current
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: {current['replicas']} after {wait_s:.0f} s, waiting for {num_replicas} running"
                               + (f"; Ray Serve says: {current['message']}" if current["message"] else "")
                               + " (the target stays set: Ray Serve keeps trying; scale again to change it)")
        time.sleep(0.5)


def status(name: str = "engram") -> dict:
    """The application's state and its replicas by state (RUNNING, STARTING, ...)."""
    applications = serve.status().applications
    if name not in applications:
        raise ValueError(f"no serving application {name!r} on this Ray cluster (have: {sorted(applications) or 'none'}; "
                         "start one with engram serve-model --checkpoint DIR)")
    app = applications[name]
    deployment = app.deployments.get(DEPLOYMENT)
    return {"application": name, "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "message": app.message or (deployment.message if deployment else ""),
            "replicas": dict(deployment.replica_states) if deployment else {}}


def down(name: str = "engram") -> None:
    """Stop the application (its replicas); the pool and its tables stay."""
    status(name)
    serve.delete(name)
