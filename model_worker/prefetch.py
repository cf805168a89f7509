"""Staging prefetched rows for the model, off the critical path.

A step's lookups for every Engram layer go out at once (EngramRowFetcher.fetch with
prefetch). A single staging thread then takes the replies in layer order as they
arrive and turns each into the tensor the layer consumes:

- on CPU: float32 rows (the fp16/bf16 -> fp32 cast runs here, not in the forward pass);
- on CUDA: the replies land in pinned host memory (the lookup writes them there) and
  are sent to the GPU in the table dtype on a side stream, cast to float32 there, and an event is recorded. The layer makes
  the compute stream wait for that event (a GPU-side wait: the host does not block once
  the rows are staged), so the copy overlaps the layers that run before it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from memory_service.fp8_rows import dequantize, dequantize_torch
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

    def __init__(self, device: torch.device, head_dim: int | None = None):
        """head_dim: values per row, to dequantize FP8 records (uint8 rows) with (needed for FP8 tables)."""
        self.device = torch.device(device)
        self.head_dim = head_dim
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="engram-stage")

    def host_buffer(self, num_rows: int, width: int, dtype) -> torch.Tensor | None:
        """On CUDA, pinned host memory [num_rows, width] in the table dtype for a lookup to write its replies into
        (then the device copy reads it with no host copy in between); None on the CPU."""
        if self.stream is None:
            return None
        return torch.empty((num_rows, width), dtype=host_tensor(np.empty(0, dtype=dtype)).dtype, pin_memory=True)

    def submit(self, pending, host: torch.Tensor | None = None) -> Future:
        """Stage a pending lookup (anything with .result() -> (rows [U, hd], version)) whose replies land in host (a
        host_buffer) if given; a Future of StagedRows."""
        return self.pool.submit(self.stage, pending, host)

    def stage(self, pending, host: torch.Tensor | None = None) -> StagedRows:
        """Wait for the rows and bring them to the device as float32."""
        rows, version = pending.result()  # [U, hd] in the table dtype, or FP8 records [U, hd + hd / 32] (uint8)
        records = rows.dtype == np.uint8
        if records and self.head_dim is None:
            raise ValueError("FP8 records to stage, but the stager was built without head_dim")
        if self.stream is None:
            values = dequantize(rows, self.head_dim) if records else np.ascontiguousarray(rows, dtype=np.float32)
            return StagedRows(torch.from_numpy(values), version)
        source = host_tensor(rows)  # the table dtype as it came off the wire (bf16 too): no host-side cast
        if host is None or source.data_ptr() != host.data_ptr() or source.shape != host.shape:
            host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)  # the replies landed elsewhere
            host.copy_(source)
        with torch.cuda.stream(self.stream):
            tensor = host.to(self.device, non_blocking=True)  # the table dtype (FP8: 264 bytes a row) crosses the bus
            # [U, hd]: cast (or dequantize) on the GPU
            tensor = dequantize_torch(tensor, self.head_dim) if records else tensor.float()
            event = torch.cuda.Event()
            event.record(self.stream)
        return StagedRows(tensor, version, event, host)

    def close(self) -> None:
        """Stop the staging thread."""
        self.pool.shutdown(wait=False)
