"""DeepSpeed's AutoEP as moelab uses it (`model.moe.impl: autoep`): dropless MoE.

`AutoEPFFN` holds a `DroplessMoE` block (router `gate`, fused experts) under the name
`block`; the ds_config's `expert_parallel` section (`moelab.dsconfig`) tells
`deepspeed.initialize` to replace every such block by AutoEP's layer (token-choice top-k
router, grouped experts, all-to-all dispatch by variable splits, no capacity), keeping this
rank's experts only. The FFN then reads what the layer does not return through hooks: the
router logits (its `gate` Linear's output, still in the graph, for moelab's load-balancing
loss and z-loss) and the routes per expert (the router's third output), so its forward gives
the same `MoEOutput` as the classic layer. A model built with the same seed starts from the
classic model's weights (experts mapped by `fused_rows`). DeepSpeed internals it relies on
are named in `moelab.dscompat`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from moelab import dscompat
from moelab.config import MoEConfig
from moelab.models.layers import SwiGLU
from moelab.models.moe_dropless import DroplessMoE, FusedExperts, routing_losses
from moelab.models.moe_torch import MoEOutput
from moelab.moe_clock import MoEClock, read_ms, rows_to_others, start, stop, timed
from moelab.shapes import expert_seed

LogitsHook = Callable[[int, torch.Tensor], None]


def fused_rows(swiglu_gate_up: torch.Tensor) -> torch.Tensor:
    """moelab's SwiGLU `gate_up_proj` rows [up; gate] as the fused layout's [gate; up] (and
    back: swapping the halves is its own inverse)."""
    up, gate = swiglu_gate_up.chunk(2, dim=-2)
    return torch.cat((gate, up), dim=-2)


def _draw_as_classic(d_model: int, hidden: int) -> None:
    """Take from the global RNG what the classic FFN takes before its router: the template
    expert that DeepSpeed deep-copies (then redrawn by `reset_experts`). The router, and every
    weight drawn after it, then start as in a classic model of the same seed."""
    SwiGLU(d_model, hidden)


class AutoEPFFN(nn.Module):
    """The MoE FFN of one block under AutoEP; forward gives a `MoEOutput`."""

    is_moe_ffn = True

    def __init__(
        self,
        d_model: int,
        hidden: int,
        moe_cfg: MoEConfig,
        *,
        layer_idx: int,
        seed: int = 0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.layer_idx, self.k, self.timing = layer_idx, moe_cfg.active_experts, False
        _draw_as_classic(d_model, hidden)
        self.block: nn.Module = DroplessMoE(d_model, hidden, moe_cfg.total_experts, self.k)
        self.logit_hooks: dict[int, LogitsHook] = {}
        self._hooked: nn.Module | None = None
        self._seen: list[Any] = []  # [logits, routes per expert] of the running forward
        self.reset_experts(seed, init_std)

    @property
    def replaced(self) -> bool:
        """Whether AutoEP has put its layer in place of the block (at deepspeed.initialize)."""
        return dscompat.is_autoep_layer(self.block)

    @property
    def gate(self) -> nn.Linear:
        """The router's Linear (d_model -> experts)."""
        gate = self.block.get_submodule(dscompat.AUTOEP_ROUTER_GATE if self.replaced else "gate")
        assert isinstance(gate, nn.Linear)
        return gate

    def expert_params(self) -> list[nn.Parameter]:
        """This rank's expert parameters (all experts before the replacement)."""
        return list(self.block.get_submodule("experts").parameters())

    @torch.no_grad()
    def reset_experts(self, seed: int, std: float) -> None:
        """Draw expert e's weights as the classic layer draws them (same generator, same
        order), in the fused layout: both implementations start from the same model."""
        experts: FusedExperts = self.block.get_submodule("experts")  # type: ignore[assignment]
        if experts.gate_up_proj.device.type == "meta":
            return
        for e in range(experts.gate_up_proj.shape[0]):
            gen = torch.Generator().manual_seed(expert_seed(seed, self.layer_idx, e))
            gate_up = torch.randn(experts.gate_up_proj.shape[1:], generator=gen) * std
            experts.gate_up_proj[e].copy_(fused_rows(gate_up))
            experts.down_proj[e].copy_(
                torch.randn(experts.down_proj.shape[1:], generator=gen) * std
            )

    def _attach(self) -> None:
        """Hooks on AutoEP's router (once per replaced layer): logits and routes per expert."""
        if self._hooked is self.block:
            return
        object.__setattr__(self, "_hooked", self.block)  # a reference, not a submodule
        self.gate.register_forward_hook(self._on_logits)
        router = self.block.get_submodule(dscompat.AUTOEP_ROUTER)
        router.register_forward_pre_hook(self._router_starts)
        router.register_forward_hook(self._router_ends)

    def _on_logits(self, _mod: nn.Module, _args: Any, logits: torch.Tensor) -> None:
        self._seen.append(logits)
        if self.training:
            for hook in self.logit_hooks.values():
                with torch.no_grad():
                    hook(self.layer_idx, logits.detach().float())

    def _router_starts(self, _mod: nn.Module, args: Any) -> None:
        self._seen.append(start(MoEClock.layer, "gate", args[0].device))

    def _router_ends(self, _mod: nn.Module, _args: Any, out: Any) -> None:
        stop(self._seen.pop(0))
        self._seen.append(dscompat.autoep_routes_per_expert(out))

    def forward(self, x: torch.Tensor) -> MoEOutput:
        if not self.replaced:  # no DeepSpeed engine around it: the pure-torch forward
            out: MoEOutput = self.block(x)
            return out
        self._attach()
        MoEClock.layer = self.layer_idx if self.training else None
        _TimedAllToAllV.calls = 0
        self._seen = []
        try:  # an exception leaves no layer set for the next all-to-alls, no logits kept
            with timed(MoEClock.layer, "moe", x.device):
                y = self.block(x)
                logits, counts = self._seen
                l_aux, z_loss = routing_losses(logits, counts, self.k)
        finally:
            MoEClock.layer, self._seen = None, []
        return MoEOutput(y, l_aux, z_loss, counts)


def build_ffn(spec: Any, use_residual: bool = False) -> AutoEPFFN:
    """The training MoE FFN of block `spec.layer_idx` (a `models.blocks.BlockSpec`); AutoEP
    replaces its block at deepspeed.initialize. PR-MoE is refused by the launcher."""
    assert not use_residual, "PR-MoE runs on the classic layer only"
    cfg = spec.cfg
    moe_cfg = cfg.to_model_config().moe
    return AutoEPFFN(
        cfg.d_model,
        cfg.expert_hidden,
        moe_cfg,
        layer_idx=spec.layer_idx,
        seed=spec.seed,
        init_std=cfg.init_std,
    )


def moe_ffns(model: nn.Module) -> Iterator[AutoEPFFN]:
    """Every `AutoEPFFN` of `model`, in order."""
    for module in model.modules():
        if isinstance(module, AutoEPFFN):
            yield module


_ORIGINAL_A2A = dscompat.original_all_to_all(autoep=True)


class _TimedAllToAllV(torch.autograd.Function):
    """AutoEP's variable-split all-to-all that counts the bytes it sends to other ranks in
    training passes and times itself: a layer's first forward call is the dispatch (`a2a1`),
    its second the combine (`a2a2`), the backward calls their reverses (`a2a_bwd`)."""

    calls = 0  # forward all-to-alls of the running MoE forward

    @staticmethod
    def forward(
        ctx: Any, group: Any, x: torch.Tensor, splits_in: list[int], splits_out: list[int]
    ) -> torch.Tensor:
        ctx.layer = layer = MoEClock.layer
        if layer is None:
            return _ORIGINAL_A2A.forward(ctx, group, x, splits_in, splits_out)
        phase = "a2a1" if _TimedAllToAllV.calls == 0 else "a2a2"
        _TimedAllToAllV.calls += 1
        if x.shape[0]:  # x has sum(splits_in) rows: none (a rank no route reached), no bytes
            MoEClock.sent += rows_to_others(group, splits_in, x)
        with timed(layer, phase, x.device):
            out: torch.Tensor = _ORIGINAL_A2A.forward(ctx, group, x, splits_in, splits_out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        if ctx.layer is None:
            return _ORIGINAL_A2A.backward(ctx, grad)
        if grad.shape[0]:
            MoEClock.sent += rows_to_others(ctx.group, ctx.output_splits, grad)
        with timed(ctx.layer, "a2a_bwd", grad.device):
            return _ORIGINAL_A2A.backward(ctx, grad)


def install_moe_timers() -> None:
    """Route AutoEP's all-to-all through `_TimedAllToAllV` until `uninstall_moe_timers`."""
    dscompat.swap_all_to_all(_TimedAllToAllV, autoep=True)


def uninstall_moe_timers() -> None:
    """Give AutoEP's layers DeepSpeed's own all-to-all back."""
    dscompat.restore_all_to_all(autoep=True)


def set_moe_timing(model: nn.Module, on: bool) -> None:
    """Time the coming passes' MoE phases (sampled steps) or not."""
    for ffn in moe_ffns(model):
        ffn.timing = on
    MoEClock.active = on


def read_and_reset_moe_timers(model: nn.Module) -> dict[int, dict[str, float]]:
    """Block index -> {'a2a1', 'a2a2', 'gate', 'moe', 'a2a_bwd'} ms since the last read."""
    ms = read_ms()
    return {ffn.layer_idx: ms.get(ffn.layer_idx, {}) for ffn in moe_ffns(model)}


class _LogitsHandle:
    def __init__(self, ffn: AutoEPFFN, key: int) -> None:
        self.ffn, self.key = ffn, key

    def remove(self) -> None:
        self.ffn.logit_hooks.pop(self.key, None)


def register_router_hooks(model: nn.Module, on_logits: LogitsHook) -> list[Any]:
    """`on_logits(block index, logits (S, E) fp32, detached)` after every training forward's
    router; handles with `remove()`."""
    handles: list[Any] = []
    for ffn in moe_ffns(model):
        key = id(on_logits)
        ffn.logit_hooks[key] = on_logits
        handles.append(_LogitsHandle(ffn, key))
    return handles
