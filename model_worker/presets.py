"""Model presets as functions, parameter counts, and the iso-parameter MoE/Engram pair.

`tiny` runs in seconds on a CPU (tests), `small` in minutes on 2 CPU cores (the demo),
`engram_27b` is the paper's shape (documented, never instantiated here).
"""

from __future__ import annotations

import dataclasses

from memory_service.hashing import head_sizes_for_spec
from memory_service.spec import EngramSpec
from model_worker.model import ModelConfig, MoEConfig


def tiny(vocab_size: int, pad_id: int) -> ModelConfig:
    """2 blocks, D=64; one Engram layer (1) with 2- and 3-gram tables of ~4k rows per head."""
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_dense_layers=1,
        dense_hidden_size=192, max_seq_len=128,
        moe=MoEConfig(num_routed_experts=4, num_shared_experts=1, top_k=2, expert_hidden_size=96),
        engram=EngramSpec(engram_vocab_size=(4001, 4001), max_ngram_size=3, n_embed_per_ngram=32,
                          n_head_per_ngram=4, layer_ids=(1,), pad_id=pad_id, seed=0, kernel_size=4),
    )


def small(vocab_size: int, pad_id: int) -> ModelConfig:
    """6 blocks, D=192, 8 routed experts; Engram at layers 1 and 3 with ~20k rows per head."""
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=192, num_layers=6, num_heads=6, num_kv_heads=3, num_dense_layers=1,
        dense_hidden_size=512, max_seq_len=256,
        moe=MoEConfig(num_routed_experts=8, num_shared_experts=1, top_k=2, expert_hidden_size=192),
        engram=EngramSpec(engram_vocab_size=(20011, 20011), max_ngram_size=3, n_embed_per_ngram=64,
                          n_head_per_ngram=4, layer_ids=(1, 3), pad_id=pad_id, seed=0, kernel_size=4),
    )


def engram_27b(vocab_size: int = 129280, pad_id: int = 2) -> ModelConfig:
    """The paper's Engram-27B shape (arXiv 2601.07372), approximated with standard attention.

    Published: 30 blocks, hidden 2560, 3.8B activated parameters; the MoE-27B baseline has
    72 routed + 2 shared experts (top-6), Engram-27B moves ~5.7B parameters from 17 routed
    experts (72 -> 55) into Engram tables at layers 2 and 15 (n-grams 2..3, 8 heads per
    order, 1280-wide per order). The paper uses MLA and mHC (hc_mult 4); this preset uses
    grouped attention and one residual stream, so counts are close, not exact.
    """
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=2560, num_layers=30, num_heads=20, num_kv_heads=20, num_dense_layers=1,
        dense_hidden_size=10240, max_seq_len=4096,
        moe=MoEConfig(num_routed_experts=55, num_shared_experts=2, top_k=6, expert_hidden_size=1536),
        engram=EngramSpec(engram_vocab_size=(1113001, 1113001), max_ngram_size=3, n_embed_per_ngram=1280,
                          n_head_per_ngram=8, layer_ids=(2, 15), pad_id=pad_id, seed=0, kernel_size=4),
    )


PRESETS = {"tiny": tiny, "small": small, "engram_27b": engram_27b}


def build_preset(name: str, vocab_size: int, pad_id: int) -> ModelConfig:
    """Config of a named preset for a tokenizer's vocabulary and pad id."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](vocab_size, pad_id)


# ------------------------------------------------------------------ counting
def _swiglu(d: int, inner: int) -> int:
    return 3 * d * inner


def engram_table_params(spec: EngramSpec) -> int:
    """Parameters in all Engram tables of a spec (rows x head_dim)."""
    sizes = head_sizes_for_spec(spec)
    return sum(sum(sum(order) for order in per_layer) for per_layer in sizes.values()) * spec.head_dim


def engram_layer_params(spec: EngramSpec, hidden: int, hc_mult: int) -> int:
    """Dense parameters of one Engram layer (projections, norms, conv)."""
    eh = spec.engram_hidden_size
    value = eh * hidden + hidden
    keys = hc_mult * (eh * hidden + hidden)
    norms = 2 * hc_mult * hidden
    conv = hc_mult * hidden * spec.kernel_size + hc_mult * hidden
    return value + keys + norms + conv


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Total and per-token activated parameters, from the config alone.

    activated = what one token touches: one embedding row, attention, dense MLPs, shared
    experts, its top-k routed experts, routers, norms, the LM head, the Engram layers'
    dense weights and one row per Engram head.
    """
    d, kv = config.hidden_size, config.num_kv_heads or config.num_heads
    attn = d * config.num_heads * config.head_dim * 2 + 2 * d * kv * config.head_dim
    moe = config.moe
    expert = _swiglu(d, moe.expert_hidden_size)
    dense_total = config.vocab_size * d * 2 + d  # embed, lm_head, final norm
    routed_inactive = 0
    engram_dense = 0
    for layer_id in range(config.num_layers):
        dense_total += attn + 2 * d
        if layer_id < config.num_dense_layers:
            dense_total += _swiglu(d, config.dense_hidden_size)
        else:
            dense_total += d * moe.num_routed_experts + moe.num_routed_experts * expert
            dense_total += _swiglu(d, moe.expert_hidden_size * moe.num_shared_experts) if moe.num_shared_experts else 0
            routed_inactive += (moe.num_routed_experts - moe.top_k) * expert
        if config.engram is not None and layer_id in config.engram.layer_ids:
            engram_dense += engram_layer_params(config.engram, d, config.hc_mult)
    tables = engram_table_params(config.engram) if config.engram is not None else 0
    rows_read = (len(config.engram.layer_ids) * config.engram.num_heads * config.engram.head_dim) if config.engram else 0
    total = dense_total + engram_dense + tables
    activated = total - routed_inactive - (config.vocab_size - 1) * d - tables + rows_read
    return {"total": total, "activated": activated, "engram_tables": tables,
            "engram_layers": engram_dense, "routed_experts_inactive": routed_inactive}


def iso_parameter_pair(config: ModelConfig) -> tuple[ModelConfig, ModelConfig]:
    """(MoE-only baseline, Engram-MoE) with about the same total parameters.

    The baseline drops Engram and keeps the routed experts the Engram model gave up:
    as in the paper, Engram's table and layer parameters are paid for by removing
    routed experts (whole experts across all MoE layers), so the activated
    parameters per token stay the same.
    """
    if config.engram is None:
        raise ValueError("iso_parameter_pair needs a config with Engram tables")
    num_moe_layers = config.num_layers - config.num_dense_layers
    per_expert = _swiglu(config.hidden_size, config.moe.expert_hidden_size) * num_moe_layers + config.hidden_size * num_moe_layers
    counts = count_parameters(config)
    engram_params = counts["engram_tables"] + counts["engram_layers"]
    extra_experts = max(1, round(engram_params / per_expert))
    baseline = dataclasses.replace(
        config, engram=None,
        moe=dataclasses.replace(config.moe, num_routed_experts=config.moe.num_routed_experts + extra_experts),
    )
    return baseline, config


def _per_expert(config: ModelConfig) -> int:
    """Parameters of one routed expert across all MoE layers (its weights and its router column)."""
    num_moe_layers = config.num_layers - config.num_dense_layers
    return (_swiglu(config.hidden_size, config.moe.expert_hidden_size) + config.hidden_size) * num_moe_layers


def allocation(config: ModelConfig, rho: float) -> ModelConfig:
    """The config that gives a share rho of the sparse parameters to routed experts, the rest to Engram.

    Sparse parameters are those a token does not activate: inactive routed experts plus Engram tables (and the
    Engram layers' own weights, which are paid for from the same budget). The budget is the iso-parameter MoE
    baseline's: its (experts - top_k) inactive experts. rho = 1 is that baseline (no Engram); lower rho removes
    whole experts (every MoE layer) and grows the tables of the preset's Engram layers by what they freed, so the
    total stays about the same and the activated count barely moves (top_k is unchanged).
    """
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    baseline, engram = iso_parameter_pair(config)
    top_k = baseline.moe.top_k
    inactive = baseline.moe.num_routed_experts - top_k  # the sparse budget, in experts
    experts = top_k + max(1, round(rho * inactive))
    if experts >= baseline.moe.num_routed_experts:
        return baseline
    budget = (baseline.moe.num_routed_experts - experts) * _per_expert(config)  # parameters the tables may take
    spec = engram.engram
    budget -= count_parameters(engram)["engram_layers"]
    heads = len(spec.layer_ids) * (spec.max_ngram_size - 1) * spec.n_head_per_ngram
    rows_per_head = budget // (heads * spec.head_dim)
    if rows_per_head < 16:
        raise ValueError(f"rho {rho} leaves {budget:,} parameters for Engram tables: too few for {heads} heads")
    spec = dataclasses.replace(spec, engram_vocab_size=(int(rows_per_head),) * (spec.max_ngram_size - 1))
    return dataclasses.replace(engram, engram=spec,
                               moe=dataclasses.replace(engram.moe, num_routed_experts=experts))


def model_config_for(preset: str, vocab_size: int, pad_id: int, architecture: str = "engram",
                     rho: float | None = None) -> ModelConfig:
    """A preset's config as trained: architecture "engram" (the preset) or "moe" (its iso-parameter MoE baseline),
    or, with rho, the allocation between experts and Engram rows (allocation())."""
    config = build_preset(preset, vocab_size, pad_id)
    if rho is not None:
        if architecture != "engram":
            raise ValueError("rho sets the allocation of an Engram model; the MoE baseline is rho = 1")
        return allocation(config, rho)
    if architecture == "moe":
        return iso_parameter_pair(config)[0]
    if architecture != "engram":
        raise ValueError(f"unknown architecture {architecture!r}: engram or moe")
    return config
