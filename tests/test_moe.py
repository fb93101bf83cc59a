"""MoE adapter knobs: fine-grained experts (granularity) and the router z-loss."""

from __future__ import annotations

import dataclasses
import math
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from launcher.compose import compose_config, to_schema
from launcher.errors import ConfigError
from launcher.plan import build_plan, format_text
from launcher.validate import validate
from moelab.config import ModelConfig, MoEConfig
from moelab.ds_moe import MoEFFN, RouterGate, moe_ffns
from moelab.models import build_model
from moelab.models.layers import SwiGLU
from moelab.models.moe_torch import MoEOutput, router_z_loss
from moelab.models.sizing import count_params

ROUTER_PER_G = 6 * 1024 * 6  # MoE layers x d_model x num_experts of seed_600m_moe


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def seed_moe(*overrides: str) -> ModelConfig:
    return to_schema(compose_config(["model=seed_600m_moe", *overrides])).model


def tiny(**moe: object) -> ModelConfig:
    base = MoEConfig(num_experts=4, top_k=2, expert_mlp_ratio=4, min_capacity=0)
    return ModelConfig(
        ffn="moe", d_model=32, n_layers=2, n_heads=2, vocab_size=128, max_seq_len=64,
        moe=dataclasses.replace(base, **moe),
    )  # fmt: skip


def test_granularity_keeps_expert_params_and_grows_only_the_router() -> None:
    base = count_params(seed_moe())
    assert (base.total, base.active) == (520_261_632, 218_271_744)
    for g in (2, 4):
        count = count_params(seed_moe(f"model.moe.granularity={g}"))
        assert count.total - base.total == ROUTER_PER_G * (g - 1) == 36_864 * (g - 1)
        assert count.active - base.active == 36_864 * (g - 1)
        assert count.experts == base.experts and count.router == 36_864 * g
    cfg = seed_moe("model.moe.granularity=4")
    assert (cfg.moe.total_experts, cfg.moe.active_experts, cfg.expert_hidden) == (24, 8, 1024)


def test_granularity_not_dividing_needs_rounding() -> None:
    cfg = to_schema(compose_config(["model=seed_600m_moe", "model.moe.granularity=3"]))
    with pytest.raises(ConfigError, match=r"granularity=3 does not divide the expert hidden size"):
        validate(cfg, planning=True)
    rounded = ["model=seed_600m_moe", "model.moe.granularity=3", "model.moe.granularity_round=128"]
    cfg = to_schema(compose_config(rounded))
    validate(cfg, planning=True)
    plan = build_plan(cfg)
    split = plan["granularity"]
    assert split["expert_hidden"] == [4096, 1408] and split["rounded"]  # 1365.3 -> 11 x 128
    # 6 layers x SwiGLU (3 x d x hidden): 18 experts of 1408 vs 6 of 4096; active 6 vs 2
    assert split["rounding_delta_total"] == 6 * 3 * 1024 * (18 * 1408 - 6 * 4096) == 14_155_776
    assert split["rounding_delta_active"] == 6 * 3 * 1024 * (6 * 1408 - 2 * 4096)
    assert split["delta_total"] == 14_155_776 + 2 * 36_864
    assert plan["params_total"] == 520_261_632 + split["delta_total"]
    assert "expert hidden 4096 -> 1408 (rounded)" in format_text(plan)
    assert "+14,155,776 total" in format_text(plan)


def test_ep_size_must_divide_the_split_expert_count() -> None:
    over = ["model=tiny_moe_top2", "model.moe.granularity=3", "model.moe.granularity_round=16"]
    over.append("parallel.ep_size=8")
    cfg = to_schema(compose_config([*over, "cluster.nproc_per_node=8"]))
    with pytest.raises(ConfigError, match=r"num_experts=4 x model.moe.granularity=3 = 12; pick"):
        validate(cfg)
    ok = to_schema(compose_config(["model=tiny_moe_top2", "model.moe.granularity=2", "parallel=ep8",
                                   "cluster.nproc_per_node=8"]))  # fmt: skip
    validate(ok)  # 8 experts x 2 = 16 is divisible by 8 (4 alone is not)


def test_fine_grained_layer_routes_k_times_g_with_topkgating() -> None:
    cfg = tiny(granularity=2)
    model = build_model(cfg, seed=0)
    ffn = next(moe_ffns(model))
    assert ffn.gate.k == 4 and ffn.layer.num_local_experts == 8
    assert ffn.local_experts[0].down_proj.in_features == cfg.base_expert_hidden // 2
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    out.loss.backward()
    # topkgating counts every route before capacity: tokens x k x G
    assert all(int(c.sum()) == 2 * 16 * 4 for c in out.exp_counts)
    assert (
        ffn.gate.wg.weight.grad is not None
        and ffn.local_experts[7].down_proj.weight.grad.abs().sum() > 0
    )


def test_router_z_loss_matches_hand_computation() -> None:
    moe = MoEConfig(num_experts=3, top_k=1, use_rts=False, min_capacity=0)
    ffn = MoEFFN(4, SwiGLU(4, 8), moe, layer_idx=0)
    assert isinstance(ffn.gate, RouterGate)
    with torch.no_grad():
        ffn.gate.wg.weight.copy_(torch.eye(3, 4))  # logits = x[:, :3]
    x = torch.tensor([[0.0, 0.0, 0.0, 7.0], [0.0, math.log(2), math.log(5), -1.0]])
    ffn.eval()
    out = ffn(x.view(1, 2, 4))
    assert isinstance(out, MoEOutput) and out.out.shape == (1, 2, 4)
    # logsumexp: ln(1+1+1) = ln 3 and ln(1+2+5) = ln 8
    hand = (math.log(3) ** 2 + math.log(8) ** 2) / 2
    assert float(out.z_loss.detach()) == pytest.approx(hand, rel=1e-6)
    assert not hasattr(ffn.gate, "z_loss")  # the z-loss leaves through the outputs only
    assert float(router_z_loss(torch.tensor([[0.0, 0.0, 0.0]]))) == pytest.approx(math.log(3) ** 2)


def test_z_loss_enters_the_loss_with_its_coefficient() -> None:
    model = build_model(tiny(z_loss_coeff=0.5, aux_loss_coeff=0.01), seed=0)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids)
    assert float(out.z_loss.detach()) > 0
    assert float(out.loss) == pytest.approx(
        float(out.lm_loss) + 0.01 * float(out.aux_loss) + 0.5 * float(out.z_loss), rel=1e-6
    )


@pytest.mark.parametrize("train", [True, False])
def test_model_z_loss_sums_the_z_loss_of_every_gates_logits(train: bool) -> None:
    model = build_model(tiny(z_loss_coeff=0.5, num_experts=8, top_k=1), seed=0).train(train)
    logits: list[torch.Tensor] = []

    def keep_logits(gate: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        logits.append(torch.nn.functional.linear(args[0].float(), gate.wg.weight.float()))

    for ffn in moe_ffns(model):
        ffn.gate.register_forward_pre_hook(keep_logits)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    out = model(ids, labels=ids)
    assert len(logits) == 2
    expected = torch.stack([router_z_loss(x) for x in logits]).sum()
    assert torch.equal(out.z_loss, expected)


@pytest.mark.parametrize("top_k", [1, 2])
def test_torch_twin_gives_deepspeeds_z_loss_in_eval(top_k: int) -> None:
    cfg = tiny(top_k=top_k, z_loss_coeff=0.5)
    ds = build_model(cfg, seed=3).eval()
    pt = build_model(cfg, seed=4, moe_runtime="torch").eval()
    pt.load_state_dict(ds.state_dict())
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = ds(ids, labels=ids), pt(ids, labels=ids)
    assert float(want.z_loss) > 0
    torch.testing.assert_close(got.z_loss, want.z_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)


def _train_router_scale(z_loss_coeff: float, steps: int = 25) -> tuple[float, float]:
    """(z-loss before, after) `steps` AdamW steps from router weights scaled up 30x."""
    model = build_model(tiny(z_loss_coeff=z_loss_coeff), seed=0)
    with torch.no_grad():
        for ffn in moe_ffns(model):
            ffn.gate.wg.weight.mul_(30.0)  # large logits, as after a long unbalanced run
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(2)
    z = []
    for _ in range(steps):
        ids = torch.randint(0, 128, (4, 32), generator=gen)
        out = model(ids, labels=ids)
        z.append(float(out.z_loss))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return z[0], z[-1]


def test_large_z_loss_coefficient_shrinks_router_logits() -> None:
    start, plain = _train_router_scale(0.0)
    start_z, with_z = _train_router_scale(1.0)
    assert start == pytest.approx(start_z)  # same model, same data
    assert with_z < 0.5 * plain and with_z < 0.5 * start_z, (start, plain, with_z)
