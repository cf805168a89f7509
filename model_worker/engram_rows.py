"""Remote-table autograd: fetch a batch's Engram rows from a table backend, push their gradients.

Per Engram layer: raw ids -> compressed ids -> row ids [B, T, heads] -> unique ids
(+ inverse) -> one backend lookup of the unique rows -> a leaf tensor [U, head_dim].
The layer sees `leaf[inverse]` reshaped to [B, T, heads, head_dim], so backward sums the
gradients of repeated rows into the leaf; `push_gradients` sends those unique-row
gradients to the backend, which applies row-wise Adam.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from memory_service.backend import LayerOf, TableBackend
from memory_service.compression import CompressedTokenizer
from memory_service.dedup import dedup_ids
from memory_service.fp8_rows import dequantize
from memory_service.hashing import NgramHasher
from model_worker.device import numpy_view, to_device


@dataclass
class LayerRows:
    """One layer's rows: unique ids [U], leaf rows [U, hd] (once arrived), inverse [B*T*H], the batch shape.

    With prefetch the lookup is still in flight (`pending`: a Future of StagedRows, see
    prefetch.py); the first use waits for it, so an Engram layer waits only for its own
    rows, after the layers before it ran.
    """

    unique_ids: np.ndarray
    leaf: torch.Tensor | None
    inverse: torch.Tensor
    shape: tuple[int, int, int]
    pending: object | None = None
    requires_grad: bool = False
    device: torch.device = torch.device("cpu")
    wait_seconds: float = 0.0
    version: int = 0  # table version the rows came from (0: in-process table)

    def gathered(self) -> torch.Tensor:
        """Rows per token and head, [B, T, heads, head_dim] (waits for a prefetched lookup)."""
        if self.leaf is None:
            started = time.perf_counter()
            staged = self.pending.result()
            self.wait_seconds = time.perf_counter() - started
            self.version = staged.version
            self.leaf = staged.ready().requires_grad_(self.requires_grad)
            self.pending = None
        return self.leaf[self.inverse].view(*self.shape, self.leaf.shape[-1])


def rows_to_leaf(rows: np.ndarray, device: torch.device, requires_grad: bool, head_dim: int | None = None) -> torch.Tensor:
    """float32 leaf tensor of fetched rows on the device (pinned host memory and a non-blocking copy on CUDA); FP8
    records (uint8 [U, head_dim + head_dim / 32]) are dequantized first."""
    if rows.dtype == np.uint8:
        rows = dequantize(rows, head_dim)
    host = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True).requires_grad_(requires_grad)


class FetchedRows(Mapping):
    """layer_id -> rows [B, T, heads, head_dim]; what the model's forward consumes."""

    def __init__(self, layers: dict[int, LayerRows]):
        self.layers = layers
        self._staged = None  # CUDA: ({layer_id: pinned grads [U, hd]}, the copies' event), once stage_gradients ran

    def __getitem__(self, layer_id: int) -> torch.Tensor:
        return self.layers[layer_id].gathered()

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def num_ids(self) -> int:
        """Row ids the batch asked for, all layers."""
        return sum(int(np.prod(r.shape)) for r in self.layers.values())

    @property
    def num_unique(self) -> int:
        """Distinct rows fetched, all layers."""
        return sum(int(r.unique_ids.size) for r in self.layers.values())

    @property
    def versions(self) -> list[int]:
        """Table versions the step's rows came from (one, unless something is wrong)."""
        return sorted({r.version for r in self.layers.values()})

    @property
    def wait_seconds(self) -> float:
        """Time the forward pass spent waiting for prefetched rows, all layers."""
        return sum(r.wait_seconds for r in self.layers.values())

    def stage_gradients(self) -> None:
        """Start bringing every layer's row gradients to the host, right after backward: on CUDA one non-blocking copy
        per layer into one pinned buffer, on the compute stream (so it overlaps what the host does next, e.g. the
        dense optimizer step); row_gradients() waits for it. A no-op on the CPU."""
        used = {layer_id: rows for layer_id, rows in self.layers.items() if rows.leaf is not None}
        if self._staged is not None or not used or next(iter(used.values())).leaf.device.type != "cuda":
            return
        width = next(iter(used.values())).leaf.shape[-1]
        total = sum(rows.leaf.shape[0] for rows in used.values())
        host = torch.empty((total, width), dtype=torch.float32, pin_memory=True)  # [sum U, hd]
        parts, start = {}, 0
        for layer_id, rows in used.items():
            part = host[start:start + rows.leaf.shape[0]]
            if rows.leaf.grad is None:
                part.zero_()
            else:
                part.copy_(rows.leaf.grad.detach(), non_blocking=True)
            parts[layer_id] = part
            start += rows.leaf.shape[0]
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(next(iter(used.values())).leaf.device))  # the copies' stream, any GPU
        self._staged = (parts, done)

    def row_gradients(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """{layer_id: (unique ids [U], grads float32 [U, hd])} after backward (zeros where no grad flowed)."""
        if self._staged is not None:
            parts, done = self._staged
            done.synchronize()  # only the gradient copies (and what the stream ran before them) are waited for
            return {layer_id: (self.layers[layer_id].unique_ids, part.numpy()) for layer_id, part in parts.items()}
        out = {}
        for layer_id, rows in self.layers.items():
            if rows.leaf is None:
                continue  # never used in a forward pass: no gradient to push
            grad = rows.leaf.grad
            g = np.zeros(rows.leaf.shape, dtype=np.float32) if grad is None else grad.detach().float().cpu().numpy()
            out[layer_id] = (rows.unique_ids, g)
        return out


class EngramRowFetcher:
    """Turns raw token ids into fetched rows for every Engram layer, and pushes row gradients."""

    def __init__(self, backend: TableBackend, compressor: CompressedTokenizer, hasher: NgramHasher, device="cpu"):
        self.backend = backend
        self.compressor = compressor
        self.hasher = hasher
        self.device = torch.device(device)
        self.spec = hasher.spec
        self._stager = None

    @property
    def stager(self):
        """The staging thread (and CUDA side stream) of prefetched rows, made on first use."""
        if self._stager is None:
            from model_worker.prefetch import RowStager

            self._stager = RowStager(self.device, self.spec.head_dim)
        return self._stager

    def row_ids(self, tokens, context=None) -> dict[int, np.ndarray]:
        """{layer_id: int64 [B, T, heads]} row ids of raw tokens [B, T].

        `context` ([B, any]) holds the raw tokens before the first column (incremental
        decoding); its last max_ngram_size-1 columns are used, left-padded with pad_id.
        """
        ids = tokens.cpu().numpy() if torch.is_tensor(tokens) else np.asarray(tokens)
        compressed = self.compressor(ids)
        history = None
        if context is not None:
            ctx = context.cpu().numpy() if torch.is_tensor(context) else np.asarray(context)
            if ctx.ndim != 2 or ctx.shape[0] != ids.shape[0]:
                raise ValueError(f"context must be [batch={ids.shape[0]}, n], got shape {ctx.shape}")
            width = self.spec.max_ngram_size - 1
            ctx = ctx[:, -width:] if width else ctx[:, :0]
            if ctx.shape[1] < width:
                pad = np.full((ctx.shape[0], width - ctx.shape[1]), self.spec.pad_id, dtype=np.int64)
                ctx = np.concatenate([pad, ctx.astype(np.int64)], axis=1)
            history = self.compressor(ctx)
        return self.hasher.row_ids(compressed, history)

    def fetch(self, tokens, context=None, requires_grad: bool = False, prefetch: bool = False, version: int = 0) -> FetchedRows:
        """Rows of raw tokens [B, T] for all Engram layers (each layer's unique ids, looked up once).

        A remote backend gets every layer's lookup in one multi-layer call (one call per shard), so
        the first Engram layer waits for every layer's rows (a decoding step's are small; fewer
        calls cost the CPU less than later layers' rows arriving later would save).
        prefetch=True returns at once; each layer's rows are awaited when the model first uses
        them. Without it the rows are waited for here. An in-process table answers at once,
        so it is looked up directly. version: the table version to read (0: the active one;
        remote backends).
        """
        layers = {}
        batches = {layer_id: (dedup_ids(ids.reshape(-1)), tuple(ids.shape)) for layer_id, ids in self.row_ids(tokens, context).items()}
        if not self.backend.remote:  # an in-process table answers at once
            for layer_id, (batch, shape) in batches.items():
                rows = self.backend.lookup(layer_id, batch.unique)  # [U, hd] float32
                leaf = rows_to_leaf(rows, self.device, requires_grad, self.spec.head_dim)
                layers[layer_id] = LayerRows(batch.unique, leaf, to_device(batch.inverse(), self.device), shape)
            return FetchedRows(layers)
        # every layer's lookup in one go (one call per shard), sent before the inverses are worked out
        hosts = {}  # on CUDA, with prefetch, the replies land straight in pinned memory, the source of the device copy
        if prefetch:
            hosts = {layer_id: self.stager.host_buffer(batch.unique.size, self.backend.row_width, self.backend.dtype)
                     for layer_id, (batch, _) in batches.items()}
        outs = {layer_id: numpy_view(host) for layer_id, host in hosts.items() if host is not None}
        pending = self.backend.lookup_layers_async({layer_id: batch.unique for layer_id, (batch, _) in batches.items()},
                                                   version=version, outs=outs)
        for layer_id, (batch, shape) in batches.items():
            inverse = to_device(batch.inverse(), self.device)
            if prefetch:  # each layer's rows are awaited where the model first uses them
                staged = self.stager.submit(LayerOf(pending, layer_id), hosts.get(layer_id))
                layers[layer_id] = LayerRows(batch.unique, None, inverse, shape, staged, requires_grad, self.device)
            else:  # the version served is kept: a decoding request stays on it
                started = time.perf_counter()
                rows, served = LayerOf(pending, layer_id).result()  # the first layer waits for all of them
                waited = time.perf_counter() - started
                leaf = rows_to_leaf(rows, self.device, requires_grad, self.spec.head_dim)
                layers[layer_id] = LayerRows(batch.unique, leaf, inverse, shape, version=served, wait_seconds=waited)
        return FetchedRows(layers)

    def push_gradients(self, fetched: FetchedRows, lr: float) -> int:
        """Send each layer's unique-row gradients to the backend (row-wise Adam); returns rows pushed."""
        return self.push_row_gradients(fetched.row_gradients(), lr)

    def push_row_gradients(self, gradients: dict[int, tuple[np.ndarray, np.ndarray]], lr: float) -> int:
        """Apply {layer_id: (ids [U], grads [U, hd])} on the backend; returns rows pushed."""
        pushed = 0
        for layer_id, (ids, grads) in gradients.items():
            if ids.size:
                self.backend.apply_gradients(layer_id, ids, grads, lr)
            pushed += ids.size
        return pushed


class NoTables:
    """Rows source, fetcher and backend of a model without Engram layers (an MoE baseline): nothing to fetch, push
    or keep; its checkpoint holds an empty tables file."""

    remote = False

    def fetch(self, tokens, context=None, requires_grad: bool = False, prefetch: bool = False, version: int = 0) -> FetchedRows:
        """No rows: the model has no Engram layer to feed."""
        return FetchedRows({})

    def push_row_gradients(self, gradients: dict, lr: float) -> int:
        """Nothing to push."""
        return 0

    def save(self, path) -> None:
        """An empty tables file (the checkpoint stays complete)."""
        np.savez(path)

    def load(self, path) -> None:
        """Nothing to load."""
