"""Staging prefetched rows for the model, off the critical path.

A step's lookups for every Engram layer go out at once (EngramRowFetcher.fetch with
prefetch). A single staging thread then takes the replies in layer order as they
arrive and turns each into the tensor the layer consumes:

- on CPU: float32 rows (the fp16/bf16 -> fp32 cast runs here, not in the forward pass);
- on CUDA: the table-dtype rows are copied into pinned host memory and sent to the GPU
  on a side stream, cast to float32 there, and an event is recorded. The layer makes
  the compute stream wait for that event (a GPU-side wait: the host does not block once
  the rows are staged), so the copy overlaps the layers that run before it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from model_worker.device import host_tensor


@dataclass
class StagedRows:
    """One layer's rows on their way to the model: tensor [U, hd] float32, the version, the copy's event."""

    tensor: torch.Tensor
    version: int
    event: torch.cuda.Event | None = None
    host: torch.Tensor | None = None  # the pinned source (torch's pinned allocator also waits for the copy before reuse)

    def ready(self) -> torch.Tensor:
        """The rows, usable on the current stream (makes it wait for the side-stream copy on CUDA)."""
        if self.event is not None:
            current = torch.cuda.current_stream(self.tensor.device)
            current.wait_event(self.event)
            self.tensor.record_stream(current)  # the caching allocator must not reuse it before compute is done
        return self.tensor


class RowStager:
    """A staging thread (and, on CUDA, a side stream) shared by every step of a fetcher."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="engram-stage")

    def submit(self, pending) -> Future:
        """Stage a pending lookup (anything with .result() -> (rows [U, hd], version)); a Future of StagedRows."""
        return self.pool.submit(self.stage, pending)

    def stage(self, pending) -> StagedRows:
        """Wait for the rows and bring them to the device as float32."""
        rows, version = pending.result()  # [U, hd] in the table dtype
        if self.stream is None:
            return StagedRows(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)), version)
        source = host_tensor(rows)  # the table dtype as it came off the wire (bf16 too): no host-side cast
        host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
        host.copy_(source)
        with torch.cuda.stream(self.stream):
            tensor = host.to(self.device, non_blocking=True).float()  # [U, hd]: copy the table dtype, cast on the GPU
            event = torch.cuda.Event()
            event.record(self.stream)
        return StagedRows(tensor, version, event, host)

    def close(self) -> None:
        """Stop the staging thread."""
        self.pool.shutdown(wait=False)
