"""Which torch device a model worker computes on."""

from __future__ import annotations

import numpy as np
import torch

from memory_service.row_dtypes import BFLOAT16


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def host_tensor(rows: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing rows' memory, in their own dtype: float32, float16 or bfloat16 (which torch.from_numpy
    does not know: its bits are viewed as int16, then as torch.bfloat16; no cast, no copy)."""
    rows = np.ascontiguousarray(rows)
    if rows.dtype == BFLOAT16:
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(rows)
