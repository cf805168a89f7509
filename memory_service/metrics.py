"""Prometheus metrics of a memory service: its Stats counters as text exposition on /metrics.

`engram serve --metrics-port P` and each pool shard (PoolConfig.metrics_port + shard id)
run this next to the gRPC server. Names: store counters become `engram_<name>` (counters
with `_total`), per-RPC handler time `engram_rpc_handler_seconds_total{rpc="Lookup"}`,
store sizes stay gauges. Every series carries the labels given at start (e.g. shard).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GAUGES = {"map_size", "last_page", "used_bytes", "readers", "shard_epoch", "delta_rows"}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label_text(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in sorted(labels.items()))
    return "{" + body + "}"


def render(counters: dict[str, float], labels: dict[str, str] | None = None) -> str:
    """Prometheus text exposition of a Stats counter dict."""
    labels = dict(labels or {})
    series: dict[str, tuple[str, list[str]]] = {}  # metric -> (type, sample lines)
    for key, value in sorted(counters.items()):
        if key.startswith("seconds."):
            name, extra = "engram_rpc_handler_seconds_total", {"rpc": key.split(".", 1)[1]}
            kind = "counter"
        else:
            base = re.sub(r"[^a-zA-Z0-9_]", "_", key)
            kind = "gauge" if base in GAUGES else "counter"
            name, extra = f"engram_{base}" + ("_total" if kind == "counter" else ""), {}
        entry = series.setdefault(name, (kind, []))
        entry[1].append(f"{name}{_label_text({**labels, **extra})} {float(value)!r}")
    lines = []
    for name, (kind, samples) in series.items():
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples)
    return "\n".join(lines) + "\n"


class MetricsServer:
    """A small HTTP server answering GET /metrics from a counters callback (a daemon thread)."""

    def __init__(self, collect: Callable[[], dict[str, float]], host: str = "127.0.0.1", port: int = 0,
                 labels: dict[str, str] | None = None):
        collect_fn, label_set = collect, dict(labels or {})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = render(collect_fn(), label_set).encode()
                except Exception as e:  # noqa: BLE001 - report, keep serving
                    self.send_error(500, f"collecting metrics failed: {e}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="engram-metrics", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop answering."""
        self.httpd.shutdown()
        self.httpd.server_close()
