"""DeepSpeed's MoE layer as moelab uses it. With `moelab.dscompat`, which holds every DeepSpeed
internal it relies on, the only module that imports `deepspeed.moe`.

`MoEFFN` wraps `deepspeed.moe.layer.MoE` (so DeepSpeed still finds its MoE modules for
process groups, expert parameter groups and expert checkpoint shards) and fixes two things:
experts start independent (seeded by their global id, whatever ep_size), and top-2's Gumbel
sampling of the second expert (and top-1's random token selection) only happen in training.
Its gate is `RouterGate`, DeepSpeed's `TopKGate` that also returns the router z-loss, and
its forward gives a `MoEOutput` (out, l_aux, z_loss, exp_counts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn

from moelab import dscompat
from moelab.config import MoEConfig
from moelab.models.layers import SwiGLU
from moelab.models.moe_torch import MoEOutput, router_z_loss
from moelab.moe_clock import MoEClock, bytes_to_others, read_ms, timed
from moelab.shapes import expert_seed, experts_of_rank


class RouterGate(TopKGate):
    """DeepSpeed's `TopKGate` computing its logits once for the gating and the z-loss.

    Same weights (`wg`), options and gating functions as `TopKGate`; the forward
    (`dscompat.gate_forward`) returns `(l_aux, z_loss)` where TopKGate returns l_aux.
    """

    @classmethod
    def like(cls, gate: TopKGate) -> RouterGate:
        """A RouterGate with `gate`'s weights and options (the router Linear is shared)."""
        new: RouterGate = dscompat.gate_like(cls, gate)
        return new

    def forward(
        self,
        input: torch.Tensor,
        used_token: torch.Tensor | None = None,
        sparse_routes: bool = False,
        use_tutel: bool = False,
    ) -> Any:
        return dscompat.gate_forward(
            self, input, used_token, sparse_routes, use_tutel, z_loss_of=router_z_loss
        )


def build_deepspeed_moe(
    d_model: int, expert: nn.Module, moe_cfg: MoEConfig, ep_size: int, use_residual: bool
) -> MoE:
    """DeepSpeed's MoE layer with every knob of `MoEConfig` (no process group is created).

    Granularity is already in `expert` (hidden / G); here the layer gets E x G experts and
    routes each token to k x G of them (DeepSpeed's `topkgating` serves k > 2).
    """
    moe = MoE(
        hidden_size=d_model,
        expert=expert,
        num_experts=moe_cfg.total_experts,
        ep_size=ep_size,
        k=moe_cfg.active_experts,
        capacity_factor=moe_cfg.capacity_factor,
        eval_capacity_factor=moe_cfg.eval_capacity_factor,
        min_capacity=moe_cfg.min_capacity,
        use_residual=use_residual,
        noisy_gate_policy=moe_cfg.noisy_gate_policy,
        drop_tokens=moe_cfg.drop_tokens,
        use_rts=moe_cfg.use_rts,
        top2_2nd_expert_sampling=moe_cfg.top2_2nd_expert_sampling,
    )
    moe.deepspeed_moe.gate = RouterGate.like(moe.deepspeed_moe.gate)
    return moe


class MoEFFN(nn.Module):
    """`deepspeed.moe.layer.MoE` built from `MoEConfig`; forward gives a `MoEOutput`."""

    is_moe_ffn = True

    def __init__(
        self,
        d_model: int,
        expert: nn.Module,
        moe_cfg: MoEConfig,
        *,
        layer_idx: int,
        ep_size: int = 1,
        ep_rank: int = 0,
        seed: int = 0,
        init_std: float = 0.02,
        use_residual: bool = False,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.num_experts = moe_cfg.total_experts
        self.top2_sampling = moe_cfg.top2_2nd_expert_sampling
        self.use_rts = moe_cfg.use_rts
        self.timing = False
        self.layer = build_deepspeed_moe(d_model, expert, moe_cfg, ep_size, use_residual)
        self.reset_experts(seed, init_std)
        self.train(self.training)

    @property
    def gate(self) -> RouterGate:
        return self.layer.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.layer.deepspeed_moe.experts.deepspeed_experts

    def expert_params(self) -> list[nn.Parameter]:
        """This rank's expert parameters."""
        return list(self.local_experts.parameters())

    def global_expert_id(self, local_idx: int) -> int:
        return experts_of_rank(self.ep_rank, self.ep_size, self.num_experts)[local_idx]

    @torch.no_grad()
    def reset_experts(self, seed: int, std: float) -> None:
        """Draw every local expert's weights from its own generator (global id, layer, seed)."""
        # DeepSpeed's Experts deep-copies one module, so all experts would start identical.
        for local_idx, expert in enumerate(self.local_experts):
            params = list(expert.parameters())
            if any(p.device.type == "meta" for p in params):
                continue
            gen = torch.Generator().manual_seed(
                expert_seed(seed, self.layer_idx, self.global_expert_id(local_idx))
            )
            for p in params:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            # transformers' post_init must not redraw these from the global RNG.
            for m in expert.modules():
                m._is_hf_initialized = True  # type: ignore[assignment]

    def train(self, mode: bool = True) -> MoEFFN:
        super().train(mode)
        # DeepSpeed samples top-2's 2nd expert (and top-1's drop priority) in eval too.
        self.gate.top2_2nd_expert_sampling = mode and self.top2_sampling
        self.gate.use_rts = mode and self.use_rts
        # Telemetry times training forwards only (eval passes would pollute the window).
        dscompat.set_moe_timing_flags(self.layer, mode and self.timing)
        return self

    def forward(self, x: torch.Tensor) -> MoEOutput:
        # Lets the all-to-alls this forward runs (and their backward) know their layer.
        MoEClock.layer = self.layer_idx if self.training else None
        try:
            return MoEOutput(*dscompat.moe_forward(self.layer, x))
        finally:
            MoEClock.layer = None


def build_ffn(spec: Any, use_residual: bool = False) -> MoEFFN:
    """The training MoE FFN of block `spec.layer_idx` (a `models.blocks.BlockSpec`)."""
    cfg = spec.cfg
    return MoEFFN(
        cfg.d_model,
        SwiGLU(cfg.d_model, cfg.expert_hidden),
        cfg.to_model_config().moe,
        layer_idx=spec.layer_idx,
        ep_size=spec.ep_size,
        ep_rank=spec.ep_rank,
        seed=spec.seed,
        init_std=cfg.init_std,
        use_residual=use_residual,
    )


def moe_ffns(model: nn.Module) -> Iterator[MoEFFN]:
    """Every `MoEFFN` of `model`, in order."""
    for module in model.modules():
        if isinstance(module, MoEFFN):
            yield module


def iter_moe_layers(model: nn.Module) -> Iterator[tuple[int, MoE]]:
    """(block index, DeepSpeed MoE module) for every MoE layer of `model`, in order."""
    for module in model.modules():
        if isinstance(module, MoEFFN):
            yield module.layer_idx, module.layer


_ORIGINAL_A2A = dscompat.original_all_to_all()


class _TimedAllToAll(torch.autograd.Function):
    """DeepSpeed's `_AllToAll` that counts the bytes it sends in training passes and times its
    backward (the reverse all-to-all), both attributed to the MoE layer that ran it."""

    @staticmethod
    def forward(ctx: Any, group: Any, input: torch.Tensor) -> torch.Tensor:
        ctx.group, ctx.layer = group, MoEClock.layer
        if ctx.layer is not None:
            MoEClock.sent += bytes_to_others(group, input)
        return _ORIGINAL_A2A.forward(ctx, group, input)

    @staticmethod
    def backward(ctx: Any, *grad_output: torch.Tensor) -> tuple[None, torch.Tensor]:
        grad, layer = grad_output[0], ctx.layer
        if layer is not None:
            MoEClock.sent += bytes_to_others(ctx.group, grad)
        with timed(layer, "a2a_bwd", grad.device):
            out = _ORIGINAL_A2A.apply(ctx.group, grad)
        return None, out


def install_moe_timers() -> None:
    """Route DeepSpeed's all-to-all through `_TimedAllToAll` until `uninstall_moe_timers`, so
    that the backward all-to-alls, which the layers' forward timers never see, can be timed
    too, and the bytes of every training all-to-all counted."""
    dscompat.swap_all_to_all(_TimedAllToAll)


def uninstall_moe_timers() -> None:
    """Give the MoE layers DeepSpeed's own all-to-all back."""
    dscompat.restore_all_to_all()


def set_moe_timing(model: nn.Module, on: bool) -> None:
    """Turn the MoE layers' and gates' own timers (not ds_config's engine-wide ones) and the
    backward all-to-all timer on or off. DeepSpeed reads its timers after every timed forward,
    which synchronises the device: time sampled steps only."""
    for ffn in moe_ffns(model):
        if ffn.timing != on:
            ffn.timing = on
            ffn.train(ffn.training)
    MoEClock.active = on


def read_and_reset_moe_timers(model: nn.Module) -> dict[int, dict[str, float]]:
    """Block index -> {'a2a1', 'a2a2', 'gate', 'moe', 'a2a_bwd'} ms since the last read, then
    reset: DeepSpeed's forward timers and the backward all-to-alls (`moe_clock`).

    DeepSpeed's timers keep one record per forward and sum them on every read, so they are
    reset after each read (the layer itself reads them with reset=False after each forward).
    """
    bwd = read_ms()
    return {
        idx: dscompat.moe_timer_ms(moe) | {"a2a_bwd": bwd.get(idx, {}).get("a2a_bwd", 0.0)}
        for idx, moe in iter_moe_layers(model)
    }


def register_router_hooks(
    model: nn.Module, on_logits: Callable[[int, torch.Tensor], None]
) -> list[Any]:
    """Hooks giving each MoE layer's router logits (training only).

    `TopKGate.forward` applies `wg.weight` with `F.linear` (it never calls `wg`), so a hook
    on `wg` would not fire: the gate's own forward hook recomputes the logits (fp32, as the
    gate does; d_model x num_experts FLOPs per token).
    """
    handles = []
    for ffn in moe_ffns(model):
        idx, gate = ffn.layer_idx, ffn.gate

        def gate_hook(
            mod: nn.Module, args: Any, _out: Any, idx: int = idx, gate: TopKGate = gate
        ) -> None:
            if mod.training:
                with torch.no_grad():
                    x = args[0].detach().float()
                    weight = gate.wg.weight.detach().float()
                    on_logits(idx, x @ weight.t())

        handles.append(gate.register_forward_hook(gate_hook))
    return handles
