"""Which torch device a model worker computes on."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
