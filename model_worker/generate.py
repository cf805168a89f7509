"""Generation with a KV cache: each new token fetches only its own n-gram rows.

The prompt is run once (prefill) with its rows; every later step hashes just the new
token against the last max_ngram_size-1 tokens, fetches those rows, and runs one
position through the model, reusing attention keys/values and the Engram conv state.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from memory_service.compression import CompressedTokenizer
from memory_service.hashing import NgramHasher
from model_worker import checkpoint as ckpt
from model_worker.data import load_tokenizer
from model_worker.device import resolve_device, to_device, use_device
from model_worker.engram_rows import EngramRowFetcher
from model_worker.model import EngramMoEModel, check_token_range
from model_worker.row_cache import CachedTables, RowCache
from model_worker.tables import TableSource, table_source


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V] (greedy when temperature == 0)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temperature  # <= 0: a tiny temperature gives -inf, not nan
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


class Generator:
    """A trained model plus its row fetcher and tokenizer.

    On a GPU it decodes in bfloat16 (autocast, and a bfloat16 KV cache: half the cache memory and traffic); on the CPU
    in float32. Each decode step syncs the host once: hashing the next token's n-grams needs it there (its
    max_ngram_size-1 predecessors are kept on the host, never copied back from the device)."""

    def __init__(self, model: EngramMoEModel, fetcher: EngramRowFetcher, tokenizer=None, dtype: torch.dtype | None = None):
        self.model = model.eval()
        self.fetcher = fetcher
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        use_device(self.device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, tables: TableSource | None = None, device: str = "auto",
                        row_cache_bytes: int = 0) -> "Generator":
        """Load model, compression map, tokenizer and the tables: `tables` when given, else where the checkpoint's
        rows are (saved in it, or on the memory service it names). device: auto, cpu or cuda (no silent fallback).
        row_cache_bytes: put a row cache of that many bytes in front of remote tables (row_cache.py; 0: none)."""
        directory = ckpt.require_checkpoint(directory)
        device = resolve_device(device)
        state = torch.load(directory / ckpt.MODEL_FILE, map_location="cpu", weights_only=False)  # then to the device
        config = ckpt.model_config_from_dict(state["model_config"])
        model = EngramMoEModel(config)
        model.load_state_dict(state["model"])
        model.to(device)
        compressor = CompressedTokenizer.load(directory / ckpt.COMPRESSION_FILE)
        spec = config.engram
        if spec is None:
            raise ValueError(f"{directory} holds an MoE model without Engram layers (an experiment's baseline): "
                             "generation here needs an Engram model")
        if spec.compressed_vocab_size != len(compressor):
            raise ValueError(f"compression map in {directory} has {len(compressor)} ids but the model expects {spec.compressed_vocab_size}")
        hasher = NgramHasher.from_compressor(spec, compressor)
        if tables is None:
            where = ckpt.remote_tables(directory) or {"memory": None, "table": None, "version": 0}
            tables = table_source(where["memory"], where["table"], os.environ.get("ENGRAM_TOKEN"), where["version"])
        backend = tables.open(spec, compressor.lookup_table, create=False)
        if not backend.remote:
            backend.load(directory / ckpt.TABLES_FILE)
        elif row_cache_bytes:
            backend = CachedTables(backend, RowCache(row_cache_bytes, list(spec.layer_ids), backend.row_width, backend.dtype))
        fetcher = EngramRowFetcher(backend, compressor, hasher, device)
        return cls(model, fetcher, load_tokenizer(directory / ckpt.TOKENIZER_FILE))

    def autocast(self):
        """Autocast to the decode dtype (a no-op in float32)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @torch.no_grad()
    def generate_ids(self, prompt_ids, max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
                     seed: int = 0, return_logits: bool = False):
        """Continue prompts [B, T0] by max_new_tokens tokens -> ids [B, T0 + n] on the model's device (and the step
        logits [B, n, V] in float32)."""
        prompt = np.asarray(prompt_ids)
        if prompt.ndim != 2 or prompt.shape[1] == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError(f"prompt ids must be a non-empty [batch, time] integer array, got shape {list(prompt.shape)}")
        prompt = prompt.astype(np.int64)
        check_token_range(prompt, self.model.config.vocab_size)  # on the host: the model skips it on a GPU
        total = prompt.shape[1] + max_new_tokens
        if total > self.model.config.max_seq_len:
            raise ValueError(f"prompt ({prompt.shape[1]}) + new tokens ({max_new_tokens}) exceed max_seq_len "
                             f"{self.model.config.max_seq_len}")
        generator = torch.Generator().manual_seed(seed)
        cache = self.model.new_cache(prompt.shape[0], total, dtype=self.dtype)
        width = self.fetcher.spec.max_ngram_size - 1
        recent = prompt[:, -width:] if width else prompt[:, :0]  # [B, <= n-1] tokens before the next, on the host
        with self.autocast():  # prefill
            logits, _ = self.model(to_device(prompt, self.device), self.fetcher.fetch(prompt, prefetch=True), cache, 0)
        new_tokens, step_logits = [], []
        for i in range(max_new_tokens):
            last = logits[:, -1].float()  # [B, V]
            step_logits.append(last)
            nxt = sample_next(last, temperature, top_k, generator)[:, None]  # [B, 1] on the device
            new_tokens.append(nxt)
            if i == max_new_tokens - 1:
                break
            nxt_host = nxt.cpu().numpy()  # the step's one sync: the next lookups hash this token on the host
            # only the new token's n-grams; they travel while the layers before the first Engram layer run
            rows = self.fetcher.fetch(nxt_host, context=recent, prefetch=True)
            with self.autocast():
                logits, _ = self.model(nxt, rows, cache, start_pos=prompt.shape[1] + i)
            recent = np.concatenate([recent, nxt_host], axis=1)[:, -width:] if width else recent
        tokens = torch.cat([to_device(prompt, self.device)] + new_tokens, dim=1)
        if return_logits:
            return tokens, torch.stack(step_logits, dim=1)
        return tokens

    def generate(self, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> str:
        """Text continuation of a prompt (prompt included)."""
        if self.tokenizer is None:
            raise ValueError("this generator has no tokenizer; use generate_ids")
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        if not ids:
            raise ValueError("the prompt encodes to no tokens; give some text")
        room = self.model.config.max_seq_len - len(ids)
        if room <= 0:
            raise ValueError(f"the prompt is {len(ids)} tokens; the model's context is {self.model.config.max_seq_len}")
        out = self.generate_ids([ids], min(max_new_tokens, room), temperature, top_k, seed)
        return self.tokenizer.decode(out[0].cpu().tolist(), skip_special_tokens=False)
