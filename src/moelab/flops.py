"""Model FLOPs per token, counting only what runs (pure arithmetic: no torch import).

A matmul with an `n x m` weight costs `2*n*m` FLOPs per token forward; training is forward
plus backward = 3x forward. The attention sequence term (QK^T and AV) is
`2 * 2 * seq_len * n_heads * head_dim` per token forward: the non-causal count, as in
PaLM's and Megatron's MFU formulas (causal masking would halve it; MFU conventions do not).
Embedding lookups, norms, softmax and activations are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moelab.config import ModelConfig

TRAIN_MULTIPLIER = 3


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs per token: forward, training (3x forward), and forward by part (all layers)."""

    forward: int
    training: int
    parts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_parts(cls, parts: dict[str, int]) -> FlopsBreakdown:
        forward = sum(parts.values())
        return cls(forward=forward, training=TRAIN_MULTIPLIER * forward, parts=parts)


def _attention_proj_params(cfg: ModelConfig) -> int:
    q_and_o = 2 * cfg.d_model * cfg.n_heads * cfg.head_dim
    k_and_v = 2 * cfg.d_model * cfg.kv_heads * cfg.head_dim
    return q_and_o + k_and_v


def _swiglu_params(d_model: int, hidden: int) -> int:
    return d_model * 2 * hidden + hidden * d_model


def _layer_matmul_params(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
    """Matmul weights one token goes through in block `layer_idx`, by part."""
    d, moe = cfg.d_model, cfg.moe
    parts = {"attention_proj": _attention_proj_params(cfg)}
    if not cfg.is_moe_layer(layer_idx):
        parts["dense_ffn"] = _swiglu_params(d, cfg.mlp_hidden)
        return parts
    parts["experts"] = moe.active_experts * _swiglu_params(d, cfg.expert_hidden)
    parts["router"] = d * moe.total_experts
    if cfg.ffn == "arctic":
        parts["dense_ffn"] = _swiglu_params(d, cfg.mlp_hidden)
    if cfg.ffn == "pr_moe":
        parts["dense_ffn"] = _swiglu_params(d, cfg.expert_hidden)
        parts["pr_coefficient"] = d * 2
    return parts


def active_matmul_params(cfg: ModelConfig) -> dict[str, int]:
    """Weights of the matmuls one token runs through (top_k experts, LM head), by part."""
    totals: dict[str, int] = {}
    for i in range(cfg.n_layers):
        for part, n in _layer_matmul_params(cfg, i).items():
            totals[part] = totals.get(part, 0) + n
    totals["lm_head"] = cfg.d_model * cfg.padded_vocab_size
    return totals


def flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopsBreakdown:
    """Forward and training FLOPs per token at sequence length `seq_len`."""
    parts = {part: 2 * n for part, n in active_matmul_params(cfg).items()}
    parts["attention_seq"] = cfg.n_layers * 2 * 2 * seq_len * cfg.n_heads * cfg.head_dim
    return FlopsBreakdown.from_parts(parts)
