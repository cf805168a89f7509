"""Row-wise Adam for Engram tables: only the rows of a step are read and written.

Each row carries its own Adam state (m, v and a step count), so a row touched for the
first time at global step 1000 gets the bias correction of its own first step, as if
the table were a dense parameter that only ever saw gradients on the rows it used. The
paper trains Engram rows with Adam at 5x the backbone's learning rate and no weight
decay. The update is vectorised over the rows; the caller gathers and scatters them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class RowAdamConfig:
    """Hyper-parameters of the row-wise Adam update."""

    beta1: float = 0.9
    """Decay of the first moment."""
    beta2: float = 0.999
    """Decay of the second moment."""
    eps: float = 1e-8
    """Added to sqrt(v_hat) for stability."""
    weight_decay: float = 0.0
    """Decoupled weight decay (the paper uses 0 for Engram rows)."""


def row_adam_update(rows: np.ndarray, m: np.ndarray, v: np.ndarray, steps: np.ndarray,
                    grads: np.ndarray, lr: float, config: RowAdamConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One Adam step on gathered rows.

    rows: [N, D] (table dtype), m, v: [N, D] float32, steps: [N] int64, grads: [N, D].
    Returns new (rows, m, v, steps) for the same N rows; the inputs are not modified.
    """
    g = grads.astype(np.float32, copy=False)
    new_steps = steps.astype(np.int64) + 1  # [N]
    new_m = config.beta1 * m + (1.0 - config.beta1) * g
    new_v = config.beta2 * v + (1.0 - config.beta2) * (g * g)
    t = new_steps.astype(np.float64)[:, None]  # [N, 1]
    bias1 = (1.0 - config.beta1 ** t).astype(np.float32)
    bias2 = (1.0 - config.beta2 ** t).astype(np.float32)
    update = (new_m / bias1) / (np.sqrt(new_v / bias2) + np.float32(config.eps))  # [N, D]
    w = rows.astype(np.float32)
    if config.weight_decay:
        w = w * np.float32(1.0 - lr * config.weight_decay)
    w = w - np.float32(lr) * update
    return w.astype(rows.dtype, copy=False), new_m.astype(np.float32, copy=False), new_v.astype(np.float32, copy=False), new_steps
