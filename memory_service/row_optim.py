"""Row-wise Adam for Engram tables: only the rows of a step are read and written.

Each row carries its own Adam state (m, v and a step count), so a row touched for the
first time at global step 1000 gets the bias correction of its own first step, as if
the table were a dense parameter that only ever saw gradients on the rows it used. The
paper trains Engram rows with Adam at 5x the backbone's learning rate and no weight
decay. The update is vectorised over the rows; the caller gathers and scatters them.

A table keeps one of two optimizer states per row (its spec's `optimizer_state`):

- "exact" (the default, the paper's setting): m and v in float32 per value and an int64
  step count, 8 * head_dim + 8 bytes (520 B for a 64-wide row: 4x a 128-byte fp16 row);
- "compact": m in bfloat16 per value, one float32 second moment per row (the mean of
  the squared gradient over the row, as embedding trainers commonly keep it) and an
  int32 step count, 2 * head_dim + 8 bytes (136 B at 64 wide). The update divides the
  whole row by one sqrt(v) and m is rounded to bf16 after each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from memory_service.errors import InvalidArgument
from memory_service.row_dtypes import BFLOAT16, all_finite

OPTIMIZER_STATES = ("exact", "compact")


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


# An Adam step moves each value by about the learning rate (the normalised update is about +-1): a rate above this
# is a mistake that would throw rows to the edge of their dtype's range.
MAX_LEARNING_RATE = 1e3


def record_dtype(head_dim: int, state: str = "exact") -> np.dtype:
    """A row's optimizer record as stored: Adam m, v and the row's step count (see the module doc for the two states)."""
    if state == "exact":
        return np.dtype([("m", "<f4", (head_dim,)), ("v", "<f4", (head_dim,)), ("step", "<i8")])
    if state == "compact":
        return np.dtype([("m", BFLOAT16, (head_dim,)), ("v", "<f4"), ("step", "<i4")])
    raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATES}, got {state!r}")


def check_learning_rate(lr: float) -> float:
    """A learning rate in [0, MAX_LEARNING_RATE] (InvalidArgument otherwise)."""
    if not math.isfinite(lr) or not 0 <= lr <= MAX_LEARNING_RATE:
        raise InvalidArgument(f"learning rate must be a number in [0, {MAX_LEARNING_RATE:g}] (an Adam step moves each "
                              f"value by about the learning rate), got {lr}", reason="LEARNING_RATE_OUT_OF_RANGE")
    return float(lr)


def row_adam_step(rows: np.ndarray, records: np.ndarray, grads: np.ndarray, lr: float,
                  config: RowAdamConfig) -> tuple[np.ndarray, np.ndarray]:
    """One Adam step on gathered rows [N, D] (table dtype) and their optimizer records [N] (either state's).

    Returns new (rows, records) for the same N rows; the inputs are not modified.
    """
    compact = records.dtype["v"].shape == ()
    m = records["m"].astype(np.float32)  # [N, D]
    v = records["v"][:, None] if compact else records["v"]  # [N, 1] or [N, D]
    new_rows, new_m, new_v, new_steps = row_adam_update(rows, m, v, records["step"], grads, lr, config, rowwise_v=compact)
    out = np.empty_like(records)
    out["m"], out["v"], out["step"] = new_m, new_v[:, 0] if compact else new_v, new_steps
    return new_rows, out


def row_adam_update(rows: np.ndarray, m: np.ndarray, v: np.ndarray, steps: np.ndarray, grads: np.ndarray, lr: float,
                    config: RowAdamConfig, rowwise_v: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One Adam step on gathered rows.

    rows: [N, D] (table dtype), m: [N, D] float32, v: [N, D] float32 ([N, 1] with rowwise_v: one second moment
    per row, fed the mean of the squared gradient), steps: [N], grads: [N, D].
    Returns new (rows, m, v, steps) for the same N rows; the inputs are not modified.
    Raises InvalidArgument (reason NON_FINITE_UPDATE) when a new row (in its own dtype) or
    moment would not be finite: a gradient or learning rate too large for the table, which
    would otherwise corrupt the row for good.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below, not warned about
        g = grads.astype(np.float32, copy=False)
        new_steps = steps.astype(np.int64) + 1  # [N]
        new_m = config.beta1 * m + (1.0 - config.beta1) * g
        g2 = np.mean(g * g, axis=1, keepdims=True, dtype=np.float32) if rowwise_v else g * g  # [N, 1] or [N, D]
        new_v = config.beta2 * v + (1.0 - config.beta2) * g2
        t = new_steps.astype(np.float64)[:, None]  # [N, 1]
        bias1 = (1.0 - config.beta1 ** t).astype(np.float32)
        bias2 = (1.0 - config.beta2 ** t).astype(np.float32)
        update = (new_m / bias1) / (np.sqrt(new_v / bias2) + np.float32(config.eps))  # [N, D]
        w = rows.astype(np.float32)
        if config.weight_decay:
            w = w * np.float32(1.0 - lr * config.weight_decay)
        w = w - np.float32(lr) * update
        new_rows = w.astype(rows.dtype, copy=False)
    if not (all_finite(new_rows) and all_finite(new_v) and all_finite(new_m)):
        raise InvalidArgument(f"this update would store non-finite values (learning rate {lr}, largest |gradient| "
                              f"{float(np.abs(g).max()):.3g}) in a {rows.dtype.name} table: lower the learning rate or "
                              "clip the gradients; nothing was changed", reason="NON_FINITE_UPDATE")
    return new_rows, new_m.astype(np.float32, copy=False), new_v.astype(np.float32, copy=False), new_steps
