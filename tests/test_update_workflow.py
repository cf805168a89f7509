"""The update workflow from the command line, on one service and on a pool, with lookups running throughout.

Each step is a separate `engram` process, as a user runs them: train a table, snapshot the
active version into a new one, train the new version while the active one keeps serving
unchanged, swap to it, roll back. A reader process looks rows up the whole time; every
reply must succeed and carry exactly the rows of the version it names.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from model_worker.data_parallel import free_port
from orchestration.local_server import start_server

pytestmark = pytest.mark.slow

READER = Path(__file__).parent / "helpers" / "lookup_reader.py"


def engram(env, *args, timeout=300):
    result = subprocess.run([sys.executable, "-m", "orchestration.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, f"engram {' '.join(map(str, args))}:\n{result.stderr[-3000:]}"
    return result


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(path: Path, condition, timeout_s: float = 120) -> list[dict]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        lines = read_log(path) if path.exists() else []
        if condition(lines):
            return lines
        time.sleep(0.2)
    raise TimeoutError(f"the reader never saw it; last lines: {read_log(path)[-3:] if path.exists() else None}")


@pytest.mark.parametrize("where", ["service", "pool"])
def test_snapshot_train_swap_and_roll_back_while_lookups_continue(where, tmp_path, small_corpus, small_tokenizer):
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), ENGRAM_TOKEN="tok")
    server = ray_address = None
    if where == "service":
        server, address = start_server(tmp_path / "store", token="tok")
        target, memory = ["--address", address], f"grpc://{address}"
    else:
        port = free_port()
        engram(env, "cluster", "up", "--ray-port", port, "--pool", "upd", "--shards", 2, "--pool-dir", tmp_path / "pool")
        ray_address = f"127.0.0.1:{port}"
        env["RAY_ADDRESS"] = ray_address
        target, memory = ["--ray", ray_address, "--pool", "upd"], "pool:upd"
    train = ["train", "--preset", "tiny", "--steps", 6, "--batch-size", 4, "--seq-len", 48, "--eval-every", 100,
             "--ckpt-every", 1000, "--data", small_corpus, "--tokenizer", small_tokenizer, "--memory", memory, "--table", "t",
             "--no-progress", "--json"]
    log, stop = tmp_path / "reader.jsonl", tmp_path / "stop"
    reader = None
    try:
        engram(env, *train, "--out", tmp_path / "run1")  # creates the table (version 1, active) and trains it
        reader_args = [*target, "--table", "t", "--layer", 1, "--out", log, "--stop", stop]
        reader = subprocess.Popen([sys.executable, READER, *map(str, reader_args)], env=env, stderr=subprocess.PIPE, text=True)
        wait_for(log, lambda lines: len(lines) >= 5)

        created = json.loads(engram(env, "table", "new-version", *target, "--table", "t", "--json").stdout)
        assert created["version"] == 2
        trained = json.loads(engram(env, *train, "--version", 2, "--seed", 1, "--out", tmp_path / "run2").stdout)
        assert "(version 2)" in trained["tables"]
        during = read_log(log)  # everything read while version 2 was created and trained
        info = json.loads(engram(env, "table", "info", *target, "--table", "t", "--json").stdout)
        assert info["active_version"] == 1 and [v["version"] for v in info["versions"]] == [1, 2]

        swapped = engram(env, "table", "swap", *target, "--table", "t", "--version", 2).stdout
        assert "active version 2 (was 1)" in swapped
        wait_for(log, lambda lines: lines and lines[-1].get("version") == 2)
        queried = json.loads(engram(env, "query", *target, "--table", "t", "--layer", 1, "--row-ids", "0,7,14",
                                    "--version", 1, "--full").stdout)
        assert queried["version"] == 1 and len(queried["rows"]) == 3  # the old version stays readable by number

        rolled = engram(env, "table", "rollback", *target, "--table", "t").stdout
        assert "rolled back to version 1 (was 2)" in rolled
        wait_for(log, lambda lines: lines and lines[-1].get("version") == 1 and any(x.get("version") == 2 for x in lines))
        stop.touch()
        assert reader.wait(timeout=60) == 0, reader.stderr.read()

        # the rest of the table commands, the same on both
        assert "t" in [t["name"] for t in json.loads(engram(env, "table", "list", *target, "--json").stdout)]
        engram(env, "table", "export", *target, "--table", "t", "--layer", 1, "--version", 2, "--out", tmp_path / "v2.npy")
        exported = np.load(tmp_path / "v2.npy")
        again = json.loads(engram(env, "query", *target, "--table", "t", "--layer", 1, "--row-ids", "0,7,14", "--version", 2,
                                  "--full").stdout)
        np.testing.assert_array_equal(np.asarray(again["rows"], np.float32), exported[[0, 7, 14]])
        engram(env, "table", "drop", *target, "--table", "t", "--version", 2)
        info = json.loads(engram(env, "table", "info", *target, "--table", "t", "--json").stdout)
        assert [v["version"] for v in info["versions"]] == [1] and info["active_version"] == 1
    finally:
        stop.touch()
        if reader is not None and reader.poll() is None:
            reader.kill()
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        if ray_address is not None:
            subprocess.run([sys.executable, "-m", "orchestration.cli", "cluster", "down", "--pool", "upd", "--stop-ray"],
                           capture_output=True, timeout=120, env=env)

    lines = read_log(log)
    errors = [x for x in lines if "error" in x]
    assert not errors, errors[:3]
    assert during and all(x["version"] == 1 for x in during)  # training version 2 never disturbed version 1
    digests = {v: {x["digest"] for x in lines if x["version"] == v} for v in (1, 2)}
    assert len(digests[1]) == 1 and len(digests[2]) == 1  # each version's rows never changed while served
    assert digests[1] != digests[2]  # version 2 was trained
    phases = [x["version"] for i, x in enumerate(lines) if i == 0 or x["version"] != lines[i - 1]["version"]]
    assert phases == [1, 2, 1]  # one swap, one rollback, nothing in between
