"""Start `engram serve` in a child process (benchmarks, tests, local demos)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

# glibc settings that keep big reply buffers mapped (see memory_service/malloc_tuning.py)
SERVER_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def start_server(path: str, token: str | None = None, port: int = 0, timeout_s: float = 60.0,
                 extra_args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """Run `engram serve --path PATH [extra_args]` on a free port; returns (process, 'host:port') once it listens."""
    cmd = [sys.executable, "-m", "orchestration.cli", "serve", "--path", str(path), "--port", str(port), *extra_args]
    if token:
        cmd += ["--token", token]
    log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would fill and stop the server
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **SERVER_ENV})
    line = proc.stdout.readline()
    if " on " not in line:
        proc.kill()
        proc.wait()
        log.seek(0)
        raise RuntimeError(f"engram serve did not start: {line}{log.read()}")
    return proc, line.split(" on ", 1)[1].split()[0]
