"""`engram cluster up`, `train --workers`, `workers scale`, `shards scale`, `cluster down` as a user runs them.

A Ray head of its own on loopback (started by `cluster up` in its own process group, so
`down --stop-ray` stops it and nothing else), every command a separate process.
"""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from model_worker.data_parallel import free_port
from orchestration.ray_cluster import _alive, _process_tree

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "home"  # engram cluster up keeps the head's address and pid under ~/.cache/engram
    home.mkdir()
    return dict(os.environ, HOME=str(home), ENGRAM_TOKEN="tok")


def engram(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cluster_up_train_on_two_workers_scale_both_sides_and_down(env, tmp_path, small_corpus, small_tokenizer):
    port = free_port()
    head_pid = None
    try:
        up = engram(env, "cluster", "up", "--ray-port", port, "--pool", "cli", "--shards", 2, "--pool-dir", tmp_path / "pool",
                    "--metrics-port", 0)
        head_pid = int((tmp_path / "home" / ".cache" / "engram" / "ray_head.pid").read_text())
        assert up.returncode == 0, up.stderr
        assert len(json.loads(up.stdout)["shards"]) == 2
        args = ["train", "--preset", "tiny", "--steps", "200", "--batch-size", "4", "--seq-len", "48", "--eval-every", "100",
                "--data", str(small_corpus), "--tokenizer", str(small_tokenizer), "--memory", "pool:cli", "--table", "t",
                "--workers", "2", "--out", str(tmp_path / "run"), "--json"]
        train = subprocess.Popen([sys.executable, "-m", "orchestration.cli", *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 300
        while True:  # wait until the job runs (it re-forms at its next segment boundary)
            status = engram(env, "workers", "status", "--pool", "cli")
            if status.returncode == 0:
                break
            assert train.poll() is None, train.communicate()
            assert time.time() < deadline, status.stderr
            time.sleep(1)
        scaled = engram(env, "workers", "scale", 1, "--pool", "cli")
        assert scaled.returncode == 0 and json.loads(scaled.stdout)["wanted"] == 1, scaled.stderr
        out, err = train.communicate(timeout=600)
        assert train.returncode == 0, err
        summary = json.loads(out)
        assert summary["step"] == 200 and summary["workers"] == 1
        assert re.search(r"\[train\] step \d+/200  loss \d", err), err[-2000:]  # rank 0's progress reached the user
        assert [(e["from"], e["to"]) for e in summary["scaling"]] == [(2, 1)]
        assert summary["val_loss"] < summary["val_loss_start"]
        assert (tmp_path / "run" / "checkpoint").is_dir()

        status = engram(env, "cluster", "status", "--pool", "cli")
        assert status.returncode == 0, status.stderr
        for shard in json.loads(status.stdout)["shards"]:  # each shard's Prometheus endpoint counts what it served
            with urllib.request.urlopen(f"http://{shard['metrics']}/metrics", timeout=10) as reply:
                text = reply.read().decode()
            served = re.search(r'^engram_rows_served_total\{shard="%d"\} (\S+)$' % shard["shard"], text, re.MULTILINE)
            assert served and float(served.group(1)) == shard["rows_served"] > 0

        grown = engram(env, "shards", "scale", 3, "--pool", "cli")
        assert grown.returncode == 0 and json.loads(grown.stdout)["moves"] > 0, grown.stderr
        info = engram(env, "table", "info", "--ray", f"127.0.0.1:{port}", "--pool", "cli", "--table", "t", "--json")
        assert info.returncode == 0, info.stderr
        assert len(json.loads(info.stdout)["placement"]["addresses"]) == 3
        ray = ("--ray", f"127.0.0.1:{port}", "--pool", "cli")
        exported = engram(env, "table", "export", *ray, "--table", "t", "--layer", 1, "--out", tmp_path / "l1.npy")
        assert exported.returncode == 0, exported.stderr
        rows = np.load(tmp_path / "l1.npy")
        imported = engram(env, "table", "import", *ray, "--table", "t", "--layer", 1, "--file", tmp_path / "l1.npy",
                          "--activate")
        assert imported.returncode == 0, imported.stderr  # a new version on every shard, then one swap
        info = json.loads(engram(env, "table", "info", *ray, "--table", "t", "--json").stdout)
        assert info["active_version"] == 2
        again = engram(env, "table", "export", *ray, "--table", "t", "--layer", 1, "--out", tmp_path / "again.npy")
        assert again.returncode == 0 and np.array_equal(np.load(tmp_path / "again.npy"), rows)
        dropped = engram(env, "table", "drop", *ray, "--table", "t")
        assert dropped.returncode == 0, dropped.stderr
        gone = engram(env, "table", "export", *ray, "--table", "t", "--layer", 1, "--out", tmp_path / "x.npy")
        assert gone.returncode == 2 and "no table 't'" in gone.stderr
        missing = engram(env, "workers", "scale", 2, "--pool", "cli")  # the job is over
        assert missing.returncode == 2 and "no training job" in missing.stderr
    finally:
        tree = _process_tree(head_pid) if head_pid else []
        down = engram(env, "cluster", "down", "--pool", "cli", "--stop-ray")
    assert down.returncode == 0, down.stderr
    assert not any(_alive(pid) for pid in tree)  # the head and everything it started are gone
