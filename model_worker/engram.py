"""The Engram layer: math only. It receives hidden states and already-fetched rows.

Matches the reference `Engram.forward` (deepseek-ai/Engram, `engram_demo_v1.py`)
minus the lookup: hashing and fetching live elsewhere, so the same layer runs on an
in-process table in tests and on the remote memory service in production.

    e     = concat of the token's rows over heads              [B, T, heads * head_dim]
    gate_g = sigmoid(signed_sqrt(RMSNorm(W_K,g e) . RMSNorm(h_g) / sqrt(D)))   per branch g
    v_g   = gate_g * (W_V e)                                   [B, T, G, D]
    out   = v + SiLU(depthwise_causal_conv(RMSNorm_g(v)))      kernel k, dilation max_ngram_size

Parameter names mirror the reference module, so its state dict loads directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from memory_service.hashing import head_sizes_for_spec
from memory_service.spec import EngramSpec

# Keys of the reference module's state dict that are not layer parameters.
REFERENCE_TABLE_KEY = "multi_head_embedding.embedding.weight"
REFERENCE_OFFSETS_KEY = "multi_head_embedding.offsets"


@dataclass
class ShortConvState:
    """Causal conv history for incremental decoding: the last (k-1)*dilation normed frames [B, C, L]."""

    frames: torch.Tensor | None = None

    def remember(self, padded: torch.Tensor, history_len: int) -> None:
        """Keep the history the next frames need: the last history_len of padded [B, C, L + T]."""
        self.frames = padded[:, :, -history_len:].detach()


class ShortConv(nn.Module):
    """Per-branch RMSNorm, then a causal depthwise dilated conv over time, then SiLU."""

    def __init__(self, hidden_size: int, hc_mult: int, kernel_size: int, dilation: int, norm_eps: float = 1e-5):
        super().__init__()
        self.hc_mult = hc_mult
        self.kernel_size = kernel_size
        self.dilation = dilation
        channels = hidden_size * hc_mult
        # Same module as the reference (so its weights load), but we pad on the left ourselves:
        # a zero history for a full sequence, the cached frames when decoding incrementally.
        self.conv = nn.Conv1d(channels, channels, kernel_size=kernel_size, groups=channels, bias=False, dilation=dilation)
        self.norms = nn.ModuleList([nn.RMSNorm(hidden_size, eps=norm_eps) for _ in range(hc_mult)])

    @property
    def history_len(self) -> int:
        """Frames of left context one output needs beyond its own."""
        return (self.kernel_size - 1) * self.dilation

    def forward(self, x: torch.Tensor, state: ShortConvState | None = None) -> torch.Tensor:
        """x: [B, T, G, D] -> [B, T, G, D]; updates `state` when given."""
        batch, time, groups, dim = x.shape
        normed = torch.cat([self.norms[g](x[:, :, g, :]) for g in range(groups)], dim=-1)  # [B, T, G*D]
        frames = normed.transpose(1, 2)  # [B, C, T]
        history = state.frames if state is not None else None  # read once: a slot batch gathers it
        if history is None:
            history = frames.new_zeros(batch, frames.shape[1], self.history_len)
        padded = torch.cat([history, frames], dim=-1)  # [B, C, L + T]
        if state is not None and self.history_len:
            state.remember(padded, self.history_len)
        y = F.silu(self.conv(padded))  # [B, C, T]
        return y.transpose(1, 2).reshape(batch, time, groups, dim)


class EngramLayer(nn.Module):
    """Gated fusion of fetched n-gram rows into a (multi-branch) residual stream."""

    def __init__(self, spec: EngramSpec, hidden_size: int, hc_mult: int = 1, zero_init_conv: bool = True):
        super().__init__()
        if hc_mult < 1:
            raise ValueError(f"hc_mult must be >= 1, got {hc_mult}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.spec = spec
        self.hidden_size = hidden_size
        self.hc_mult = hc_mult
        self.num_heads = spec.num_heads
        self.head_dim = spec.head_dim
        engram_hidden = spec.engram_hidden_size
        self.short_conv = ShortConv(hidden_size, hc_mult, spec.kernel_size, dilation=spec.max_ngram_size)
        self.value_proj = nn.Linear(engram_hidden, hidden_size)
        self.key_projs = nn.ModuleList([nn.Linear(engram_hidden, hidden_size) for _ in range(hc_mult)])
        self.norm1 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])  # keys
        self.norm2 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])  # queries
        if zero_init_conv:  # paper: the conv starts as identity of the gated value
            nn.init.zeros_(self.short_conv.conv.weight)

    def check_inputs(self, hidden: torch.Tensor, rows: torch.Tensor) -> None:
        """Raise ValueError when hidden or rows do not have this layer's shapes."""
        if hidden.dim() != 4 or hidden.shape[2] != self.hc_mult or hidden.shape[3] != self.hidden_size:
            raise ValueError(
                f"hidden states must be [B, T, hc_mult={self.hc_mult}, hidden={self.hidden_size}], got {list(hidden.shape)}"
            )
        expected = [hidden.shape[0], hidden.shape[1], self.num_heads, self.head_dim]
        if list(rows.shape) != expected:
            raise ValueError(f"rows must be [B, T, heads, head_dim] = {expected}, got {list(rows.shape)}")
        if not rows.is_floating_point():
            raise ValueError(f"rows must be floating point, got {rows.dtype}")

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor, conv_state: ShortConvState | None = None) -> torch.Tensor:
        """hidden: [B, T, G, D], rows: [B, T, heads, head_dim] -> Engram output [B, T, G, D] (add it to hidden)."""
        self.check_inputs(hidden, rows)
        embeddings = rows.to(hidden.dtype).flatten(start_dim=-2)  # [B, T, heads * head_dim]
        gates = []
        for g in range(self.hc_mult):
            key = self.norm1[g](self.key_projs[g](embeddings))  # [B, T, D]
            query = self.norm2[g](hidden[:, :, g, :])  # [B, T, D]
            gate = (key * query).sum(dim=-1) / math.sqrt(self.hidden_size)  # [B, T]
            gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
            gates.append(gate.sigmoid().unsqueeze(-1))  # [B, T, 1]
        gate_all = torch.stack(gates, dim=2)  # [B, T, G, 1]
        value = gate_all * self.value_proj(embeddings).unsqueeze(2)  # [B, T, G, D]
        return value + self.short_conv(value, conv_state)


def load_reference_engram(state_dict: dict, spec: EngramSpec, layer_id: int, hidden_size: int,
                          hc_mult: int) -> tuple[EngramLayer, torch.Tensor]:
    """Build our layer from a reference `Engram` module's state dict.

    Returns (layer, table rows [total_rows, head_dim]); the rows are the reference's
    `multi_head_embedding.embedding.weight`, indexed by the hasher's local row ids.
    """
    if layer_id not in spec.layer_ids:
        raise ValueError(f"layer {layer_id} is not an Engram layer of this spec (layer_ids={list(spec.layer_ids)})")
    if REFERENCE_TABLE_KEY not in state_dict:
        raise ValueError(f"state dict has no '{REFERENCE_TABLE_KEY}': not a reference Engram module")
    sizes = [p for order in head_sizes_for_spec(spec)[layer_id] for p in order]
    table = torch.as_tensor(state_dict[REFERENCE_TABLE_KEY])
    if list(table.shape) != [sum(sizes), spec.head_dim]:
        raise ValueError(
            f"'{REFERENCE_TABLE_KEY}' is {list(table.shape)} but the spec gives layer {layer_id} "
            f"{sum(sizes)} rows of width {spec.head_dim}"
        )
    if REFERENCE_OFFSETS_KEY in state_dict:
        offsets = torch.as_tensor(state_dict[REFERENCE_OFFSETS_KEY]).tolist()
        expected = [sum(sizes[:i]) for i in range(len(sizes))]
        if offsets != expected:
            raise ValueError(f"reference head offsets {offsets} differ from the spec's {expected}")
    layer = EngramLayer(spec, hidden_size, hc_mult, zero_init_conv=False)
    params = {k: torch.as_tensor(v) for k, v in state_dict.items() if k not in (REFERENCE_TABLE_KEY, REFERENCE_OFFSETS_KEY)}
    try:
        missing, unexpected = layer.load_state_dict(params, strict=False)
    except RuntimeError as e:  # shape mismatches (e.g. another hc_mult or hidden size)
        raise ValueError(f"reference state dict does not fit hidden_size={hidden_size}, hc_mult={hc_mult}: {e}") from e
    if missing or unexpected:
        raise ValueError(f"reference state dict does not fit: missing {missing}, unexpected {unexpected}")
    return layer, table.detach().clone()
