"""engram serve-model: a real Ray Serve deployment over HTTP, its rows on a real memory pool, under swaps and kills."""

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from orchestration.cli import main

pytestmark = pytest.mark.slow

POOL = "serve-test"
APP = "engram-test"
PROMPTS = ["def main():", "import os\n", "class Table:", "for i in range("]
NEW_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory, small_corpus, small_tokenizer):
    """A tiny model trained on a 2-shard pool, served by 2 replicas through the CLI."""
    from ray import serve

    from model_worker.train import TrainConfig, Trainer
    from orchestration.pool import MemoryPool, PoolConfig
    from orchestration.pool_tables import tables_for

    root = tmp_path_factory.mktemp("serve")
    pool = MemoryPool(PoolConfig(name=POOL, num_shards=2, base_dir=str(root / "pool"), token="tok")).start()
    config = TrainConfig(preset="tiny", steps=4, batch_size=4, seq_len=48, warmup_steps=1, eval_every=4, eval_batches=1,
                         ckpt_every=1000, data=str(small_corpus), tokenizer=str(small_tokenizer), memory=f"pool:{POOL}",
                         table="t", out_dir=str(root / "run"))
    Trainer(config, tables_for(f"pool:{POOL}", "t", "tok"), progress=False, log=lambda *a: None, token="tok").run()
    port = free_port()
    checkpoint = str(root / "run" / "checkpoint")
    assert main(["serve-model", "--checkpoint", checkpoint, "--memory", f"pool:{POOL}", "--replicas", "2", "--name", APP,
                 "--port", str(port), "--replica-cpus", "0.25", "--max-batch", "8", "--token", "tok"]) == 0
    yield {"url": f"http://127.0.0.1:{port}", "pool": pool, "checkpoint": checkpoint, "expected": {}}
    main(["serve-model", "down", "--name", APP])
    serve.shutdown()
    pool.shutdown()


def expected(served, prompt: str, version: int) -> list[int]:
    """The greedy completion of a prompt on one table version, by the in-process single-request generator."""
    from model_worker.generate import Generator
    from orchestration.pool_tables import tables_for

    key = (prompt, version)
    if key not in served["expected"]:
        generator = Generator.from_checkpoint(served["checkpoint"], tables_for(f"pool:{POOL}", "t", "tok", version))
        ids = generator.tokenizer.encode(prompt, add_special_tokens=False).ids
        served["expected"][key] = generator.generate_ids(np.asarray([ids]), NEW_TOKENS, temperature=0.0)[0, len(ids):].tolist()
        generator.fetcher.backend.close()
    return served["expected"][key]


def complete(served, prompt: str, retry_s: float = 0, **body) -> tuple[dict, int]:
    """POST a completion; (reply, attempts). A client that retries (for up to retry_s) does so on connection errors,
    timeouts and 5xx."""
    deadline, attempts = time.monotonic() + retry_s, 0
    while True:
        attempts += 1
        try:
            reply = requests.post(served["url"] + "/v1/completions", timeout=120,
                                  json={"prompt": prompt, "max_tokens": NEW_TOKENS, **body})
            if reply.status_code < 500 or time.monotonic() > deadline:
                return reply, attempts
        except (requests.ConnectionError, requests.Timeout):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


class Load:
    """Threads sending completions until stopped; every reply kept (or the error that ended a request)."""

    def __init__(self, served, threads: int = 3, retry_s: float = 0):
        self.served, self.retry_s, self.replies, self.failures, self.retried = served, retry_s, [], [], 0
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, args=(i,), daemon=True) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def _send(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 1
            try:
                reply, attempts = complete(self.served, prompt, self.retry_s)
                self.retried += attempts - 1
                if reply.status_code == 200:
                    self.replies.append((prompt, reply.json()))
                else:
                    self.failures.append(f"{reply.status_code}: {reply.text[:300]}")
            except Exception as e:  # noqa: BLE001 - counted, and the test fails on it
                self.failures.append(repr(e))

    def wait_for(self, condition, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out; {len(self.replies)} replies, failures {self.failures[:3]}"
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=180)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()  # also when the test failed: no load leaks into the next test


def check_replies(served, replies) -> set:
    """Every reply read one version and is that version's greedy text; the versions seen."""
    seen = set()
    for prompt, reply in replies:
        assert len(reply["table_versions"]) == 1, reply
        version = reply["table_versions"][0]
        assert reply["choices"][0]["token_ids"] == expected(served, prompt, version), (prompt, version)
        seen.add(version)
    return seen


def test_concurrent_requests_are_answered_by_both_replicas_with_each_requests_own_text(served):
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: complete(served, PROMPTS[i % len(PROMPTS)])[0], range(24)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    answered = [(PROMPTS[i % len(PROMPTS)], r.json()) for i, r in enumerate(replies)]
    assert check_replies(served, answered) == {1}
    assert len({reply["replica"] for _, reply in answered}) == 2  # both replicas answered
    first = answered[0][1]
    assert first["table"].endswith(f"pool:{POOL}/t") and first["usage"]["completion_tokens"] == NEW_TOKENS
    # streamed: server-sent events, token by token, adding up to the same completion
    with requests.post(served["url"] + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": NEW_TOKENS,
                                                                "stream": True}, stream=True, timeout=120) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    import json

    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert [e["token_id"] for e in events[:-1]] == expected(served, PROMPTS[0], 1)
    assert events[-1]["finish_reason"] == "length" and all(e["table_version"] == 1 for e in events)
    assert "".join(e["text"] for e in events) == events[-1]["completion"] == answered[0][1]["choices"][0]["text"]
    # bad requests: 400 with the reason, and the replicas serve on
    bad = requests.post(served["url"] + "/v1/completions", json={"prompt": "x", "max_tokens": -1}, timeout=60)
    assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
    assert requests.post(served["url"] + "/v1/completions", data=b"{not json", timeout=60).status_code == 400
    assert main(["serve-model", "status", "--name", "no-such-app"]) == 2  # a clear error, not a traceback
    stats = requests.get(served["url"] + "/v1/stats", timeout=60).json()
    assert stats["row_cache"]["hits"] + stats["row_cache"]["misses"] > 0 and stats["row_cache"]["bytes"] > 0


def test_a_swap_under_load_fails_no_request_and_no_request_mixes_versions(served):
    from orchestration.pool_admin import PoolAdmin

    admin = PoolAdmin(served["pool"], token="tok")
    try:
        with Load(served) as load:
            load.wait_for(lambda: len(load.replies) >= 6)
            new = admin.create_version("t", init_std=0.5, init_seed=7)  # different rows: a mixed request would show
            admin.swap("t", new)
            swapped_at = len(load.replies)
            load.wait_for(lambda: sum(r["table_versions"] == [new] for _, r in load.replies[swapped_at:]) >= 6)
    finally:
        admin.swap("t", 1)  # back, for the tests after this one
    assert not load.failures
    assert check_replies(served, load.replies) == {1, new}


def test_a_memory_shard_killed_under_load_fails_no_request(served):
    pool = served["pool"]
    with Load(served) as load:  # a client that does not retry: the replicas' memory clients wait for the shard
        load.wait_for(lambda: len(load.replies) >= 4)
        before = pool.state()["shards"][0]["pid"]
        pool.kill_shard(0)
        killed_at = len(load.replies)
        load.wait_for(lambda: pool.state()["shards"][0]["pid"] not in (None, before) and len(load.replies) >= killed_at + 8,
                      timeout_s=180)
    assert not load.failures
    check_replies(served, load.replies)


def test_replicas_scale_and_a_killed_replica_is_replaced(served):
    assert main(["serve-model", "scale", "1", "--name", APP]) == 0
    replica = requests.get(served["url"] + "/v1/stats", timeout=60).json()
    with Load(served, threads=2, retry_s=240) as load:  # a client that retries: requests on the dead replica go again
        load.wait_for(lambda: len(load.replies) >= 2)
        os.kill(replica["pid"], signal.SIGKILL)
        load.wait_for(lambda: any(r["replica"] != replica["replica"] for _, r in load.replies), timeout_s=240)
    assert not load.failures
    check_replies(served, load.replies)
    from orchestration.serve_model import status

    assert status(APP)["replicas"] == {"RUNNING": 1}


def test_errors_map_to_statuses_that_say_whether_a_retry_can_help():
    from memory_service.errors import NotFound, ShardUnavailable, Unauthenticated
    from model_worker.completions import BadRequest
    from orchestration.serve_model import error_reply

    cases = {BadRequest("max_tokens must be >= 1"): (400, "invalid_request", False),
             ShardUnavailable("shard 1 is down"): (503, "table_unavailable", True),
             NotFound("no version 3"): (404, "table_not_found", False),
             Unauthenticated("no token"): (500, "server_configuration", False),
             RuntimeError("the decoding engine was stopped before this request finished"): (503, "engine_unavailable", True),
             ZeroDivisionError("bug"): (500, "engine_error", False)}
    for error, (status, kind, retryable) in cases.items():
        got, body = error_reply(error)
        assert (got, body["error"]["type"], body["error"]["retryable"]) == (status, kind, retryable)
        assert str(error) in body["error"]["message"]
