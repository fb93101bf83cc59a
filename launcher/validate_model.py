"""Model and parallelism rules: shapes, experts, ZeRO and expert parallelism. Torch-free."""

from __future__ import annotations

from launcher.rules import at_least, one_of, positive, require
from moelab.config import (
    FFN_KINDS,
    MOE_BALANCES,
    MOE_IMPLS,
    NOISY_GATE_POLICIES,
    NORM_KINDS,
    ModelConfig,
    MoelabConfig,
)
from moelab.dscompat import supported_deepspeed


def validate_model(m: ModelConfig) -> None:
    one_of("model.ffn", m.ffn, FFN_KINDS)
    one_of("model.norm", m.norm, NORM_KINDS)
    for key in ("d_model", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
        positive(f"model.{key}", getattr(m, key))
    require(
        m.d_model % m.n_heads == 0,
        f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
        "choose heads that divide the hidden size.",
    )
    require(
        m.n_heads % m.kv_heads == 0,
        f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.kv_heads}; "
        "grouped-query attention needs a whole number of query heads per KV head.",
    )
    require(
        m.head_dim % 2 == 0,
        f"model.d_model/model.n_heads={m.head_dim} is odd; RoPE needs an even head size.",
    )
    positive("model.vocab_multiple", m.vocab_multiple)
    positive("model.rope_theta", m.rope_theta)
    positive("model.init_std", m.init_std)
    positive("model.mlp_ratio", m.mlp_ratio)
    if m.n_kv_heads is not None:
        positive("model.n_kv_heads", m.n_kv_heads)
    if m.mlp_hidden_size is not None:
        positive("model.mlp_hidden_size", m.mlp_hidden_size)
    require(m.mlp_hidden > 0, "model.mlp_ratio gives an empty MLP; raise it.")
    if m.is_moe:
        validate_moe(m)


def validate_moe(m: ModelConfig) -> None:
    e = m.moe
    require(e.num_experts >= 1, f"model.moe.num_experts={e.num_experts} must be at least 1.")
    one_of("model.moe.top_k", e.top_k, (1, 2))
    require(
        e.top_k <= e.num_experts,
        f"model.moe.top_k={e.top_k} exceeds model.moe.num_experts={e.num_experts}; "
        "route to at most as many experts as there are.",
    )
    if e.noisy_gate_policy is not None:
        one_of("model.moe.noisy_gate_policy", e.noisy_gate_policy, NOISY_GATE_POLICIES)
    positive("model.moe.capacity_factor", e.capacity_factor)
    positive("model.moe.eval_capacity_factor", e.eval_capacity_factor)
    require(e.aux_loss_coeff >= 0, "model.moe.aux_loss_coeff must be 0 or more.")
    at_least("model.moe.min_capacity", e.min_capacity, 0)
    positive("model.moe.expert_mlp_ratio", e.expert_mlp_ratio)
    if e.expert_hidden_size is not None:
        positive("model.moe.expert_hidden_size", e.expert_hidden_size)
    require(
        1 <= e.moe_layer_frequency <= m.n_layers,
        f"model.moe.moe_layer_frequency={e.moe_layer_frequency} must be between 1 and "
        f"model.n_layers={m.n_layers}.",
    )
    require(m.expert_hidden > 0, "model.moe.expert_mlp_ratio gives empty experts; raise it.")
    require(e.z_loss_coeff >= 0, f"model.moe.z_loss_coeff={e.z_loss_coeff} must be 0 or more.")
    validate_granularity(m)
    validate_impl(m)


def validate_impl(m: ModelConfig) -> None:
    """`model.moe.impl` and `model.moe.balance`: what AutoEP can and cannot run."""
    e = m.moe
    one_of("model.moe.impl", e.impl, MOE_IMPLS)
    one_of("model.moe.balance", e.balance, MOE_BALANCES)
    require(
        e.balance != "bias",
        "model.moe.balance=bias needs AutoEP's expert bias, which DeepSpeed "
        f"{supported_deepspeed()} refuses (load_balance_coeff); use balance=aux or none.",
    )
    if e.impl != "autoep":
        return
    require(
        m.ffn != "pr_moe",
        "model.ffn=pr_moe runs on the classic MoE layer only (AutoEP has no residual expert "
        "mix); use model.moe.impl=classic, or model.ffn=moe or arctic.",
    )
    require(
        e.noisy_gate_policy is None,
        f"model.moe.noisy_gate_policy={e.noisy_gate_policy} is not available with "
        "model.moe.impl=autoep (its router adds no noise); set it to null or use impl=classic.",
    )


def validate_granularity(m: ModelConfig) -> None:
    e = m.moe
    g, base = e.granularity, m.base_expert_hidden
    at_least("model.moe.granularity", g, 1)
    at_least("model.moe.granularity_round", e.granularity_round, 0)
    require(
        g == 1 or m.ffn != "pr_moe",
        f"model.moe.granularity={g} does not work with model.ffn=pr_moe (DeepSpeed's residual "
        "MLP is a copy of one expert and would shrink too); use model.ffn=moe or arctic.",
    )
    require(
        base % g == 0 or e.granularity_round > 0,
        f"model.moe.granularity={g} does not divide the expert hidden size {base}; set "
        f"model.moe.granularity_round=128 (or another multiple) to round {base / g:.1f}, or "
        "pick a granularity that divides it.",
    )


def validate_parallel(cfg: MoelabConfig) -> None:
    m, ep, world = cfg.model, cfg.parallel.ep_size, cfg.world_size
    require(ep >= 1, f"parallel.ep_size={ep} must be at least 1.")
    one_of("zero.stage", cfg.zero.stage, (0, 1, 2, 3))
    one_of("zero.offload_optimizer", cfg.zero.offload_optimizer, ("none", "cpu"))
    positive("zero.reduce_bucket_size", cfg.zero.reduce_bucket_size)
    if not m.is_moe:
        return
    require(
        cfg.zero.stage != 3 or m.moe.impl == "autoep",
        f"zero=stage3 does not work with model.ffn={m.ffn} on the classic MoE layer "
        "(deepspeed.moe supports ZeRO stages 0-2); use zero=stage2 or model.moe.impl=autoep.",
    )
    g, total = m.moe.granularity, m.moe.total_experts
    split = f" x model.moe.granularity={g} = {total}" if g > 1 else ""
    require(
        total % ep == 0,
        f"parallel.ep_size={ep} does not divide model.moe.num_experts={m.moe.num_experts}{split}; "
        "pick an ep_size that divides the expert count.",
    )
    require(
        world % ep == 0,
        f"parallel.ep_size={ep} does not divide the world size {world} "
        f"(cluster.nodes x cluster.nproc_per_node); pick an ep_size that divides it.",
    )
