"""Data parallelism across model workers with torch.distributed (gloo on CPU, nccl on GPU).

Every rank samples the same global batch and trains on its slice of it. Dense gradients
are averaged with one all-reduce over a flat buffer, so each rank's optimizer makes the
same step. Engram row gradients are combined as one batch: every rank's (unique ids,
grads) is all-gathered, rows seen by several ranks are summed, the sum is divided by the
world size (each rank's loss is a mean over its slice), and each rank pushes a disjoint
slice of the combined rows, so a row gets exactly one update per step. The MoE balance
statistics (tokens per expert) are summed across ranks too, so the balance loss is the
global batch's. With world size 1 every method is the identity.
"""

from __future__ import annotations

import datetime
import os
import socket

import numpy as np
import torch
import torch.distributed as dist

from memory_service.dedup import dedup_ids

# How long a rank waits in any collective (joining included): long enough for the leader to create a
# large table on the pool or write a checkpoint while the others wait at the next collective.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on host now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend of a group computing on device: gloo for host tensors, and nccl for CUDA ones."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


class DataParallel:
    """One rank's view of the data-parallel group."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def join(cls, master: str, rank: int, world_size: int, device: torch.device) -> "DataParallel":
        """Join the process group at master (HOST:PORT, rank 0's); blocks until every rank joined. device: the one
        the driver chose for the whole group (every rank must pass the same type, or the backends differ and the
        first collective hangs)."""
        if world_size == 1:
            return cls()
        host = master.rpartition(":")[0]
        if host in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a local cluster stays on loopback
        if dist.is_initialized():
            dist.destroy_process_group()
        # host-side collectives (row gradients, losses, counts) use gloo; CUDA tensors go through nccl
        backend = backend_for(torch.device(device))
        dist.init_process_group(backend, init_method=f"tcp://{master}", rank=rank, world_size=world_size,
                                timeout=COLLECTIVE_TIMEOUT)
        return cls(rank, world_size)

    @property
    def active(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    def leave(self) -> None:
        """Destroy the process group (before this worker goes away or the group is re-formed)."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def local_slice(self, global_batch: int) -> slice:
        """This rank's rows of a global batch (equal slices)."""
        if global_batch % self.world_size:
            raise ValueError(f"batch size {global_batch} does not split evenly over {self.world_size} workers")
        size = global_batch // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Every rank takes rank 0's parameters and buffers."""
        if not self.active:
            return
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)

    def average_gradients(self, parameters) -> None:
        """Mean of every parameter's gradient across ranks.

        A rank without a gradient for a parameter (an expert that got none of its tokens)
        adds zeros; a parameter no rank has a gradient for keeps grad None, so the
        optimizer skips it as it would for one worker with the whole batch.
        """
        if not self.active:
            return
        params = [p for p in parameters if p.requires_grad]
        if not params:
            return
        # which parameters anyone has a gradient for: a host tensor (gloo), so nothing here waits for the GPU
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)  # [P]
        dist.all_reduce(has_grad)
        flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                          for p in params])  # [sum of numels]: the one copy of the gradients
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        offset = 0
        for p, used in zip(params, has_grad.tolist()):
            if used:
                p.grad = flat[offset:offset + p.numel()].view_as(p)  # views of one buffer: no copy per parameter
            else:
                p.grad = None
            offset += p.numel()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum across ranks (identity for one rank)."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def means(self, *values: float) -> list[float]:
        """Means of floats across ranks (one all-reduce)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            dist.barrier()

    def combine_row_gradients(self, ids: np.ndarray, grads: np.ndarray, split: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of the step's combined row gradients.

        ids int64 [U], grads float32 [U, hd] (the rank's unique rows) -> (ids [S], grads [S, hd]):
        the union of all ranks' rows, gradients summed and divided by the world size, split
        into disjoint contiguous slices, one per rank (split=False: all of it, for ranks that
        each hold a replica of the tables).
        """
        if not self.active:
            return ids, grads
        width = grads.shape[1]
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([ids.size], dtype=torch.int64))
        longest = max(int(s) for s in sizes)
        padded_ids = torch.zeros(longest, dtype=torch.int64)
        padded_ids[:ids.size] = torch.from_numpy(ids)
        padded_grads = torch.zeros(longest, width, dtype=torch.float32)
        padded_grads[:ids.size] = torch.from_numpy(grads)
        id_parts = [torch.empty_like(padded_ids) for _ in range(self.world_size)]
        grad_parts = [torch.empty_like(padded_grads) for _ in range(self.world_size)]
        dist.all_gather(id_parts, padded_ids)
        dist.all_gather(grad_parts, padded_grads)
        all_ids = torch.cat([part[:int(n)] for part, n in zip(id_parts, sizes)])  # [sum U]
        all_grads = torch.cat([part[:int(n)] for part, n in zip(grad_parts, sizes)])  # [sum U, hd]
        batch = dedup_ids(all_ids.numpy())
        summed = torch.zeros(batch.unique.size, width, dtype=torch.float32)
        summed.index_add_(0, torch.from_numpy(batch.inverse()), all_grads)  # rows of several ranks add up
        summed /= self.world_size
        if not split:
            return batch.unique, summed.numpy()
        share = np.array_split(np.arange(batch.unique.size), self.world_size)[self.rank]
        if share.size == 0:
            return batch.unique[:0], summed.numpy()[:0]
        return batch.unique[share[0]:share[-1] + 1], summed.numpy()[share[0]:share[-1] + 1]
