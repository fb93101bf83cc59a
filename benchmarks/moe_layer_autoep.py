"""The AutoEP side of moe_layer.py: DeepSpeed AutoEP's layer (`model.moe.impl: autoep`) as
moelab trains it, built in one process and profiled by phase.

AutoEP's layer exists only after `deepspeed.initialize` has replaced the `DroplessMoE` block of
a `moelab.autoep.AutoEPFFN`: `autoep_ffn` wraps the FFN under the module name the ds_config's
`expert_parallel` section matches (`model.layers.<i>.moe.block`), initializes an engine of one
rank (ep_size 1, ZeRO 0, no optimizer) and hands back the FFN, whose forward is then AutoEP's
(router, permutation, grouped experts, combine; no all-to-all at ep_size 1) plus moelab's
routing losses from hooks. The FFN is timed directly (forward + loss.backward()), like the
classic `MoEFFN`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from moelab.autoep import AutoEPFFN
from moelab.config import MoEConfig
from moelab.dsconfig import expert_parallel_section

PHASES = ("router", "permute", "experts", "combine")


class _Holder(nn.Module):
    """`model.layers.0.moe` = the FFN: the names AutoEP's module pattern expects."""

    def __init__(self, ffn: AutoEPFFN) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        self.model.layers[0].moe = ffn


def autoep_ffn(d_model: int, hidden: int, experts: int, top_k: int) -> AutoEPFFN:
    """An `AutoEPFFN` whose block AutoEP has replaced (one rank, ep_size 1), in train mode."""
    import deepspeed

    cfg = MoEConfig(num_experts=experts, top_k=top_k, impl="autoep")
    ffn = AutoEPFFN(d_model, hidden, cfg, layer_idx=0, seed=0)
    fake = SimpleNamespace(
        model=SimpleNamespace(moe=SimpleNamespace(active_experts=top_k)),
        parallel=SimpleNamespace(ep_size=1),
    )
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0},
        "expert_parallel": expert_parallel_section(fake),  # type: ignore[arg-type]
    }
    holder = _Holder(ffn)
    deepspeed.initialize(model=holder, config=ds_config)
    if not ffn.replaced:
        raise RuntimeError("deepspeed.initialize did not replace the DroplessMoE block")
    return ffn.train()


@contextmanager
def _ranges(modules: dict[str, nn.Module]) -> Iterator[None]:
    """A record_function range `phase:<name>` around each module's forward."""
    open_: dict[str, Any] = {}
    handles = []
    for name, mod in modules.items():

        def pre(_m: nn.Module, _a: Any, name: str = name) -> None:
            open_[name] = record_function(f"phase:{name}").__enter__()

        def post(_m: nn.Module, _a: Any, _o: Any, name: str = name) -> None:
            open_.pop(name).__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def where_time_goes(ffn: AutoEPFFN, x: torch.Tensor, step: Callable[[], None]) -> dict[str, Any]:
    """Forward phases (ms), the rest of the step (ms) and the top operators of one profiled
    `step` (fwd+bwd) of the AutoEP layer. router and experts are the layer's submodules
    (hooks); permute_combine is the rest of the layer's forward (token sort and gather,
    alignment padding, unpermute, weighted sum); backward_and_losses is the step outside the
    layer's forward (moelab's routing losses, the backward); no all-to-all at ep_size 1."""
    cuda = x.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    parts = {"layer": ffn.block, "router": ffn.block.router, "experts": ffn.block.experts}
    with _ranges(parts), profile(activities=acts) as prof, record_function("phase:step"):
        step()
    events = prof.key_averages()
    ms = {e.key[6:]: e.cpu_time_total / 1e3 for e in events if e.key.startswith("phase:")}
    fwd = ms.get("layer", 0.0)
    phases = {
        "forward": fwd,
        "router": ms.get("router", 0.0),
        "experts": ms.get("experts", 0.0),
        "permute_combine": fwd - ms.get("router", 0.0) - ms.get("experts", 0.0),
        "backward_and_losses": ms.get("step", 0.0) - fwd,
        "all_to_all": 0.0,
    }
    ops = sorted(
        (e for e in events if not e.key.startswith("phase:")),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    top = [[e.key, round(e.self_cpu_time_total / 1e3, 2)] for e in ops[:6]]
    return {"phases_ms": {k: round(v, 2) for k, v in phases.items()}, "top_ops_self_ms": top}


def profile_line(p: dict[str, Any]) -> str:
    """One table cell: the forward's split and the top operators."""
    ph = p["phases_ms"]
    fwd = ph.get("forward", 0.0) or 1.0
    parts = ", ".join(
        f"{k} {100 * ph.get(k, 0.0) / fwd:.0f}%" for k in ("router", "permute_combine", "experts")
    )
    ops = ", ".join(f"{name} {ms:.0f} ms" for name, ms in p["top_ops_self_ms"][:3])
    rest = ph.get("backward_and_losses", 0.0)
    return f"fwd {ph['forward']:.0f} ms ({parts}; a2a 0), bwd+losses {rest:.0f} ms; top ops: {ops}"
