"""Decoder-only Transformer/MoE backbone with Engram layers.

Block order follows the reference: at an Engram layer, the Engram output is added to
the residual stream first, then pre-norm attention, then the pre-norm feed-forward
(a dense SwiGLU MLP for the leading layers, MoE with shared and routed experts after).

The model receives tensors only. Engram rows come in through `engram_rows`, a mapping
layer_id -> rows [B, T, heads, head_dim] (or a zero-argument callable returning them,
so a prefetcher can hand in rows that are still travelling: the layer waits only when
it gets there). Hashing, fetching and transport live elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from memory_service.spec import EngramSpec
from model_worker.engram import EngramLayer, ShortConvState

RowsSource = Mapping[int, "torch.Tensor | Callable[[], torch.Tensor]"]


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Mixture-of-experts feed-forward."""

    num_routed_experts: int = 8
    """Experts chosen per token by the router."""
    num_shared_experts: int = 1
    """Experts every token goes through."""
    top_k: int = 2
    """Routed experts per token."""
    expert_hidden_size: int = 256
    """Inner width of one SwiGLU expert."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss (Switch-style: E * sum_e f_e * P_e)."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of the backbone; `engram` is None for the MoE-only baseline."""

    vocab_size: int
    """Raw tokenizer vocabulary."""
    hidden_size: int
    """Residual stream width D."""
    num_layers: int
    """Transformer blocks."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None = num_heads."""
    num_dense_layers: int = 1
    """Leading blocks with a dense MLP instead of MoE."""
    dense_hidden_size: int = 512
    """Inner width of the dense SwiGLU MLP."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """MoE layers' shape."""
    max_seq_len: int = 256
    """Longest sequence (RoPE table and KV cache length)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon of the backbone."""
    engram: EngramSpec | None = None
    """Engram tables and the layers that use them."""
    hc_mult: int = 1
    """Residual branches seen by Engram (1: a plain residual stream)."""

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {kv}")
        if self.moe.top_k > self.moe.num_routed_experts:
            raise ValueError(f"top_k {self.moe.top_k} exceeds num_routed_experts {self.moe.num_routed_experts}")
        if self.hc_mult != 1:
            raise ValueError("the backbone runs one residual stream (hc_mult=1); EngramLayer itself supports hc_mult > 1")
        if self.engram is not None:
            bad = [l for l in self.engram.layer_ids if l >= self.num_layers]
            if bad:
                raise ValueError(f"Engram layer_ids {bad} do not exist in a {self.num_layers}-layer model")
            if self.engram.pad_id >= self.vocab_size:
                raise ValueError(f"Engram pad_id {self.engram.pad_id} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads


def check_token_range(tokens, vocab_size: int) -> None:
    """Refuse token ids outside [0, vocab_size) (a host array or CPU tensor: no device sync)."""
    tokens = torch.as_tensor(tokens)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got range [{int(tokens.min())}, {int(tokens.max())}]")


# ---------------------------------------------------------------- building blocks
def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of RoPE angles, each [max_len, head_dim // 2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of x: [B, H, T, hd] with cos/sin [T, hd/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@dataclass
class LayerCache:
    """KV cache of one block, [B, kv_heads, max_len, head_dim] each, plus its Engram conv state."""

    k: torch.Tensor
    v: torch.Tensor
    conv: ShortConvState

    def attend(self, k: torch.Tensor, v: torch.Tensor, start_pos: int):
        """Store new keys/values [B, KV, T, hd] at start_pos; returns what the new queries attend to:
        (keys, values [B, KV, end, hd], boolean mask [T, end] or None, is_causal)."""
        time = k.shape[2]
        end = start_pos + time
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        k, v = self.k[:, :, :end], self.v[:, :, :end]
        if start_pos == 0:
            return k, v, None, True
        # new queries see the whole cache and the causal part of themselves
        return k, v, torch.ones(time, end, dtype=torch.bool, device=k.device).tril(diagonal=start_pos), False


class KVCache:
    """Per-block caches for incremental decoding; `length` tokens are filled."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if max_len > config.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model's max_seq_len {config.max_seq_len}")
        kv = config.num_kv_heads or config.num_heads
        shape = (batch_size, kv, max_len, config.head_dim)
        self.layers = [LayerCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                                  ShortConvState()) for _ in range(config.num_layers)]
        self.max_len = max_len
        self.length = 0


class Attention(nn.Module):
    """Causal multi-head attention with RoPE and grouped KV heads (SDPA)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads or config.num_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None, start_pos) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]; positions start at start_pos (an int, or a host tensor [B] of each row's start),
        cos/sin already taken for them ([T, hd/2], or [B, 1, T, hd/2] per row)."""
        batch, time, _ = x.shape
        q = self.wq(x).view(batch, time, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.wk(x).view(batch, time, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        v = self.wv(x).view(batch, time, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if cache is not None:  # a sequence's cache (LayerCache) or a batch of decoding slots (slot_cache.py)
            k, v, mask, causal = cache.attend(k, v, start_pos)
        gqa = self.num_kv_heads != self.num_heads
        if causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(batch, time, -1))


class SwiGLU(nn.Module):
    """Gated MLP: W_down(silu(W_gate x) * W_up x)."""

    def __init__(self, hidden_size: int, inner_size: int):
        super().__init__()
        self.w_gate = nn.Linear(hidden_size, inner_size, bias=False)
        self.w_up = nn.Linear(hidden_size, inner_size, bias=False)
        self.w_down = nn.Linear(inner_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] -> [..., D]."""
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class MoE(nn.Module):
    """Shared experts plus top-k routed experts, with a load-balancing auxiliary loss."""

    def __init__(self, hidden_size: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.router = nn.Linear(hidden_size, config.num_routed_experts, bias=False)
        self.experts = nn.ModuleList([SwiGLU(hidden_size, config.expert_hidden_size) for _ in range(config.num_routed_experts)])
        self.shared = (SwiGLU(hidden_size, config.expert_hidden_size * config.num_shared_experts)
                       if config.num_shared_experts else None)
        self.count_reducer = None  # data parallel: sums tokens-per-expert across ranks (a global balance loss)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, D] -> (y [B, T, D], aux loss scalar)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, D]
        num_experts, top_k = self.config.num_routed_experts, self.config.top_k
        probs = self.router(flat).float().softmax(dim=-1)  # [N, E]
        weights, experts = probs.topk(top_k, dim=-1)  # [N, k]
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(flat.dtype)
        # Group token slots by expert with one sort, then run each expert on its slice.
        flat_experts = experts.reshape(-1)  # [N*k]
        order = flat_experts.argsort(stable=True)
        token_of_slot = order // top_k  # [N*k] token index of each sorted slot
        per_expert = torch.bincount(flat_experts, minlength=num_experts)  # [E] token slots per expert, on the device
        counts = per_expert.tolist()  # the step's one host sync per MoE layer: slicing needs the counts on the host
        out = torch.zeros_like(flat)
        start = 0
        for e, count in enumerate(counts):
            if count:
                slots = order[start:start + count]
                tokens = token_of_slot[start:start + count]
                y = self.experts[e](flat[tokens]) * weights.reshape(-1)[slots, None]
                out.index_add_(0, tokens, y)
            start += count
        if self.shared is not None:
            out = out + self.shared(flat)
        per_expert = per_expert.float()  # [E]
        if self.count_reducer is not None:
            per_expert = self.count_reducer(per_expert)  # the whole data-parallel batch's counts
        fraction = per_expert / per_expert.sum().clamp(min=1.0)  # f_e
        aux = num_experts * (fraction * probs.mean(dim=0)).sum() * self.config.aux_loss_coef
        return out.view(shape), aux


class Block(nn.Module):
    """(Engram) -> attention -> feed-forward, each added to the residual stream."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.engram = None
        if config.engram is not None and layer_id in config.engram.layer_ids:
            self.engram = EngramLayer(config.engram, config.hidden_size, config.hc_mult)
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.is_moe = layer_id >= config.num_dense_layers
        self.ffn = MoE(config.hidden_size, config.moe) if self.is_moe else SwiGLU(config.hidden_size, config.dense_hidden_size)

    def forward(self, h: torch.Tensor, rows: RowsSource | None, cos, sin, cache: LayerCache | None, start_pos: int):
        """h: [B, T, D] -> (h [B, T, D], aux loss)."""
        if self.engram is not None:
            if rows is None or self.layer_id not in rows:
                raise ValueError(f"layer {self.layer_id} is an Engram layer but no rows were given for it")
            layer_rows = rows[self.layer_id]
            if not torch.is_tensor(layer_rows):
                layer_rows = layer_rows()  # a prefetched transfer: wait for it only now
            h = h + self.engram(h.unsqueeze(2), layer_rows, cache.conv if cache is not None else None).squeeze(2)
        h = h + self.attn(self.attn_norm(h), cos, sin, cache, start_pos)
        if self.is_moe:
            f, aux = self.ffn(self.ffn_norm(h))
        else:
            f, aux = self.ffn(self.ffn_norm(h)), h.new_zeros(())
        return h + f, aux


class EngramMoEModel(nn.Module):
    """Token embedding -> blocks -> RMSNorm -> LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.num_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self):
        for name, p in self.named_parameters():
            if name.endswith("short_conv.conv.weight"):
                continue  # Engram conv stays zero-initialised
            if p.dim() == 2 and "embed" not in name:
                nn.init.normal_(p, std=0.02)
                if name.endswith(("wo.weight", "w_down.weight")):  # residual projections: scale by depth
                    p.data.mul_(1.0 / math.sqrt(2 * self.config.num_layers))
            elif "bias" in name:
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor, engram_rows: RowsSource | None = None,
                cache: KVCache | None = None, start_pos=0) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: int64 [B, T] -> (logits [B, T, vocab], aux loss).

        With a cache, the tokens are positions start_pos..start_pos+T-1 and the cache is updated. start_pos may be a
        host int64 tensor [B]: each row at its own position (a batch of decoding slots, slot_cache.py).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {list(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
        time = tokens.shape[1]
        per_row = torch.is_tensor(start_pos)
        end = (int(start_pos.max()) if per_row and start_pos.numel() else 0 if per_row else start_pos) + time
        if end > self.config.max_seq_len:
            raise ValueError(f"positions up to {end} exceed max_seq_len {self.config.max_seq_len}")
        if tokens.device.type == "cpu":  # on a GPU this check would wait for the queue: callers check on the host
            check_token_range(tokens, self.config.vocab_size)
        if cache is not None and end > cache.max_len:
            raise ValueError(f"positions up to {end} exceed the cache length {cache.max_len}")
        if per_row:  # [B, 1, T, hd/2]: each row's own positions
            index = start_pos[:, None] + torch.arange(time)  # [B, T] on the host
            if self.rope_cos.device.type == "cuda":
                index = index.pin_memory()
            index = index.to(self.rope_cos.device, non_blocking=True)
            cos, sin = self.rope_cos[index].unsqueeze(1), self.rope_sin[index].unsqueeze(1)
        else:
            cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]
        h = self.embed(tokens)  # [B, T, D]
        aux_total = h.new_zeros(())
        for i, block in enumerate(self.blocks):
            h, aux = block(h, engram_rows, cos, sin, cache.layers[i] if cache is not None else None, start_pos)
            aux_total = aux_total + aux
        if cache is not None:
            cache.length = end
        return self.lm_head(self.norm(h)), aux_total

    def set_count_reducer(self, reducer) -> None:
        """Make every MoE layer's balance loss use expert counts summed by reducer ([E] -> [E]; None: local)."""
        for module in self.modules():
            if isinstance(module, MoE):
                module.count_reducer = reducer

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache on this model's device, in dtype (default: the model's; bfloat16 for a bf16 decode)."""
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, p.device, dtype or p.dtype)
