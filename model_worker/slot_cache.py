"""KV-cache slots for a batch of sequences that start and stop at different times (continuous batching).

`SlotCache` holds every block's keys and values for `num_slots` sequences, [slots, KV, max_len,
hd] each, and every Engram layer's conv history, [slots, C, L]. A forward pass runs on some of the
slots through a `SlotBatch` view, which the model uses like a KVCache (`.layers[i]`):

- prefill (`start_pos == 0`, tokens right-padded to the longest prompt): keys and values of every
  position go to the slots' first positions; each slot's conv history is taken at its own prompt's
  end, so the padding after a short prompt is never seen later;
- decode (`start_pos` a host tensor [B] of each slot's length, one token each): each slot's new key
  and value go to its own position, and each query attends to its own slot's positions only.

The model's math is unchanged: a slot sees exactly the keys, values and conv frames the
single-sequence cache would hold.
"""

from __future__ import annotations

import numpy as np
import torch

from model_worker.device import to_device
from model_worker.model import ModelConfig


class SlotCache:
    """Keys, values and conv histories of num_slots sequences, up to max_len positions each."""

    def __init__(self, config: ModelConfig, num_slots: int, max_len: int, history_len: int, device, dtype):
        if max_len > config.max_seq_len:
            raise ValueError(f"slot length {max_len} exceeds the model's max_seq_len {config.max_seq_len}")
        kv = config.num_kv_heads or config.num_heads
        shape = (num_slots, kv, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        channels = config.hidden_size * config.hc_mult
        # conv histories in float32 whatever the decode dtype: the Engram value path stays float32 under autocast
        # (as in a single sequence's cache), and they are small
        self.frames = [torch.zeros((num_slots, channels, history_len), device=device, dtype=torch.float32)
                       for _ in range(config.num_layers)]
        self.num_slots, self.max_len, self.history_len, self.device = num_slots, max_len, history_len, torch.device(device)

    def save_history(self, slots: list[int]) -> list[torch.Tensor]:
        """A copy of the slots' conv histories (a decode step that fails half-way is undone with restore_history)."""
        return [frames[slots].clone() for frames in self.frames]

    def restore_history(self, slots: list[int], saved: list[torch.Tensor]) -> None:
        """Put back what save_history copied (keys and values need nothing: a retried step rewrites the same position)."""
        for frames, copy in zip(self.frames, saved):
            frames[slots] = copy

    def batch(self, slots: list[int], lengths: list[int] | None = None, ends: list[int] | None = None) -> "SlotBatch":
        """A view of some slots for one forward pass: prefill (ends: each prompt's length) or decode (lengths: each
        slot's positions filled so far)."""
        return SlotBatch(self, slots, lengths, ends)


class SlotBatch:
    """Some slots of a SlotCache, as the model's cache argument for one forward pass."""

    def __init__(self, cache: SlotCache, slots: list[int], lengths: list[int] | None, ends: list[int] | None):
        self.cache = cache
        self.slot_list = list(slots)
        self.slots = to_device(np.asarray(slots, dtype=np.int64), cache.device)  # [B]
        # slots lo..lo+B-1 in order: the batch's keys and values are a view of the cache, not a copy
        lo = slots[0] if slots else 0
        self.range = slice(lo, lo + len(slots)) if slots == list(range(lo, lo + len(slots))) else None
        self.max_len = cache.max_len
        self.length = 0
        if lengths is not None:  # decode: keys 0..length of each slot, the new one at position length
            self.positions = to_device(np.asarray(lengths, dtype=np.int64), cache.device)  # [B]
            self.span = max(lengths) + 1  # keys attended to (the host knows it: no device sync)
            self.ends = None
        else:  # prefill: the conv history of each slot ends at its own prompt's end
            self.positions = None
            self.ends = to_device(np.asarray(ends, dtype=np.int64), cache.device)  # [B]
        self.layers = [_SlotLayer(self, i) for i in range(len(cache.k))]


class _SlotLayer:
    """One block's share of a SlotBatch: attend() for the attention, .conv for the Engram layer."""

    def __init__(self, batch: SlotBatch, layer: int):
        self.batch, self.layer = batch, layer
        self.conv = _SlotConv(batch, layer)

    def attend(self, k: torch.Tensor, v: torch.Tensor, start_pos):
        """As LayerCache.attend, for the batch's slots: k, v [B, KV, T, hd] -> (keys, values, mask, is_causal)."""
        batch, cache = self.batch, self.batch.cache
        keys, values = cache.k[self.layer], cache.v[self.layer]
        if batch.positions is None:  # prefill from position 0: the new keys are all there is
            keys[batch.slots, :, :k.shape[2]] = k.to(keys.dtype)
            values[batch.slots, :, :v.shape[2]] = v.to(values.dtype)
            return k, v, None, True
        if k.shape[2] != 1:
            raise ValueError(f"a decode step over slots takes one token per slot, got {k.shape[2]}")
        keys[batch.slots, :, batch.positions] = k[:, :, 0].to(keys.dtype)
        values[batch.slots, :, batch.positions] = v[:, :, 0].to(values.dtype)
        span = batch.span
        mask = torch.arange(span, device=k.device)[None, :] <= batch.positions[:, None]  # [B, span]
        rows = batch.range if batch.range is not None else batch.slots
        return keys[rows, :, :span], values[rows, :, :span], mask[:, None, None, :], False


class _SlotConv:
    """The Engram conv history of a SlotBatch's slots (ShortConv reads .frames and calls remember())."""

    def __init__(self, batch: SlotBatch, layer: int):
        self.batch, self.layer = batch, layer

    @property
    def frames(self) -> torch.Tensor | None:
        """[B, C, L] history of the slots (None for a prefill: it starts from zeros)."""
        if self.batch.positions is None:
            return None
        return self.batch.cache.frames[self.layer][self.batch.slots]

    def remember(self, padded: torch.Tensor, history_len: int) -> None:
        """Store each slot's last history_len frames of padded [B, C, L + T]: at its prompt's end for a prefill."""
        store = self.batch.cache.frames[self.layer]
        padded = padded.detach().to(store.dtype)
        if self.batch.ends is None:
            store[self.batch.slots] = padded[:, :, -history_len:]
            return
        # frame j of the prompt is padded[:, :, history_len + j]: a prompt of n frames ends at history_len + n
        index = self.batch.ends[:, None] + torch.arange(history_len, device=padded.device)  # [B, L]
        index = index[:, None, :].expand(-1, padded.shape[1], -1)  # [B, C, L]
        store[self.batch.slots] = padded.gather(2, index)
