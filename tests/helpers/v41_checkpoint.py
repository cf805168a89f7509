"""A synthetic checkpoint in DeepSeek-V4.1's layout, written with the safetensors library (not our writer).

A scaled-down config (small vocabulary, V4.1's orders 2..4 and 8 heads, head_dim 64: two
E8M0 scales per row), Engram layers 1 and 14. Layer 1's weight and scale sit alone in a
shard; layer 14's share a shard with a dense tensor, as a real checkpoint's would; one
more shard holds only dense tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from memory_service.spec import EngramSpec
from memory_service.table_meta import layer_rows_for_spec

HEAD_DIM = 64


def scaled_config(vocab: int = 1009, compressed: int = 5000) -> dict:
    """V4.1's engram_* keys at a small vocabulary; engram_num_embeddings computed by our layout."""
    config = {"engram_layer_ids": [1, 14], "engram_max_ngram_size": 4, "engram_n_heads": 8, "engram_head_dim": HEAD_DIM,
              "engram_vocab_size": vocab, "engram_pad_token_id": 2, "engram_compressed_vocab_size": compressed,
              "hidden_size": 256, "num_hidden_layers": 16}
    spec = EngramSpec(engram_vocab_size=(vocab,) * 3, max_ngram_size=4, n_embed_per_ngram=8 * HEAD_DIM, n_head_per_ngram=8,
                      layer_ids=(1, 14), pad_id=2)
    rows = layer_rows_for_spec(spec)
    config["engram_num_embeddings"] = [rows[1], rows[14]]
    return config


def random_layer(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight float8_e4m3fn [rows, HEAD_DIM], scale float8_e8m0fnu [rows, HEAD_DIM / 32]): every finite code, scales
    2^-20 .. 2^3."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (rows, HEAD_DIM), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3F  # no NaN codes
    scales = rng.integers(127 - 20, 127 + 4, (rows, HEAD_DIM // 32), dtype=np.uint8)
    return (torch.from_numpy(codes).view(torch.float8_e4m3fn), torch.from_numpy(scales).view(torch.float8_e8m0fnu))


def write_checkpoint(directory: Path, config: dict, seed: int = 0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Write config.json, three shards and the index; returns each layer's (weight, scale)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    layers = {layer: random_layer(rows, seed * 100 + layer)
              for layer, rows in zip(config["engram_layer_ids"], config["engram_num_embeddings"])}
    shards = {
        "model-00001-of-00003.safetensors": {"embed.weight": torch.randn(300, 256).to(torch.bfloat16),
                                             "layers.1.attn.wq.weight": torch.randn(256, 256).to(torch.bfloat16)},
        "model-00002-of-00003.safetensors": {"layers.1.engram.embed.weight": layers[1][0],
                                             "layers.1.engram.embed.scale": layers[1][1]},
        "model-00003-of-00003.safetensors": {"layers.14.engram.embed.weight": layers[14][0],
                                             "layers.14.engram.embed.scale": layers[14][1],
                                             "layers.14.attn.wq.weight": torch.randn(256, 256).to(torch.bfloat16)},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(directory / name))
        weight_map.update({t: name for t in tensors})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return layers


def torch_dequantized(weight: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """float32 [rows, HEAD_DIM]: torch's own float8 conversions, each scale over its 32 values."""
    return (weight.to(torch.float32) * scale.to(torch.float32).repeat_interleave(32, dim=1)).numpy()
