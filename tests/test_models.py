"""Model architectures: parameter counts, variants, expert init, gating, tying, save/load."""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import moe_gates
from moelab.config import FFN_KINDS, ModelConfig, MoEConfig
from moelab.ds_moe import MoEFFN, iter_moe_layers
from moelab.flops import active_matmul_params
from moelab.models import MoelabForCausalLM, MoelabLMConfig, build_model
from moelab.models.blocks import BLOCK_BUILDERS, ArcticBlock, DenseBlock, MoEBlock
from moelab.models.sizing import count_params

CONF_DIR = Path(__file__).resolve().parent.parent / "hydra_conf"
TINY_VARIANTS = ["tiny_dense", "tiny_moe_top1", "tiny_moe_top2", "tiny_arctic", "tiny_pr_moe"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def compose_model(name: str) -> ModelConfig:
    """A model preset with its `defaults:` inheritance resolved by Hydra, typed by the schema."""
    return copy.deepcopy(_compose_model(name))


@functools.cache
def _compose_model(name: str) -> ModelConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose(overrides=[f"+model={name}"]).model
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ModelConfig)
    return cfg


def with_moe(cfg: ModelConfig, **moe: object) -> ModelConfig:
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe))


def tokens(cfg: ModelConfig, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)


def expert_weights(model: MoelabForCausalLM, layer: int) -> list[torch.Tensor]:
    ffn = next(m for m in model.modules() if isinstance(m, MoEFFN) and m.layer_idx == layer)
    return [torch.cat([p.flatten() for p in e.parameters()]) for e in ffn.local_experts]


# --- parameter counts -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "total", "active"),
    [
        ("seed_600m_dense", 589_561_856, 589_561_856),
        ("seed_600m_moe", 520_261_632, 218_271_744),
        ("seed_600m_hybrid", 595_759_104, 293_769_216),
    ],
)
def test_seed_report_param_counts(preset: str, total: int, active: int) -> None:
    count = count_params(compose_model(preset))
    assert count.total == total
    assert count.active == active
    assert count.lm_head == 0  # tied
    assert count.norms == 0  # parameter-free LayerNorm
    parts = count.as_dict()
    assert sum(v for k, v in parts.items() if k not in ("total", "active")) == total


def test_seed_moe_breakdown() -> None:
    count = count_params(compose_model("seed_600m_moe"))
    expert = 1024 * 8192 + 4096 * 1024
    assert count.experts == 6 * 6 * expert
    assert count.router == 6 * 1024 * 6
    assert count.attention == 6 * (2 * 1024 * 1024 + 2 * 1024 * 256)
    assert count.embedding == 50304 * 1024
    assert count.dense_ffn == 0


def test_hybrid_adds_one_expert_sized_dense_mlp_per_layer() -> None:
    moe = count_params(compose_model("seed_600m_moe"))
    hybrid = count_params(compose_model("seed_600m_hybrid"))
    assert hybrid.dense_ffn == 6 * (1024 * 8192 + 4096 * 1024)
    assert hybrid.total - moe.total == hybrid.dense_ffn


def test_arctic_480b_sizing_on_the_meta_device() -> None:
    cfg = compose_model("arctic_480b")
    count = count_params(cfg)  # the time it takes is benchmarked by moelab-plan, not here
    assert abs(count.total - 480e9) / 480e9 < 0.02
    assert 14e9 < count.active < 18e9
    assert count.lm_head == count.embedding == 32000 * 7168  # untied
    assert count.norms == (3 * 35 + 1) * 7168  # affine RMSNorm: weight only
    expert = 3 * 7168 * 4864
    assert count.experts == 35 * 128 * expert
    assert count.total - count.active == 35 * 126 * expert


def test_active_params_match_flops_active_matmul_params() -> None:
    cfg = compose_model("seed_600m_moe")
    # Tied, parameter-free norms: the LM head is the embedding, so both conventions agree.
    assert sum(active_matmul_params(cfg).values()) == count_params(cfg).active


def test_pr_moe_counts_its_coefficient_as_other() -> None:
    cfg = compose_model("tiny_pr_moe")
    count = count_params(cfg)
    assert count.other == cfg.n_layers * (cfg.d_model * 2 + 2)  # DeepSpeed's Linear(d, 2)
    assert count.dense_ffn == cfg.n_layers * 3 * cfg.d_model * cfg.expert_hidden


# --- layers and blocks ------------------------------------------------------------------


def test_registry_covers_every_ffn_kind() -> None:
    assert set(BLOCK_BUILDERS) == set(FFN_KINDS)


def test_swiglu_shapes_follow_olmo_convention() -> None:
    cfg = dataclasses.replace(compose_model("tiny_dense"), d_model=1024, n_heads=8, n_layers=1)
    with torch.device("meta"):
        block = build_model(cfg).model.layers[0]
    assert block.mlp.gate_up_proj.weight.shape == (8192, 1024)
    assert block.mlp.down_proj.weight.shape == (1024, 4096)
    assert block.attn.k_proj.weight.shape == (2 * 128, 1024)  # n_kv_heads 2, head_dim 128
    assert all(getattr(m, "bias", None) is None for m in block.modules())


@pytest.mark.parametrize(("norm", "affine", "n_params"), [
    ("layernorm", False, 0), ("rmsnorm", False, 0), ("layernorm", True, 128), ("rmsnorm", True, 128)
])  # fmt: skip
def test_norm_parameters(norm: str, affine: bool, n_params: int) -> None:
    cfg = dataclasses.replace(compose_model("tiny_dense"), norm=norm, norm_affine=affine)
    block = build_model(cfg).model.layers[0]
    assert sum(p.numel() for p in block.attn_norm.parameters()) == n_params


def test_moe_layer_frequency_places_moe_blocks() -> None:
    cfg = with_moe(compose_model("tiny_moe_top2"), moe_layer_frequency=2)
    model = build_model(cfg)
    kinds = [type(block) for block in model.model.layers]
    assert kinds == [DenseBlock, MoEBlock, DenseBlock, MoEBlock]
    assert [i for i, _ in iter_moe_layers(model)] == [1, 3]
    assert sorted(moe_gates(model)) == [1, 3]


def test_arctic_block_formula() -> None:
    model = build_model(compose_model("tiny_arctic")).eval()
    block = model.model.layers[0]
    assert isinstance(block, ArcticBlock)
    x = torch.randn(2, 16, 128)
    with torch.no_grad():
        out = block(x)
        h = x + block.attn(block.attn_norm(x))
        moe = block.moe(block.moe_norm(x))
        expected = h + block.mlp(block.mlp_norm(h)) + moe.out
    torch.testing.assert_close(out.hidden, expected)
    assert out.l_aux.item() > 0 and out.z_loss.item() > 0
    torch.testing.assert_close(out.z_loss, moe.z_loss)


# --- forward / backward of every variant --------------------------------------------------


def _variant(name: str) -> ModelConfig:
    if name == "tiny_moe_top2_freq2":
        return with_moe(compose_model("tiny_moe_top2"), moe_layer_frequency=2)
    return compose_model(name)


@pytest.mark.parametrize("name", [*TINY_VARIANTS, "tiny_moe_top2_freq2"])
def test_forward_backward(name: str) -> None:
    cfg = _variant(name)
    model = build_model(cfg, seed=1)
    ids = tokens(cfg)
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 32, cfg.padded_vocab_size)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.lm_loss + cfg.moe.aux_loss_coeff * out.aux_loss)
    out.loss.backward()
    n_moe = len(cfg.moe_layer_indices())
    assert len(out.exp_counts) == n_moe
    if n_moe == 0:
        assert out.aux_loss.item() == 0
        return
    assert out.aux_loss.item() > 0
    assert all(int(c.sum()) == 2 * 32 * cfg.moe.top_k for c in out.exp_counts)
    for _, moe in iter_moe_layers(model):
        assert moe.deepspeed_moe.gate.wg.weight.grad.abs().sum() > 0
        for expert in moe.deepspeed_moe.experts.deepspeed_experts:
            assert all(
                p.grad is not None and torch.isfinite(p.grad).all() for p in expert.parameters()
            )
        expert_grad = sum(p.grad.abs().sum() for p in moe.deepspeed_moe.experts.parameters())
        assert expert_grad > 0


def test_labels_are_shifted_inside() -> None:
    cfg = compose_model("tiny_dense")
    model = build_model(cfg)
    ids = tokens(cfg)
    out = model(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.lm_loss, manual)
    assert model(ids).loss is None


def test_sequence_longer_than_max_seq_len_is_rejected() -> None:
    cfg = dataclasses.replace(compose_model("tiny_dense"), max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        build_model(cfg)(tokens(cfg, seq=17))


# --- expert initialisation -----------------------------------------------------------------


def test_experts_start_independent() -> None:
    model = build_model(compose_model("tiny_moe_top2"))
    weights = expert_weights(model, 0)
    assert len(weights) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(weights[i], weights[j])
    assert not torch.equal(weights[0], expert_weights(model, 1)[0])  # layers differ too
    assert abs(weights[0].std().item() - 0.02) < 0.002  # init_std


def test_expert_init_does_not_depend_on_ep_size() -> None:
    cfg = compose_model("tiny_moe_top2")
    full = build_model(cfg, ep_size=1, seed=7)
    half = build_model(cfg, ep_size=2, ep_rank=1, seed=7)
    for layer in range(cfg.n_layers):
        full_experts, local = expert_weights(full, layer), expert_weights(half, layer)
        assert len(local) == 2
        torch.testing.assert_close(local[0], full_experts[2], rtol=0, atol=0)
        torch.testing.assert_close(local[1], full_experts[3], rtol=0, atol=0)  # global id 3
    full_dense = {n: p for n, p in full.named_parameters() if "deepspeed_experts" not in n}
    half_dense = {n: p for n, p in half.named_parameters() if "deepspeed_experts" not in n}
    assert full_dense.keys() == half_dense.keys()
    for name, p in full_dense.items():
        torch.testing.assert_close(half_dense[name], p, rtol=0, atol=0)


def test_seed_changes_weights() -> None:
    cfg = compose_model("tiny_moe_top1")
    a, b = build_model(cfg, seed=0), build_model(cfg, seed=1)
    assert not torch.equal(expert_weights(a, 0)[0], expert_weights(b, 0)[0])
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)


# --- gating ---------------------------------------------------------------------------------


def test_top2_sampling_only_in_training() -> None:
    cfg = with_moe(compose_model("tiny_moe_top2"), top2_2nd_expert_sampling=True)
    model = build_model(cfg)
    gates = moe_gates(model).values()
    assert all(g.top2_2nd_expert_sampling for g in gates)
    model.eval()
    assert not any(g.top2_2nd_expert_sampling for g in gates)
    ids = tokens(cfg, batch=4, seq=64)
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    model.train()
    assert all(g.top2_2nd_expert_sampling for g in gates)


def test_top2_sampling_off_by_config_stays_off() -> None:
    cfg = with_moe(compose_model("tiny_moe_top2"), top2_2nd_expert_sampling=False)
    model = build_model(cfg).train()
    assert not any(g.top2_2nd_expert_sampling for g in moe_gates(model).values())


def test_top1_random_token_selection_only_in_training() -> None:
    cfg = with_moe(compose_model("tiny_moe_top1"), eval_capacity_factor=0.5)
    model = build_model(cfg).eval()
    assert not any(g.use_rts for g in moe_gates(model).values())
    ids = tokens(cfg, batch=4, seq=64)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    model.train()
    assert all(g.use_rts for g in moe_gates(model).values())


# --- tying and save/load --------------------------------------------------------------------


def test_lm_head_tied_to_embedding() -> None:
    model = build_model(compose_model("tiny_dense"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = build_model(dataclasses.replace(compose_model("tiny_dense"), tie_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe_top2"])
def test_save_pretrained_round_trip(name: str, tmp_path: Path) -> None:
    cfg = compose_model(name)
    model = build_model(cfg, seed=3).eval()
    model.save_pretrained(tmp_path)
    loaded = MoelabForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.config, MoelabLMConfig)
    assert loaded.config.to_model_config() == cfg
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_config_round_trip() -> None:
    cfg = with_moe(compose_model("tiny_moe_top1"), noisy_gate_policy="RSample", top_k=1)
    hf = MoelabLMConfig.from_model_config(cfg, ep_size=2)
    assert hf.ep_size == 2 and hf.moe_noisy_gate_policy == "RSample"
    assert hf.tie_word_embeddings is cfg.tie_embeddings
    assert hf.to_model_config() == cfg


def test_unknown_ffn_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown ffn"):
        build_model(dataclasses.replace(compose_model("tiny_dense"), ffn="mixtral"))


def test_moe_config_defaults_build() -> None:
    cfg = ModelConfig(ffn="moe", n_layers=1, vocab_size=256, moe=MoEConfig(num_experts=2, top_k=1))
    assert len(list(iter_moe_layers(build_model(cfg)))) == 1


def test_chunked_loss_equals_cross_entropy_in_value_and_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loss is PyTorch's shifted fp32 cross-entropy, -100 ignored: for fp32 logits, and
    for bf16 logits upcast chunk by chunk, whether they fit one chunk or span several."""
    import torch.nn.functional as F

    from moelab.models import modeling

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (3, 9), generator=gen)
    labels[1, 4] = modeling.IGNORE_INDEX
    for dtype, chunk in [(torch.float32, 2**24), (torch.bfloat16, 2**24), (torch.bfloat16, 64)]:
        monkeypatch.setattr(modeling, "LOSS_CHUNK_ELEMENTS", chunk)
        base = torch.randn(3, 9, 50, generator=gen).to(dtype)
        mine, ref = base.clone().requires_grad_(), base.clone().requires_grad_()
        loss = modeling.shifted_cross_entropy(mine, labels)
        expected = F.cross_entropy(
            ref[:, :-1].reshape(-1, 50).float(), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        loss.backward()
        expected.backward()
        assert torch.allclose(loss, expected, atol=1e-6), (dtype, chunk)
        assert mine.grad is not None and ref.grad is not None
        assert torch.allclose(mine.grad.float(), ref.grad.float(), atol=1e-6), (dtype, chunk)
