"""The shape formulas of a moelab model and its layout, once each, on plain numbers.

Derived model sizes (padded vocabulary, SwiGLU and expert hidden sizes, attention heads,
which blocks carry an MoE FFN), DeepSpeed's expert capacity, which expert-parallel rank owns
which experts, and the torch threads of a rank. Standard library only: the launcher reads it
on a head node without torch, and an exported model folder carries a copy of this file
(`models/shapes.py` links here, so transformers copies it beside `configuration.py`).
"""

from __future__ import annotations

import math
import struct

LOSS_CHUNK_ELEMENTS = 2**24
"""Logits per chunk of the training loss over bf16/fp16 logits: 64 MiB of fp32 at a time."""

MOE_FFN_KINDS = ("moe", "arctic", "pr_moe")
"""FFN variants whose MoE layers hold experts (every other block is dense)."""


def is_moe_ffn(ffn: str) -> bool:
    """Whether the FFN variant `ffn` has MoE layers."""
    return ffn in MOE_FFN_KINDS


def kv_heads(n_heads: int, n_kv_heads: int | None) -> int:
    """Key/value heads: `n_kv_heads` for grouped-query attention, else one per query head."""
    return n_kv_heads or n_heads


def head_dim(d_model: int, n_heads: int) -> int:
    """Size of one attention head."""
    return d_model // n_heads


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Embedding rows: `vocab_size` rounded up to a multiple of `multiple`."""
    return ((vocab_size + multiple - 1) // multiple) * multiple


def swiglu_hidden(d_model: int, ratio: float, size: int | None) -> int:
    """SwiGLU intermediate size per branch: `size`, else half the fused `ratio * d_model`."""
    return size or int(ratio * d_model) // 2


def split_hidden(base: int, granularity: int, multiple: int) -> int:
    """Expert hidden size after splitting each expert into `granularity` smaller ones.

    `multiple` > 0 rounds `base / granularity` to the nearest multiple of it (at least one
    multiple); 0 divides exactly (the config check requires `granularity` to divide `base`).
    """
    g, m = granularity, multiple
    if g <= 1:
        return base
    if m > 0:
        return max(m, (base + g * m // 2) // (g * m) * m)
    return base // g


def is_moe_layer(layer_idx: int, frequency: int) -> bool:
    """Whether block `layer_idx` (0-based) of an MoE model is an MoE block: every
    `frequency`-th block, counted from 1 (frequency 2: blocks 1, 3, ...)."""
    return (layer_idx + 1) % frequency == 0


def _float32(x: float) -> float:
    return float(struct.unpack("f", struct.pack("f", x))[0])


def expert_capacity(
    tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int
) -> int:
    """Slots per expert of a DeepSpeed gate that drops tokens (`_capacity` of top1/top2/topk
    gating): ceil(tokens / num_experts * capacity_factor * top_k), at least `min_capacity`.

    `num_experts` and `top_k` are the layer's (after granularity). DeepSpeed multiplies in
    float32 (`torch.tensor(capacity_factor * k)`), which rounds differently from float64 on
    some inputs (50 tokens, 1 expert, factor 1.1: 55, not 56); this reproduces it.
    """
    factor = _float32(capacity_factor * top_k)
    slots = _float32(_float32(tokens / num_experts) * factor)
    return max(math.ceil(slots), min_capacity)


def ep_rank(global_rank: int, ep_size: int) -> int:
    """Rank inside its expert-parallel group: DeepSpeed's EP groups are consecutive blocks
    of `ep_size` ranks."""
    return global_rank % ep_size


def experts_of_rank(rank_in_group: int, ep_size: int, num_experts: int) -> range:
    """Global ids of the experts that EP rank `rank_in_group` holds, in local order."""
    local = num_experts // ep_size
    return range(rank_in_group * local, (rank_in_group + 1) * local)


def owner_of_expert(expert: int, ep_size: int, num_experts: int) -> int:
    """The EP rank that holds global expert `expert`."""
    return expert // (num_experts // ep_size)


def threads_per_rank(cores: int | None, local_ranks: int, requested: int = 0) -> int:
    """Torch intra-op threads of one rank: `requested`, else the host's cores shared by its
    `local_ranks` ranks (at least one)."""
    return requested or max(1, (cores or 1) // max(1, local_ranks))


_SEED_MIX = 1_000_003


def expert_seed(seed: int, layer_idx: int, global_expert: int) -> int:
    """Seed of one expert's initial weights: independent of ep_size, the rank and the MoE
    implementation."""
    return ((seed * _SEED_MIX + layer_idx) * _SEED_MIX + global_expert) % (2**63)
