"""The batched decoding engine: requests joining and leaving a running batch give what each gives alone."""

import dataclasses

import numpy as np
import pytest
import torch

from memory_service.compression import CompressedTokenizer
from memory_service.hashing import NgramHasher
from memory_service.local_table import LocalTable
from model_worker.engine import DecodingEngine
from model_worker.engram_rows import EngramRowFetcher
from model_worker.generate import Generator
from model_worker.model import EngramMoEModel
from model_worker.presets import tiny

VOCAB = 300


def tiny_model(max_ngram_size: int = 3):
    """A tiny model with a non-zero Engram conv (so its per-slot history matters), its spec and compressor."""
    config = tiny(VOCAB, pad_id=1)
    if max_ngram_size != 3:
        config = dataclasses.replace(config, engram=dataclasses.replace(
            config.engram, max_ngram_size=max_ngram_size, engram_vocab_size=(4001,) * (max_ngram_size - 1)))
    compressor = CompressedTokenizer(np.arange(config.vocab_size))
    spec = config.engram.with_compression(compressor.lookup_table, len(compressor))
    config = dataclasses.replace(config, engram=spec)
    torch.manual_seed(0)
    model = EngramMoEModel(config)
    for block in model.blocks:
        if block.engram is not None:
            torch.nn.init.normal_(block.engram.short_conv.conv.weight, std=0.3)
    return model, spec, compressor


def mixed_requests(count: int = 9, seed: int = 0):
    """Prompts of 1-24 tokens with 1-14 new tokens each."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, VOCAB, size=int(rng.integers(1, 25))) for _ in range(count)]
    return prompts, [int(rng.integers(1, 15)) for _ in range(count)]


def alone(generator: Generator, prompt, new_tokens: int, temperature=0.0, seed=0) -> list[int]:
    out = generator.generate_ids(np.asarray(prompt)[None], new_tokens, temperature=temperature, seed=seed)
    return out[0, len(prompt):].tolist()


def test_a_mixed_batch_joining_and_leaving_gives_each_request_its_single_request_output():
    model, spec, compressor = tiny_model()
    hasher = NgramHasher.from_compressor(spec, compressor)
    fetcher = EngramRowFetcher(LocalTable.for_hasher(hasher), compressor, hasher)
    prompts, counts = mixed_requests()
    engine = DecodingEngine(model, fetcher, max_batch=3)  # 9 requests through 3 slots: they join and leave
    completions = engine.generate(prompts, counts)
    generator = Generator(model, fetcher)
    for prompt, count, completion in zip(prompts, counts, completions):
        assert completion.tokens == alone(generator, prompt, count)
        assert completion.prompt == prompt.tolist()
    assert engine.stats["prefills"] > 1 and engine.stats["requests"] == 9
    assert sorted(engine.free) == [0, 1, 2] and not engine.live  # every slot came back
    assert engine.stats["batch_sum"] / max(1, engine.stats["steps"]) > 1.5  # decoding ran batched

    sampled = engine.generate(prompts[:4], 6, temperature=0.9, seed=5)  # a generator per request: the same draws
    assert [c.tokens for c in sampled] == [alone(generator, p, 6, temperature=0.9, seed=5) for p in prompts[:4]]


@pytest.mark.parametrize("dtype, ngram", [(torch.bfloat16, 3), (torch.float32, 4)])
def test_a_bf16_engine_and_longer_ngrams_with_short_prompts_give_the_single_request_output(dtype, ngram):
    """bf16 decoding (the GPU default) keeps its KV in bf16 and its conv history in fp32, as Generator does; with
    4-grams, prompts shorter than the n-gram context are padded exactly as the single-request path pads them."""
    model, spec, compressor = tiny_model(ngram)
    hasher = NgramHasher.from_compressor(spec, compressor)
    fetcher = EngramRowFetcher(LocalTable.for_hasher(hasher), compressor, hasher)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, VOCAB, size=n) for n in (1, 2, 5, 1, 3)]
    completions = DecodingEngine(model, fetcher, max_batch=2, dtype=dtype).generate(prompts, 6)
    generator = Generator(model, fetcher, dtype=dtype)
    assert [c.tokens for c in completions] == [alone(generator, p, 6) for p in prompts]


def test_a_stopped_engine_fails_what_it_did_not_finish_and_a_cancelled_request_frees_its_slot():
    model, spec, compressor = tiny_model()
    hasher = NgramHasher.from_compressor(spec, compressor)
    engine = DecodingEngine(model, EngramRowFetcher(LocalTable.for_hasher(hasher), compressor, hasher), max_batch=1)
    first, second = engine.submit([5, 6], 20), engine.submit([7], 3)
    engine.step()
    assert first.cancel() is False  # running: futures of admitted requests cannot be cancelled
    second.cancel()
    while not first.done():
        engine.step()
    engine.step()
    assert second.cancelled() and engine.free == [0] and not engine.waiting
    engine.start()
    engine.stop()
    pending = engine.submit([5], 2)
    engine.stop()  # never started: what is queued fails instead of hanging its caller
    with pytest.raises(RuntimeError, match="stopped before this request finished"):
        pending.result(timeout=5)


def test_a_running_engine_serves_requests_from_several_threads_and_refuses_bad_ones():
    from concurrent.futures import ThreadPoolExecutor

    model, spec, compressor = tiny_model()
    hasher = NgramHasher.from_compressor(spec, compressor)
    fetcher = EngramRowFetcher(LocalTable.for_hasher(hasher), compressor, hasher)
    engine = DecodingEngine(model, fetcher, max_batch=4).start()
    try:
        prompts, counts = mixed_requests(12, seed=1)
        with ThreadPoolExecutor(6) as pool:
            futures = list(pool.map(lambda pc: engine.submit(*pc), zip(prompts, counts)))
        results = [f.result(timeout=120) for f in futures]
        generator = Generator(model, fetcher)
        assert [r.tokens for r in results] == [alone(generator, p, c) for p, c in zip(prompts, counts)]
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 300\)"):
            engine.submit([5, 300], 3)
        with pytest.raises(ValueError, match="exceed max_seq_len"):
            engine.submit([5] * 100, 100)
        with pytest.raises(ValueError, match="non-empty"):
            engine.submit([], 3)
        assert engine.submit([7, 8], 2).result(timeout=60).tokens == alone(generator, [7, 8], 2)  # still serving
    finally:
        engine.stop()


@pytest.mark.slow
def test_through_a_pool_the_engine_gives_each_request_its_single_request_output(make_pool):
    from orchestration.pool_tables import tables_for

    pool = make_pool(num_shards=2)
    model, spec, compressor = tiny_model()
    hasher = NgramHasher.from_compressor(spec, compressor)
    backend = tables_for(f"pool:{pool.config.name}", "engine", token="tok").open(spec, compressor.lookup_table)
    try:
        fetcher = EngramRowFetcher(backend, compressor, hasher)
        prompts, counts = mixed_requests(7, seed=2)
        completions = DecodingEngine(model, fetcher, max_batch=3).generate(prompts, counts)  # lookups sent ahead
        generator = Generator(model, fetcher)
        assert [c.tokens for c in completions] == [alone(generator, p, c) for p, c in zip(prompts, counts)]
        assert {v for c in completions for v in c.versions} == {1}  # every row from the active version
    finally:
        backend.close()
