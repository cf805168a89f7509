"""The Ray cluster this process works with: join one (connect_ray), or start and stop a local head on loopback.

`engram cluster up` without --address starts a head on 127.0.0.1 in its own process
group (so `down --stop-ray` stops exactly it) and saves its address; later commands join
it through `connect_ray` (--address, $RAY_ADDRESS, or the saved address).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

LOCAL_ADDRESS_FILE = "~/.cache/engram/ray_address"
LOCAL_HEAD_PID_FILE = "~/.cache/engram/ray_head.pid"
HEAD_START_TIMEOUT_S = 120
# A local head started by `engram cluster up` listens on loopback only: Ray resolves its nodes to
# 127.0.0.1 and skips its own token auth (the memory service's token still guards writes).
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def connect_ray(address: str | None):
    """ray.init against an existing cluster (--address, $RAY_ADDRESS, or the one engram cluster up started).

    A no-op when this process is already connected (a Ray worker or a driver that called ray.init).
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return sys.modules["ray"]
    address = address or os.environ.get("RAY_ADDRESS") or _saved_address()
    if not address:
        raise ValueError("no Ray cluster: pass --address HOST:PORT (or run engram cluster up)")
    if address.startswith("127.0.0.1") or address.startswith("localhost"):
        os.environ.update(LOCAL_RAY_ENV)
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray


def _saved_address() -> str | None:
    path = os.path.expanduser(LOCAL_ADDRESS_FILE)
    return open(path).read().strip() if os.path.exists(path) else None


def start_local_head(port: int, resources: dict) -> str:
    """Start a Ray head on loopback in its own process group (so `down --stop-ray` stops only it); returns its address."""
    import signal
    import socket
    import time

    try:  # something already listening there would be taken for our head
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            in_use = True
    except OSError:
        in_use = False
    if in_use:
        raise ValueError(f"port {port} is already in use: pick another --ray-port (or join that cluster with --address)")
    state = os.path.dirname(os.path.expanduser(LOCAL_ADDRESS_FILE))
    os.makedirs(state, exist_ok=True)
    env = dict(os.environ, **LOCAL_RAY_ENV)
    with open(os.path.join(state, "ray_head.log"), "ab") as log:
        head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                                 "--port", str(port), "--resources", json.dumps(resources),
                                 "--include-dashboard=false", "--disable-usage-stats"],
                                env=env, stdout=log, stderr=log, start_new_session=True)
    deadline = time.time() + HEAD_START_TIMEOUT_S
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with status {head.returncode}; see {os.path.join(state, 'ray_head.log')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.time() > deadline:
                os.killpg(head.pid, signal.SIGKILL)  # ray start and whatever it started (own session)
                raise RuntimeError(f"the Ray head did not listen on 127.0.0.1:{port} within {HEAD_START_TIMEOUT_S} s") from None
            time.sleep(0.5)
    address = f"127.0.0.1:{port}"
    with open(os.path.expanduser(LOCAL_ADDRESS_FILE), "w") as f:
        f.write(address)
    with open(os.path.expanduser(LOCAL_HEAD_PID_FILE), "w") as f:
        f.write(str(head.pid))
    return address


def _process_tree(root: int) -> list[int]:
    """root and all its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])  # field 4, after the (command)
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def _is_ray_head(pid: int) -> bool:
    """Whether pid runs `ray start --head` (what cluster up started)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return b"ray.scripts.scripts" in args and b"--head" in args


def stop_local_head() -> None:
    """Stop the head `engram cluster up` started (its whole process tree, Ray's workers included), and forget it."""
    import signal
    import time

    pid_file = os.path.expanduser(LOCAL_HEAD_PID_FILE)
    if not os.path.exists(pid_file):
        print("no local Ray head started by engram cluster up; stop other clusters with `ray stop`", file=sys.stderr)
        return
    pid = int(open(pid_file).read().strip())
    tree = _process_tree(pid) if _alive(pid) and _is_ray_head(pid) else []  # a stale pid may belong to another program now
    # workers run in process groups of their own: the tree is taken before anything exits
    for sig, grace_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(_alive(pid) for pid in tree):
            time.sleep(0.3)
        tree = [pid for pid in tree if _alive(pid)]
        if not tree:
            break
    for path in (pid_file, os.path.expanduser(LOCAL_ADDRESS_FILE)):
        if os.path.exists(path):
            os.remove(path)
