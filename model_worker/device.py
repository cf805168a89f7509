"""Which torch device a model worker computes on, and host <-> device copies that do not stall it."""

from __future__ import annotations

import os

import numpy as np
import torch

from memory_service.row_dtypes import BFLOAT16

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def cuda_unavailable_reason() -> str | None:
    """Why torch cannot use a GPU in this process (None when it can): a CPU-only build, GPUs masked by
    CUDA_VISIBLE_DEVICES (Ray sets it to the GPUs an actor asked for: none unless it asked), or no driver/device."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:  # ROCm builds use torch.cuda too
        return f"this torch build ({torch.__version__}) has no CUDA support: install a CUDA build of torch"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return (f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU (a Ray actor that asked for no GPU gets this: "
                "ask for num_gpus)")
    if not torch.cuda.is_available():
        return "torch finds no usable GPU (no NVIDIA driver, or no device visible to this process)"
    return None


def resolve_device(requested: str | torch.device | None = "auto") -> torch.device:
    """The device to compute on. 'auto' (or None): CUDA when torch can use it, else CPU. 'cuda' / 'cuda:N': that GPU,
    or a ValueError naming why it cannot be used (never a silent CPU fallback). 'cpu': the CPU."""
    name = str(requested or "auto")
    if name == "auto":
        return torch.device("cuda" if cuda_unavailable_reason() is None else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise ValueError(f"device {name} was asked for but cannot be used: {reason}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name} was asked for but only {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type != "cpu":
        raise ValueError(f"device must be one of {DEVICE_CHOICES} (or cuda:N), got {name!r}")
    return device


def use_device(device: torch.device) -> None:
    """Make a CUDA device the current one (streams, events and NCCL default to it; cuda:1 must not run on cuda:0's
    streams); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def pick_device() -> torch.device:
    """CUDA when torch can use it, else CPU (resolve_device('auto'))."""
    return resolve_device("auto")


def host_tensor(rows: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing rows' memory, in their own dtype: float32, float16 or bfloat16 (which torch.from_numpy
    does not know: its bits are viewed as int16, then as torch.bfloat16; no cast, no copy)."""
    rows = np.ascontiguousarray(rows)
    if rows.dtype == BFLOAT16:
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(rows)


def numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array sharing a CPU tensor's memory (bfloat16 as ml_dtypes' bfloat16, bit for bit)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BFLOAT16)
    return tensor.numpy()


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """array on device. On CUDA through pinned host memory with a non-blocking copy (a pageable copy makes the host
    wait for the GPU queue to drain); on the CPU the tensor shares array's memory."""
    host = host_tensor(array)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
