"""A batched decoding engine: requests join and leave a running batch (continuous batching).

Each request gets a KV-cache slot (slot_cache.py). A step of the engine:

1. admits waiting requests into free slots: one prefill of all of them (prompts right-padded to the
   longest), whose last real position gives each its first new token;
2. decodes one token for every live request at once: the new tokens of all of them are hashed,
   deduplicated across the batch and looked up per Engram layer in one go, sent ahead (prefetch)
   so they travel while the layers before the first Engram layer run; each row attends to its own
   slot only;
3. retires requests that reached max_new_tokens, freeing their slots for the next admission.

Greedy output of every request equals what the single-request Generator gives for it alone
(tests/test_engine.py); sampling uses a generator per request, seeded by the request, so it does too.
Each decode step syncs the host once (the new tokens: the next lookups hash them on the host).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np
import torch

from model_worker.device import to_device
from model_worker.engram_rows import EngramRowFetcher
from model_worker.generate import sample_next
from model_worker.model import EngramMoEModel, check_token_range
from model_worker.slot_cache import SlotCache


@dataclass
class Completion:
    """A finished request: its new token ids and the table versions its rows came from (one, unless swapped)."""

    request_id: int
    prompt: list[int]
    tokens: list[int]
    versions: list[int]


@dataclass
class _Sequence:
    """A request in a slot: what it generated so far and what its next step needs."""

    request_id: int
    prompt: np.ndarray  # [T0] int64
    max_new_tokens: int
    temperature: float
    top_k: int
    generator: torch.Generator
    future: Future
    slot: int = -1
    length: int = 0  # positions filled in its slot
    generated: list[int] = field(default_factory=list)
    versions: set = field(default_factory=set)
    pinned: int = 0  # the table version its prefill read (0: an in-process table): every later step reads it too
    on_token: Callable[[int, int], None] | None = None  # called (token, version) from the loop for each new token

    def recent(self, width: int) -> np.ndarray:
        """The last `width` tokens before the next one (host), [<= width]."""
        if not width:
            return self.prompt[:0]
        before = self.generated[max(0, len(self.generated) - 1 - width):-1]  # at most `width` generated tokens
        tail = self.prompt[max(0, self.prompt.size - (width - len(before))):]  # the rest from the prompt's end
        return np.concatenate([tail, np.asarray(before, dtype=np.int64)])


class StackedRows(Mapping):
    """Several fetches' rows stacked along the batch, layer by layer (one fetch per table version)."""

    def __init__(self, parts: list):
        self.parts = parts

    def __getitem__(self, layer_id: int) -> torch.Tensor:
        return torch.cat([part[layer_id] for part in self.parts], dim=0)  # [B, T, heads, head_dim]

    def __iter__(self):
        return iter(self.parts[0])

    def __len__(self) -> int:
        return len(self.parts[0])

    @property
    def versions(self) -> list[int]:
        """Every version the parts were read from."""
        return sorted({v for part in self.parts for v in part.versions})


class DecodingEngine:
    """Continuous batching over a model and its row fetcher: submit() from any thread, step() or start() to run."""

    def __init__(self, model: EngramMoEModel, fetcher: EngramRowFetcher, max_batch: int = 32,
                 dtype: torch.dtype | None = None, prefetch: bool = True):
        self.model = model.eval()
        self.fetcher = fetcher
        self.device = next(model.parameters()).device
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.prefetch = prefetch
        self.config = model.config
        history = 0
        for block in model.blocks:
            if block.engram is not None:
                history = block.engram.short_conv.history_len
        self.cache = SlotCache(self.config, max_batch, self.config.max_seq_len, history, self.device, self.dtype)
        self.width = fetcher.spec.max_ngram_size - 1  # tokens of context a new token's n-grams need
        self.free = list(range(max_batch))
        self.waiting: deque[_Sequence] = deque()
        self.live: list[_Sequence] = []
        self.ids = itertools.count(1)
        self._abandoned: set[int] = set()  # request ids whose caller left (abandon()); retired at the next step
        self.last_step_at = time.monotonic()  # when the last step ended (a health check's heartbeat)
        self.lock = threading.Condition()
        self.stats = {"steps": 0, "prefills": 0, "tokens": 0, "requests": 0, "batch_sum": 0, "wait_s": 0.0}
        self._thread = None
        self._stop = False
        self._stepping = threading.Lock()

    # ------------------------------------------------------------------ requests
    def submit(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int = 50, seed: int = 0,
               on_token: Callable[[int, int], None] | None = None) -> Future:
        """Queue a request (prompt ids [T0]); a Future of its Completion. Bad input raises here, not in the loop.
        on_token(token, table_version), if given, is called from the engine's loop for each new token as it is made
        (for streaming: it must be quick and must not block; what it raises is ignored)."""
        prompt = np.asarray(prompt_ids)
        if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError(f"a prompt is a non-empty 1-D list of token ids, got shape {list(prompt.shape)}")
        prompt = prompt.astype(np.int64)
        check_token_range(prompt, self.config.vocab_size)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompt.size + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({prompt.size}) + new tokens ({max_new_tokens}) exceed max_seq_len "
                             f"{self.config.max_seq_len}")
        future: Future = Future()
        sequence = _Sequence(next(self.ids), prompt, max_new_tokens, float(temperature), int(top_k),
                             torch.Generator().manual_seed(seed), future, on_token=on_token)
        future.request_id = sequence.request_id  # for abandon()
        with self.lock:
            self.waiting.append(sequence)
            self.lock.notify_all()
        return future

    def abandon(self, future: Future) -> None:
        """The caller no longer wants this request (a client went away): a waiting one is dropped, a running one
        leaves the batch at the next step and frees its slot; its future raises CancelledError."""
        if not future.cancel():  # already running (or done): retire it from the loop
            with self.lock:
                self._abandoned.add(future.request_id)

    def generate(self, prompts: list, max_new_tokens, temperature: float = 0.0, top_k: int = 50,
                 seed: int = 0) -> list[Completion]:
        """Run a list of prompts to completion (max_new_tokens: one for all, or one per prompt); completions in order."""
        counts = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
        futures = [self.submit(p, n, temperature, top_k, seed) for p, n in zip(prompts, counts)]
        if self._thread is None:
            while not all(f.done() for f in futures):
                self.step()
        return [f.result() for f in futures]

    # ------------------------------------------------------------------ the loop
    def step(self) -> int:
        """Admit what fits, decode one token for every live request, retire the finished; returns tokens made.
        One step at a time (callers of generate() on an engine without a loop thread take turns)."""
        with self._stepping:
            return self._step()

    def _step(self) -> int:
        with self.lock:
            admitted = []
            while self.waiting and self.free:
                sequence = self.waiting.popleft()
                if not sequence.future.set_running_or_notify_cancel():
                    continue  # cancelled while it waited
                sequence.slot = heapq.heappop(self.free)  # the lowest free slot: live slots stay one range
                admitted.append(sequence)
        made = 0
        try:
            if admitted:
                try:
                    made += self._prefill(admitted)
                    self.live.extend(admitted)
                except Exception as e:  # a failed prefill fails the requests it admitted; the running ones go on
                    for sequence in admitted:
                        self._finish(sequence, error=e)
                    admitted = []
            self._retire()
            if self.live:
                made += self._decode(list(self.live))
                self._retire()
        except BaseException as e:  # a failed step fails the requests in it, and the engine goes on
            for sequence in admitted + [s for s in self.live if s not in admitted]:
                self._finish(sequence, error=e)
            self.live = []
            if not isinstance(e, Exception):
                raise
        self.stats["steps"] += 1
        self.stats["tokens"] += made
        self.last_step_at = time.monotonic()
        return made

    @torch.no_grad()
    def _prefill(self, sequences: list[_Sequence]) -> int:
        """One forward pass over the admitted prompts (right-padded); each gets its first new token."""
        lengths = [s.prompt.size for s in sequences]
        tokens = np.full((len(sequences), max(lengths)), self.fetcher.spec.pad_id, dtype=np.int64)  # [B, Tmax]
        for row, sequence in enumerate(sequences):
            tokens[row, :sequence.prompt.size] = sequence.prompt
        rows = self.fetcher.fetch(tokens, prefetch=self.prefetch)
        view = self.cache.batch([s.slot for s in sequences], ends=lengths)
        with self._autocast():
            logits, _ = self.model(to_device(tokens, self.device), rows, view, 0)  # [B, Tmax, V]
        if len(rows.versions) > 1:  # a swap landed between the layers' lookups: again, all on the newer version
            rows = self.fetcher.fetch(tokens, prefetch=self.prefetch, version=max(rows.versions))
            with self._autocast():  # overwrites the slots' keys, values and conv histories
                logits, _ = self.model(to_device(tokens, self.device), rows, self.cache.batch(view.slot_list, ends=lengths), 0)
        last = logits[torch.arange(len(sequences)), torch.tensor(lengths) - 1].float()  # [B, V]
        self.stats["wait_s"] += rows.wait_seconds
        for sequence, length in zip(sequences, lengths):
            sequence.length = length
            sequence.versions.update(rows.versions)
            sequence.pinned = max(rows.versions, default=0)  # a swap reaches requests that start after it
        self._take(sequences, last)
        self.stats["prefills"] += 1
        self.stats["requests"] += len(sequences)
        return len(sequences)

    @torch.no_grad()
    def _decode(self, sequences: list[_Sequence]) -> int:
        """One token for every live request, in one forward pass over their slots. Requests pinned to different
        table versions (a swap happened while some were running) get one lookup per version."""
        by_version: dict[int, list[_Sequence]] = {}
        for sequence in sequences:
            by_version.setdefault(sequence.pinned, []).append(sequence)
        for group in by_version.values():
            group.sort(key=lambda s: s.slot)  # slots in order: often one range, whose caches are views
        sequences = [s for group in by_version.values() for s in group]  # the batch, grouped by version
        parts = []
        for version, group in by_version.items():
            tokens = np.array([[s.generated[-1]] for s in group], dtype=np.int64)  # [b, 1] on the host
            context = np.stack([self._window(s) for s in group]) if self.width else None  # [b, n-1]
            parts.append(self.fetcher.fetch(tokens, context=context, prefetch=self.prefetch, version=version))
        rows = parts[0] if len(parts) == 1 else StackedRows(parts)
        tokens = np.array([[s.generated[-1]] for s in sequences], dtype=np.int64)  # [B, 1]
        lengths = [s.length for s in sequences]
        slots = [s.slot for s in sequences]
        view = self.cache.batch(slots, lengths=lengths)
        history = self.cache.save_history(slots) if len(by_version) > 1 else None
        try:
            with self._autocast():
                logits, _ = self.model(to_device(tokens, self.device), rows, view, torch.tensor(lengths))  # [B, 1, V]
        except Exception as error:
            if history is None:
                raise  # one version: every request in the step fails
            self.cache.restore_history(slots, history)  # undo the layers that ran; the step is redone without...
            self._fail_broken_versions(by_version, error)  # ... the requests whose version cannot be read (or all)
            return 0
        self.stats["wait_s"] += sum(part.wait_seconds for part in parts)  # the forward pass waited for rows this long
        for group, part in zip(by_version.values(), parts):
            for sequence in group:
                sequence.length += 1
                sequence.versions.update(part.versions)
        self._take(sequences, logits[:, -1].float())
        self.stats["batch_sum"] += len(sequences)
        return len(sequences)

    def _fail_broken_versions(self, by_version: dict[int, list[_Sequence]], error: Exception) -> None:
        """After a failed step with several versions: fail the requests of each version whose rows cannot be read
        now (a version dropped under its requests, say); the others are redone at the next step. Raises `error` when
        every version reads fine (the failure was not the rows': everyone in the step fails, as with one version)."""
        broken = {}
        for version, group in by_version.items():
            s = group[0]
            try:
                probe = self.fetcher.fetch(np.array([[s.generated[-1]]], dtype=np.int64),
                                           context=self._window(s)[None] if self.width else None, version=version)
                for layer in probe:
                    probe[layer]
            except Exception as e:  # noqa: BLE001 - this version's requests get its error
                broken[version] = e
        if not broken:
            raise error
        for version, cause in broken.items():
            failed = {s.request_id for s in by_version[version]}
            self.live = [s for s in self.live if s.request_id not in failed]
            for sequence in by_version[version]:
                self._finish(sequence, error=cause)

    def complete(self, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
                 seed: int = 0) -> str:
        """A text completion (prompt included): the prompt encoded, decoded with the others in the batch."""
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        if not ids:
            raise ValueError("the prompt encodes to no tokens; give some text")
        room = self.config.max_seq_len - len(ids)
        if room <= 0:
            raise ValueError(f"the prompt is {len(ids)} tokens; the model's context is {self.config.max_seq_len}")
        done = self.submit(ids, min(max_new_tokens, room), temperature, top_k, seed)
        if self._thread is None:
            while not done.done():
                self.step()
        return tokenizer.decode(ids + done.result().tokens, skip_special_tokens=False)

    def _window(self, sequence: _Sequence) -> np.ndarray:
        """[n-1] tokens before the sequence's newest, left-padded with pad_id (as the fetcher pads a short context)."""
        recent = sequence.recent(self.width)
        if recent.size < self.width:
            recent = np.concatenate([np.full(self.width - recent.size, self.fetcher.spec.pad_id, dtype=np.int64), recent])
        return recent

    def _take(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        """Each sequence's next token from its row of logits [B, V] (one host sync for all of them)."""
        if all(s.temperature <= 0 for s in sequences):
            chosen = logits.argmax(dim=-1).cpu().tolist()
        else:
            chosen = [int(sample_next(logits[i:i + 1], s.temperature, s.top_k, s.generator)[0])
                      for i, s in enumerate(sequences)]
        for sequence, token in zip(sequences, chosen):
            sequence.generated.append(int(token))
            if sequence.on_token is not None:
                try:
                    sequence.on_token(int(token), sequence.pinned)
                except Exception:  # noqa: BLE001 - a listener's failure is its own, not the batch's
                    sequence.on_token = None

    def _retire(self) -> None:
        with self.lock:  # an abandoned id not live now has finished already (admitted ones are live by now)
            abandoned, self._abandoned = self._abandoned, set()
        done = [s for s in self.live if len(s.generated) >= s.max_new_tokens or s.request_id in abandoned]
        if done:
            retired = {s.request_id for s in done}
            self.live = [s for s in self.live if s.request_id not in retired]
            for sequence in done:
                self._finish(sequence, error=CancelledError() if sequence.request_id in abandoned else None)

    def _finish(self, sequence: _Sequence, error: BaseException | None = None) -> None:
        with self.lock:
            if sequence.slot >= 0:
                heapq.heappush(self.free, sequence.slot)
                sequence.slot = -1
        try:
            if error is not None:
                sequence.future.set_exception(error)
            else:
                sequence.future.set_result(Completion(sequence.request_id, sequence.prompt.tolist(), sequence.generated,
                                                      sorted(sequence.versions)))
        except InvalidStateError:  # cancelled (or already failed) meanwhile: nobody waits for it
            pass

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # ------------------------------------------------------------------ background loop
    def start(self) -> "DecodingEngine":
        """Run the loop in a background thread (for a server): steps while there is work, waits otherwise."""
        with self.lock:
            if self._thread is None:
                self._stop = False
                self._thread = threading.Thread(target=self._loop, name="engram-engine", daemon=True)
                self._thread.start()
        return self

    def _loop(self) -> None:
        try:
            while True:
                with self.lock:
                    while not self._stop and not self.waiting and not self.live:
                        self.lock.wait()
                    if self._stop:
                        return
                self.step()
        except BaseException as e:  # the loop is gone: nobody may wait for it
            self._fail_all(RuntimeError(f"the decoding engine stopped: {type(e).__name__}: {e}"))
            raise

    def _fail_all(self, error: BaseException) -> None:
        """Fail every queued and live request (the engine cannot finish them)."""
        with self.lock:
            pending, self.waiting = list(self.waiting), deque()
        for sequence in pending + self.live:
            self._finish(sequence, error=error)
        self.live = []

    def stop(self) -> None:
        """Stop the background loop; requests not finished by then fail (their futures raise)."""
        with self.lock:
            self._stop = True
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._fail_all(RuntimeError("the decoding engine was stopped before this request finished"))
