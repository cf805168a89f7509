"""Text completions over the decoding engine: the JSON API a serving endpoint speaks, free of any web framework.

A request (a dict decoded from JSON):

    prompt        str, or a list of str            text to continue (or prompt_ids below)
    prompt_ids    list[int], or a list of them     token ids instead of text
    max_tokens    int, default 64                  new tokens per prompt (cut to fit the model's context)
    temperature   float, default 0.0               0: greedy
    top_k         int, default 50                  sampling: keep the k likeliest tokens
    seed          int, default 0                   sampling: prompt i samples with seed + i
    stream        bool, default false              events token by token (stream() instead of complete())
    model         str, optional                    accepted and ignored (clients of OpenAI-style APIs send it)

The shapes follow OpenAI's completions API loosely, not exactly: generation runs to max_tokens
(finish_reason "length"; the models here have no end-of-text token), and stream events carry
one token each, not OpenAI's chunk schema.

A reply names the table version every choice read (a request never mixes two: the engine pins
it when the prompt is run) and the row cache's replica-side state is in stats():

    {"id", "object": "text_completion", "model", "table", "table_versions": [v, ...],
     "choices": [{"index", "text", "token_ids", "finish_reason", "table_version"}, ...],
     "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}

Streaming yields {"id", "index", "token_id", "text", "table_version"} per new token (text: what the
token adds to the decoded completion; bytes of a character split over tokens wait for the rest),
then {"id", "index", "finish_reason", "table_version", "text", "token_ids", "completion"} when a choice ends
(text: what was not sent yet; token_ids and completion: the whole choice).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
from collections.abc import AsyncIterator
from concurrent.futures import CancelledError, Future

from model_worker.engine import Completion, DecodingEngine
from model_worker.generate import Generator

MAX_PROMPTS = 64  # prompts in one request
MAX_SEED = 2**63 - 1 - MAX_PROMPTS  # prompt i samples with seed + i, a torch generator seed
DEFAULTS = {"max_tokens": 64, "temperature": 0.0, "top_k": 50, "seed": 0, "stream": False}
FIELDS = {"prompt", "prompt_ids", "model", *DEFAULTS}


class BadRequest(ValueError):
    """A request this API refuses (the caller's to fix); the message says which field and why."""


class CompletionService:
    """A model (a Generator: model, row fetcher, tokenizer) behind a running DecodingEngine, answering requests."""

    def __init__(self, generator: Generator, max_batch: int = 32, prefetch: bool = True, model_name: str = "engram",
                 table: str = "in-process"):
        if generator.tokenizer is None:
            raise ValueError("a completion service needs a tokenizer (load the generator from a checkpoint)")
        self.generator, self.tokenizer = generator, generator.tokenizer
        self.engine = DecodingEngine(generator.model, generator.fetcher, max_batch=max_batch, prefetch=prefetch).start()
        self.model_name, self.table = model_name, table
        self.max_seq_len = generator.model.config.max_seq_len
        self.vocab_size = generator.model.config.vocab_size
        self._ids = itertools.count(1)
        self._prefix = f"cmpl-{os.getpid():x}-"
        self.requests = {"answered": 0, "refused": 0, "failed": 0, "cancelled": 0}

    # ------------------------------------------------------------------ parsing
    def parse(self, body) -> dict:
        """The request's prompts as token ids and its settings; BadRequest names what is wrong."""
        if not isinstance(body, dict):
            raise BadRequest("the request body is a JSON object")
        unknown = set(body) - FIELDS
        if unknown:
            raise BadRequest(f"unknown field(s) {sorted(unknown)}; known: {sorted(FIELDS)}")
        request = {**DEFAULTS, **{k: body[k] for k in DEFAULTS if k in body and body[k] is not None}}
        for name in ("max_tokens", "top_k", "seed"):
            if not _is_int(request[name]):
                raise BadRequest(f"{name} must be an integer, got {request[name]!r}")
        if not _is_number(request["temperature"]) or not math.isfinite(request["temperature"]) or request["temperature"] < 0:
            raise BadRequest(f"temperature must be a finite number >= 0, got {request['temperature']!r}")
        if not isinstance(request["stream"], bool):
            raise BadRequest(f"stream must be true or false, got {request['stream']!r}")
        if request["max_tokens"] < 1:
            raise BadRequest(f"max_tokens must be >= 1, got {request['max_tokens']}")
        if request["top_k"] < 0:
            raise BadRequest(f"top_k must be >= 0, got {request['top_k']}")
        if not 0 <= request["seed"] <= MAX_SEED:
            raise BadRequest(f"seed must be in [0, {MAX_SEED}], got {request['seed']}")
        if "model" in body and not isinstance(body["model"], str):
            raise BadRequest("model, when given, is a string (it is not used: this endpoint serves one model)")
        request["prompts"] = self._prompt_ids(body)
        return request

    def _prompt_ids(self, body: dict) -> list[list[int]]:
        if ("prompt" in body) == ("prompt_ids" in body):
            raise BadRequest("give exactly one of prompt (text) and prompt_ids (token ids)")
        if "prompt" in body:
            texts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise BadRequest("prompt is a string or a non-empty list of strings")
            if len(texts) > MAX_PROMPTS:
                raise BadRequest(f"at most {MAX_PROMPTS} prompts a request")
            prompts = [self.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
        else:
            ids = body["prompt_ids"]
            prompts = ids if isinstance(ids, list) and ids and all(isinstance(p, list) for p in ids) else [ids]
            if len(prompts) > MAX_PROMPTS:
                raise BadRequest(f"at most {MAX_PROMPTS} prompts a request")
            for p in prompts:
                if not isinstance(p, list) or not all(_is_int(t) for t in p):
                    raise BadRequest("prompt_ids is a list of integer token ids, or a non-empty list of such lists")
                bad = [t for t in p if not 0 <= t < self.vocab_size]
                if bad:
                    raise BadRequest(f"token id {bad[0]} is out of range: the model's vocabulary has {self.vocab_size} ids")
        for i, p in enumerate(prompts):
            if not p:
                raise BadRequest(f"prompt {i} has no tokens")
            if len(p) >= self.max_seq_len:
                raise BadRequest(f"prompt {i} is {len(p)} tokens; the model's context is {self.max_seq_len}")
        return prompts

    # ------------------------------------------------------------------ answering
    def _submit(self, request: dict, on_token=None) -> list[Future]:
        """Each prompt into the engine (max_tokens cut to what its context leaves)."""
        futures = []
        try:
            for i, ids in enumerate(request["prompts"]):
                new = min(request["max_tokens"], self.max_seq_len - len(ids))
                listener = None if on_token is None else (lambda token, version, i=i: on_token(i, token, version))
                futures.append(self.engine.submit(ids, new, request["temperature"], request["top_k"], request["seed"] + i,
                                                  on_token=listener))
        except ValueError as e:  # what parse() did not catch, the engine did: still the caller's request
            self._abandon(futures)
            raise BadRequest(str(e)) from e
        except BaseException:
            self._abandon(futures)
            raise
        return futures

    def _abandon(self, futures: list[Future]) -> None:
        for future in futures:
            self.engine.abandon(future)

    async def complete(self, body) -> dict:
        """Answer a request (not streamed): every prompt's completion, with the table version it read."""
        try:
            request = self.parse(body)
        except BadRequest:
            self.requests["refused"] += 1
            raise
        futures = self._submit_counted(request)
        try:
            done: list[Completion] = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except BaseException as e:  # a failed step, or the caller went away: free the slots of the others
            self._abandon(futures)
            self._count_failure(e)
            raise
        self.requests["answered"] += 1
        choices = [{"index": i, "text": self.tokenizer.decode(c.tokens, skip_special_tokens=False), "token_ids": c.tokens,
                    "finish_reason": "length", "table_version": _one_version(c.versions)} for i, c in enumerate(done)]
        prompt_tokens = sum(len(p) for p in request["prompts"])
        completion_tokens = sum(len(c.tokens) for c in done)
        return {"id": self._new_id(), "object": "text_completion", "model": self.model_name, "table": self.table,
                "table_versions": sorted({c["table_version"] for c in choices}), "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def stream(self, body) -> AsyncIterator[dict]:
        """Answer a request token by token: an event per new token, and one per finished choice. The request is
        checked now (BadRequest before any event), the events come as the engine makes the tokens."""
        try:
            request = self.parse(body)
        except BadRequest:
            self.requests["refused"] += 1
            raise
        return self._events(request)

    async def _events(self, request: dict) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        futures = self._submit_counted(request, on_token=lambda i, token, version: loop.call_soon_threadsafe(
            queue.put_nowait, (i, token, version)))
        for i, future in enumerate(futures):  # after its last token's event (both come from the loop thread, in order)
            future.add_done_callback(lambda f, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, None, f)))
        completion_id = self._new_id()
        tokens = [[] for _ in futures]
        unsent = [0 for _ in futures]  # each choice's first token whose text is not sent yet
        open_choices = len(futures)
        try:
            while open_choices:
                i, token, item = await queue.get()
                if token is not None:
                    tokens[i].append(token)
                    text = self.tokenizer.decode(tokens[i][unsent[i]:], skip_special_tokens=False)
                    if text.endswith("\ufffd"):  # a character split over tokens: its bytes wait for the rest
                        text = ""
                    else:
                        unsent[i] = len(tokens[i])
                    yield {"id": completion_id, "index": i, "token_id": token, "text": text, "table_version": item or None}
                    continue
                open_choices -= 1
                completion = item.result()  # raises what failed the request
                yield {"id": completion_id, "index": i, "finish_reason": "length",
                       "text": self.tokenizer.decode(completion.tokens[unsent[i]:], skip_special_tokens=False),
                       "token_ids": completion.tokens, "table_version": _one_version(completion.versions),
                       "completion": self.tokenizer.decode(completion.tokens, skip_special_tokens=False)}
        except BaseException as e:
            self._abandon(futures)
            self._count_failure(e)
            raise
        self.requests["answered"] += 1

    def _submit_counted(self, request: dict, on_token=None) -> list[Future]:
        try:
            return self._submit(request, on_token)
        except BadRequest:
            self.requests["refused"] += 1
            raise

    def _count_failure(self, error: BaseException) -> None:
        cancelled = isinstance(error, (asyncio.CancelledError, GeneratorExit, CancelledError))
        self.requests["cancelled" if cancelled else "failed"] += 1

    def stats(self) -> dict:
        """The engine's counters, the row cache's (hit rate, bytes) when there is one, and requests answered."""
        engine = dict(self.engine.stats)
        engine["live"], engine["waiting"] = len(self.engine.live), len(self.engine.waiting)
        cache = getattr(self.generator.fetcher.backend, "cache", None)
        return {"model": self.model_name, "table": self.table, "engine": engine, "requests": dict(self.requests),
                "row_cache": cache.stats() if cache is not None else None}

    def close(self) -> None:
        """Stop the engine (unfinished requests fail) and close the tables."""
        self.engine.stop()
        close = getattr(self.generator.fetcher.backend, "close", None)
        if close is not None:
            close()

    def _new_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"


def _one_version(versions: list[int]) -> int | None:
    """The version a choice read (None for tables without versions: in-process)."""
    if len(versions) > 1:  # the engine pins a request to one version: this would be a bug, and is said so
        raise RuntimeError(f"a request read several table versions {versions}")
    return versions[0] if versions and versions[0] else None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
