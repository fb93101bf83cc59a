"""Model FLOPs per token, checked against hand counts written out term by term."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from moelab.config import ModelConfig, MoEConfig
from moelab.flops import active_matmul_params, flops_per_token

SEQ = 2048
VOCAB = 50304  # already a multiple of 128

SEED_600M_DENSE = ModelConfig(
    name="seed_600m_dense", ffn="dense", d_model=2048, n_layers=8, n_heads=8, n_kv_heads=2,
    mlp_ratio=8, vocab_size=VOCAB,
)  # fmt: skip
SEED_600M_MOE = ModelConfig(
    name="seed_600m_moe", ffn="moe", d_model=1024, n_layers=6, n_heads=8, n_kv_heads=2,
    mlp_ratio=8, vocab_size=VOCAB, moe=MoEConfig(num_experts=6, top_k=2, expert_mlp_ratio=8),
)  # fmt: skip


def test_seed_600m_dense_hand_count() -> None:
    d, layers, heads, head_dim, kv_dim = 2048, 8, 8, 256, 2 * 256
    q = 2 * d * d
    k = 2 * d * kv_dim
    v = 2 * d * kv_dim
    o = 2 * d * d
    qk_t = 2 * SEQ * heads * head_dim
    av = 2 * SEQ * heads * head_dim
    gate_up = 2 * d * 16384
    down = 2 * 8192 * d
    lm_head = 2 * d * VOCAB
    forward = layers * (q + k + v + o + qk_t + av + gate_up + down) + lm_head
    assert forward == 1_313_341_440

    flops = flops_per_token(SEED_600M_DENSE, SEQ)
    assert flops.forward == forward
    assert flops.training == 3 * forward
    assert flops.parts["attention_proj"] == layers * (q + k + v + o)
    assert flops.parts["attention_seq"] == layers * (qk_t + av)
    assert flops.parts["dense_ffn"] == layers * (gate_up + down)
    assert flops.parts["lm_head"] == lm_head
    assert sum(flops.parts.values()) == flops.forward


def test_seed_600m_moe_hand_count() -> None:
    d, layers, heads, head_dim, kv_dim = 1024, 6, 8, 128, 2 * 128
    q = 2 * d * d
    k = 2 * d * kv_dim
    v = 2 * d * kv_dim
    o = 2 * d * d
    qk_t = 2 * SEQ * heads * head_dim
    av = 2 * SEQ * heads * head_dim
    router = 2 * d * 6
    one_expert = 2 * d * 8192 + 2 * 4096 * d
    experts = 2 * one_expert  # top-2 of 6
    lm_head = 2 * d * VOCAB
    forward = layers * (q + k + v + o + qk_t + av + router + experts) + lm_head
    assert forward == 486_875_136

    flops = flops_per_token(SEED_600M_MOE, SEQ)
    assert flops.forward == forward
    assert flops.training == 1_460_625_408
    assert flops.parts["experts"] == layers * experts
    assert flops.parts["router"] == layers * router
    assert "dense_ffn" not in flops.parts


def test_arctic_adds_dense_mlp_to_experts() -> None:
    hybrid = dataclasses.replace(SEED_600M_MOE, ffn="arctic")
    extra = flops_per_token(hybrid, SEQ).forward - flops_per_token(SEED_600M_MOE, SEQ).forward
    assert extra == 6 * (2 * 1024 * 8192 + 2 * 4096 * 1024)


def test_pr_moe_adds_residual_mlp_and_coefficient() -> None:
    pr = dataclasses.replace(SEED_600M_MOE, ffn="pr_moe")
    flops = flops_per_token(pr, SEQ)
    extra = flops.forward - flops_per_token(SEED_600M_MOE, SEQ).forward
    assert extra == 6 * ((2 * 1024 * 8192 + 2 * 4096 * 1024) + 2 * 1024 * 2)
    assert flops.parts["pr_coefficient"] == 6 * 2 * 1024 * 2


def test_moe_layer_frequency_makes_other_layers_dense() -> None:
    every_other = dataclasses.replace(
        SEED_600M_MOE, moe=dataclasses.replace(SEED_600M_MOE.moe, moe_layer_frequency=2)
    )
    flops = flops_per_token(every_other, SEQ)
    one_swiglu = 2 * 1024 * 8192 + 2 * 4096 * 1024  # dense MLP = one expert here
    assert flops.parts["experts"] == 3 * 2 * one_swiglu
    assert flops.parts["dense_ffn"] == 3 * one_swiglu
    assert flops.parts["router"] == 3 * 2 * 1024 * 6


def test_top1_runs_one_expert() -> None:
    top1 = dataclasses.replace(SEED_600M_MOE, moe=dataclasses.replace(SEED_600M_MOE.moe, top_k=1))
    assert flops_per_token(top1, SEQ).parts["experts"] == 6 * (2 * 1024 * 8192 + 2 * 4096 * 1024)


def test_sequence_term_scales_with_seq_len() -> None:
    short, long = flops_per_token(SEED_600M_DENSE, 1024), flops_per_token(SEED_600M_DENSE, 2048)
    assert long.forward - short.forward == 8 * 2 * 2 * 1024 * 8 * 256


def test_active_matmul_params_seed_moe() -> None:
    params = active_matmul_params(SEED_600M_MOE)
    # Tied embedding, no norm parameters: the active parameter count of the seed report.
    assert sum(params.values()) == 218_271_744
    assert params["lm_head"] == 1024 * VOCAB


def test_vocab_is_padded_for_the_lm_head() -> None:
    cfg = dataclasses.replace(SEED_600M_DENSE, vocab_size=50257)
    assert flops_per_token(cfg, SEQ).parts["lm_head"] == 2 * 2048 * 50304


def test_flops_module_imports_without_torch() -> None:
    code = "import sys, moelab.flops; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
