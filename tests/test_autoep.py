"""AutoEP (`model.moe.impl: autoep`) computes what the classic layer computes, and its FFN
adapter counts and times training passes only.

One child process (one gloo rank: `engine.init_distributed(1)`) builds a classic and an
autoep model from the same seed for top-1, top-2 and granularity 2, hands the autoep one to
`engine.initialize` with moelab's ds_config (so each block becomes AutoEP's real layer) and
reports what the tests below check: same initial weights, same outputs for every token the
classic layer does not drop, the pure-torch dropless forward equal to AutoEP's, moelab's
load-balancing loss equal to DeepSpeed's own (no drops, no noise), the router z-loss, and the
adapter's hooks, clock and all-to-all phases.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from helpers import REPO, one_rank_env

CASES = {  # case -> overrides of model=tiny_moe_top2 (4 experts)
    "top1": ["model.moe.top_k=1"],
    "top2": [],
    "granular": ["model.moe.granularity=2"],  # 8 experts of half the size, 4 active
}
TOL = 1e-5


def _config(impl: str, overrides: list[str]) -> Any:
    from launcher.compose import compose_config, to_schema

    return to_schema(
        compose_config([
            "model=tiny_moe_top2", "model.vocab_size=256", "model.n_layers=2",
            "model.moe.eval_capacity_factor=1.0", "cluster.nproc_per_node=1", "zero=stage2",
            "train.micro_batch_size=2", "train.grad_accum=1", f"model.moe.impl={impl}",
            *overrides,
        ])
    )  # fmt: skip


def _same_init(classic: Any, auto: Any) -> dict[str, bool]:
    """Whether the two fresh models hold the same weights (experts mapped to fused rows)."""
    import torch

    from moelab.autoep import fused_rows
    from moelab.moe_impls import all_moe_ffns

    experts, router = True, True
    for fc, fa in zip(all_moe_ffns(classic), all_moe_ffns(auto), strict=True):
        fused = fa.block.experts
        for e, expert in enumerate(fc.local_experts):
            experts &= torch.equal(fused_rows(expert.gate_up_proj.weight), fused.gate_up_proj[e])
            experts &= torch.equal(expert.down_proj.weight, fused.down_proj[e])
        router &= torch.equal(fc.gate.wg.weight, fa.block.gate.weight)
    ours = dict(auto.named_parameters())
    rest = [torch.equal(p, ours[n]) for n, p in classic.named_parameters() if ".moe." not in n]
    return {"experts": experts, "router": router, "rest": bool(rest) and all(rest)}


def _deepspeed_l_aux(logits: Any, k: int) -> float:
    """DeepSpeed's own load-balancing loss: its gating function, nothing dropped, no noise."""
    from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating

    logits = logits.clone()
    if k == 1:
        return float(top1gating(logits, 1.0, 4, None, None, False, False)[0])
    if k == 2:
        return float(top2gating(logits, 1.0, 4, False, None, False)[0])
    return float(topkgating(logits, k, 1.0, 4, False)[0])


def _compare_layer(classic_ffn: Any, auto_ffn: Any, torch_block: Any, x: Any) -> dict[str, Any]:
    """One MoE layer in eval mode, three ways: classic, AutoEP, the pure-torch dropless block."""
    import torch

    from moelab import dscompat

    classic_ffn.eval(), auto_ffn.eval(), torch_block.eval()
    with torch.no_grad():
        c, a, t = classic_ffn(x), auto_ffn(x), torch_block(x)
        tokens = x.reshape(-1, x.shape[-1])
        logits = tokens @ auto_ffn.gate.weight.t()
        gate = classic_ffn.gate  # eval: no noise, no RTS, no 2nd-expert sampling
        routes = dscompat._gating(gate, logits.clone(), None, True, False)[3]  # (k, S), -1 dropped
    kept = (routes >= 0).all(dim=0)
    flat = lambda out: out.out.reshape(-1, x.shape[-1])  # noqa: E731
    return {
        "kept": int(kept.sum()),
        "tokens": int(kept.numel()),
        "scale": float(a.out.abs().max()),
        "classic_diff": float((flat(c) - flat(a))[kept].abs().max()),
        "torch_diff": float((t.out - a.out).abs().max()),
        "l_aux": [float(a.l_aux), float(c.l_aux), float(t.l_aux)],
        "ds_l_aux": _deepspeed_l_aux(logits, auto_ffn.k),
        "z_loss": [float(a.z_loss), float(c.z_loss), float(t.z_loss)],
        "z_loss_formula": float(torch.logsumexp(logits, dim=-1).square().mean()),
        "counts": [a.exp_counts.tolist(), c.exp_counts.tolist(), t.exp_counts.tolist()],
        "counts_int": not (a.exp_counts.is_floating_point() or t.exp_counts.is_floating_point()),
    }


def _run_case(overrides: list[str]) -> tuple[dict[str, Any], Any]:
    """Build, compare at init, replace by AutoEP, compare every layer; (report, autoep model)."""
    import torch

    from moelab import engine
    from moelab.dsconfig import build_ds_config
    from moelab.models import build_model
    from moelab.moe_impls import all_moe_ffns

    cfg_c, cfg_a = _config("classic", overrides), _config("autoep", overrides)
    classic, auto = build_model(cfg_c.model, 1, 0, 0), build_model(cfg_a.model, 1, 0, 0)
    report: dict[str, Any] = {"init": _same_init(classic, auto)}
    torch_blocks = [copy.deepcopy(f.block) for f in all_moe_ffns(auto)]
    engine.initialize(auto, build_ds_config(cfg_a))
    ffns = list(zip(all_moe_ffns(classic), all_moe_ffns(auto), torch_blocks, strict=True))
    report["replaced"] = all(fa.replaced for _, fa, _ in ffns)
    gen = torch.Generator().manual_seed(1)
    layers = []
    for fc, fa, block in ffns:
        x = torch.randn(2, 32, cfg_a.model.d_model, generator=gen)
        layers.append(_compare_layer(fc, fa, block, x))
    report["layers"] = layers
    return report, auto


def _clock_state() -> Any:
    from moelab.moe_clock import MoEClock

    return MoEClock.layer, MoEClock.sent, dict(MoEClock.seconds), len(MoEClock.events)


def _adapter_checks(model: Any) -> dict[str, Any]:
    """The AutoEP FFN's training-only bookkeeping, on a replaced layer."""
    import torch

    from moelab.moe_clock import MoEClock, read_ms
    from moelab.moe_impls import all_moe_ffns

    ffn = next(iter(all_moe_ffns(model)))
    x = torch.randn(2, 32, model.config.d_model, generator=torch.Generator().manual_seed(2))
    out: dict[str, Any] = {}
    ffn.train()
    for name in ("l_aux", "z_loss"):
        ffn.gate.weight.grad = None
        loss = getattr(ffn(x), name)
        if loss.requires_grad:
            loss.backward()
        grad = ffn.gate.weight.grad
        out[f"{name}_grad"] = 0.0 if grad is None else float(grad.norm())
    out["gate_is_router_gate"] = ffn.gate is ffn.block.router.gate
    out["state_keys"] = sorted(k for k in ffn.state_dict() if not k.startswith("block."))
    read_ms()
    MoEClock.active = True
    before = _clock_state()
    ffn.eval()
    ffn(x)
    out["eval_untouched"] = _clock_state() == before
    ffn.train()
    ffn(x)
    out["train_phases"] = sorted(read_ms().get(ffn.layer_idx, {}))
    out["after_error"] = _interrupted_forward(ffn, x)
    out["a2a"] = _timed_all_to_all()
    MoEClock.active = False
    return out


def _interrupted_forward(ffn: Any, x: Any) -> dict[str, Any]:
    """A training forward that the experts interrupt, then one that is not interrupted."""
    from moelab.moe_clock import MoEClock

    def fail(*_: Any) -> None:
        raise RuntimeError("expert failure")

    handle = ffn.block.experts.register_forward_hook(fail)
    try:
        ffn(x)
        raised = False
    except RuntimeError:
        raised = True
    finally:
        handle.remove()
    state = {"raised": raised, "layer": MoEClock.layer, "seen": len(ffn._seen)}
    again = ffn(x)
    return state | {"next_l_aux": again.l_aux.item(), "next_layer": MoEClock.layer}


def _timed_all_to_all() -> dict[str, Any]:
    """Two forward calls and the backward of the timed all-to-all in a training forward of
    block 5 (one rank: nothing goes to other ranks), then one of an empty tensor."""
    import torch

    from moelab.autoep import _TimedAllToAllV
    from moelab.moe_clock import MoEClock, read_ms

    x = torch.randn(6, 4, requires_grad=True)
    sent = MoEClock.sent
    MoEClock.layer, _TimedAllToAllV.calls = 5, 0
    y1 = _TimedAllToAllV.apply(None, x, [6], [6])
    y2 = _TimedAllToAllV.apply(None, y1 * 2, [6], [6])
    empty = _TimedAllToAllV.apply(None, x[:0], [0], [0])
    MoEClock.layer = None
    (y2.sum() + empty.sum()).backward()
    assert x.grad is not None
    return {
        "phases": sorted(read_ms().get(5, {})),
        "sent": MoEClock.sent - sent,
        "values": bool(torch.equal(y2, x * 2)) and bool(torch.equal(x.grad, torch.full_like(x, 2))),
    }


def child() -> None:
    """The one-rank child: prints one JSON report."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    from moelab import engine

    torch.set_num_threads(1)
    engine.init_distributed(1)
    report: dict[str, Any] = {}
    for case, overrides in CASES.items():
        report[case], model = _run_case(overrides)
        if case == "top2":
            report["adapter"] = _adapter_checks(model)
    print("REPORT " + json.dumps(report), flush=True)


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    env = one_rank_env()
    proc = subprocess.run(
        [sys.executable, __file__, "--child"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    out: dict[str, Any] = json.loads(line.removeprefix("REPORT "))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_seed_same_weights_in_both_implementations(report: dict[str, Any], case: str) -> None:
    assert report[case]["init"] == {"experts": True, "router": True, "rest": True}


@pytest.mark.parametrize("case", sorted(CASES))
def test_autoep_layer_equals_classic_on_every_kept_token(report: dict[str, Any], case: str) -> None:
    assert report[case]["replaced"]
    for layer in report[case]["layers"]:
        assert layer["kept"] >= layer["tokens"] // 2 and layer["scale"] > 1e-3, layer
        assert layer["classic_diff"] < TOL, layer


@pytest.mark.parametrize("case", sorted(CASES))
def test_dropless_torch_forward_equals_autoep_layer(report: dict[str, Any], case: str) -> None:
    for layer in report[case]["layers"]:
        assert layer["torch_diff"] < TOL, layer


@pytest.mark.parametrize("case", sorted(CASES))
def test_routing_losses_are_deepspeeds(report: dict[str, Any], case: str) -> None:
    for layer in report[case]["layers"]:
        for got in layer["l_aux"]:  # autoep, classic, pure torch
            assert got == pytest.approx(layer["ds_l_aux"], rel=1e-6, abs=1e-7), layer
        for got in layer["z_loss"]:
            assert got == pytest.approx(layer["z_loss_formula"], rel=1e-6), layer


@pytest.mark.parametrize("case", sorted(CASES))
def test_exp_counts_are_the_routes_per_expert(report: dict[str, Any], case: str) -> None:
    k = {"top1": 1, "top2": 2, "granular": 4}[case]
    for layer in report[case]["layers"]:
        auto, classic, torch_counts = layer["counts"]
        assert auto == classic == torch_counts and sum(auto) == k * layer["tokens"], layer
        assert layer["counts_int"]


def test_load_balancing_and_z_loss_gradients_reach_the_router(report: dict[str, Any]) -> None:
    adapter = report["adapter"]
    assert adapter["gate_is_router_gate"]
    assert adapter["l_aux_grad"] > 0 and adapter["z_loss_grad"] > 0, adapter


def test_the_hooked_layer_adds_nothing_to_the_state_dict(report: dict[str, Any]) -> None:
    assert report["adapter"]["state_keys"] == []


def test_eval_forwards_leave_the_moe_clock_untouched(report: dict[str, Any]) -> None:
    adapter = report["adapter"]
    assert adapter["eval_untouched"]
    assert adapter["train_phases"] == ["gate", "moe"]  # ep 1: no all-to-all runs


def test_an_interrupted_forward_leaves_no_layer_set(report: dict[str, Any]) -> None:
    after = report["adapter"]["after_error"]
    assert after["raised"] and after["layer"] is None and after["seen"] == 0, after
    assert after["next_layer"] is None and after["next_l_aux"] > 0, after


def test_timed_all_to_all_phases_and_empty_splits(report: dict[str, Any]) -> None:
    a2a = report["adapter"]["a2a"]
    assert a2a == {"phases": ["a2a1", "a2a2", "a2a_bwd"], "sent": 0, "values": True}, a2a


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    child()
