"""The completions API over the decoding engine (in-process: the HTTP deployment is tested in test_serve_model.py)."""

import asyncio
import dataclasses
import time

import numpy as np
import pytest
import torch

from memory_service.compression import CompressedTokenizer
from memory_service.hashing import NgramHasher
from memory_service.local_table import LocalTable
from model_worker.completions import MAX_PROMPTS, BadRequest, CompletionService
from model_worker.data import load_tokenizer
from model_worker.engram_rows import EngramRowFetcher
from model_worker.generate import Generator
from model_worker.model import EngramMoEModel
from model_worker.presets import tiny


@pytest.fixture(scope="module")
def service(small_tokenizer):
    tokenizer = load_tokenizer(small_tokenizer)
    config = tiny(tokenizer.get_vocab_size(), pad_id=0)
    compressor = CompressedTokenizer(np.arange(config.vocab_size))
    spec = config.engram.with_compression(compressor.lookup_table, len(compressor))
    config = dataclasses.replace(config, engram=spec)
    torch.manual_seed(0)
    model = EngramMoEModel(config)
    hasher = NgramHasher.from_compressor(spec, compressor)
    generator = Generator(model, EngramRowFetcher(LocalTable.for_hasher(hasher), compressor, hasher), tokenizer)
    service = CompletionService(generator, max_batch=4, model_name="tiny")
    yield service
    service.close()


def run(coroutine):
    return asyncio.run(coroutine)


def test_completions_equal_single_request_generation_for_text_ids_and_lists(service):
    generator = service.generator
    prompts = ["def main():", "import os\n", "class A:"]
    reply = run(service.complete({"prompt": prompts, "max_tokens": 7}))
    assert reply["object"] == "text_completion" and reply["model"] == "tiny" and reply["table"] == "in-process"
    assert reply["table_versions"] == [None]  # in-process tables have no versions
    for prompt, choice in zip(prompts, reply["choices"]):
        ids = service.tokenizer.encode(prompt, add_special_tokens=False).ids
        alone = generator.generate_ids(np.asarray([ids]), 7, temperature=0.0)[0, len(ids):].tolist()
        assert choice["token_ids"] == alone and choice["finish_reason"] == "length"
        assert choice["text"] == service.tokenizer.decode(alone, skip_special_tokens=False)
    assert reply["usage"]["completion_tokens"] == 21
    by_ids = run(service.complete({"prompt_ids": [5, 6, 7], "max_tokens": 4, "temperature": 0.7, "seed": 3,
                                   "model": "anything"}))  # OpenAI-style clients send a model name: accepted
    again = run(service.complete({"prompt_ids": [[5, 6, 7]], "max_tokens": 4, "temperature": 0.7, "seed": 3}))
    assert by_ids["choices"][0]["token_ids"] == again["choices"][0]["token_ids"]  # seeded sampling repeats


def test_streaming_gives_each_token_as_it_is_made_and_the_same_completion(service):
    async def collect():
        return [event async for event in service.stream({"prompt": ["def f(x):", "for i in"], "max_tokens": 6})]

    events = run(collect())
    plain = run(service.complete({"prompt": ["def f(x):", "for i in"], "max_tokens": 6}))
    for index, choice in enumerate(plain["choices"]):
        mine = [e for e in events if e["index"] == index]
        assert [e["token_id"] for e in mine[:-1]] == choice["token_ids"]
        assert mine[-1]["finish_reason"] == "length" and mine[-1]["token_ids"] == choice["token_ids"]
        assert "".join(e["text"] for e in mine) == choice["text"]  # the deltas add up to the completion


@pytest.mark.parametrize("body, complaint", [
    ([1, 2], "JSON object"),
    ({"prompt": "x", "prompt_ids": [1]}, "exactly one"),
    ({}, "exactly one"),
    ({"prompt": 5}, "string"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "9"}, "max_tokens"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "colour": "red"}, "unknown field"),
    ({"prompt_ids": [1, 99999]}, "out of range"),
    ({"prompt_ids": [1, 2.5]}, "integer token ids"),
    ({"prompt_ids": []}, "has no tokens"),
    ({"prompt": ""}, "has no tokens"),
    ({"prompt_ids": list(range(300))}, "context"),
    ({"prompt": ["x"] * (MAX_PROMPTS + 1)}, "at most"),
    ({"prompt_ids": [[1]] * (MAX_PROMPTS + 1)}, "at most"),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "model": 3}, "model"),
])
def test_bad_requests_are_refused_with_the_field_named_and_the_service_goes_on(service, body, complaint):
    with pytest.raises(BadRequest, match=complaint):
        run(service.complete(body))
    assert run(service.complete({"prompt_ids": [3], "max_tokens": 2}))["choices"][0]["token_ids"]


def test_a_caller_that_goes_away_frees_its_slots(service):
    made = service.engine.stats["tokens"]
    cancelled = service.requests["cancelled"]

    async def leave_early():
        task = asyncio.ensure_future(service.complete({"prompt": ["a"] * 6, "max_tokens": 100}))  # 4 run, 2 wait
        while len(service.engine.live) < 4:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def stream_then_close():
        events = service.stream({"prompt": ["b"] * 2, "max_tokens": 100})
        await events.__anext__()
        await events.aclose()  # a client that stops reading the stream

    for leave in (leave_early, stream_then_close):
        run(leave())
        for _ in range(500):  # the engine's loop drops abandoned requests (running or waiting) at its next step
            if len(service.engine.free) == 4 and not service.engine.live and not service.engine.waiting:
                break
            time.sleep(0.01)
        assert len(service.engine.free) == 4 and not service.engine.live and not service.engine.waiting
    assert service.engine.stats["tokens"] - made < 2 * 100  # they left long before their 100 tokens each
    assert service.requests["cancelled"] == cancelled + 2
