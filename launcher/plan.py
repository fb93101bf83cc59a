"""moelab-plan: parameters, FLOPs per token and the expert-parallel layout of a config.

moelab-plan model=seed_600m_moe
moelab-plan model=seed_600m_moe plan.format=json
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from hydra.errors import HydraException

from launcher.compose import compose_config, to_schema
from launcher.validate import ConfigError, validate
from moelab.config import MoelabConfig


def ep_layout(cfg: MoelabConfig) -> dict[str, Any]:
    """DeepSpeed's groups: EP groups are consecutive rank blocks, expert-DP groups strided."""
    world = cfg.world_size
    ep = cfg.ep_size
    n_exp = cfg.model.moe.total_experts if cfg.model.is_moe else 0
    local = n_exp // ep if ep else 0
    return {
        "world_size": world,
        "ep_size": ep,
        "experts_per_rank": local,
        "ep_groups": [list(range(s, s + ep)) for s in range(0, world, ep)],
        "expert_data_parallel_groups": [list(range(i, world, ep)) for i in range(ep)],
        "experts_of_rank": {
            str(r): list(range((r % ep) * local, (r % ep + 1) * local)) for r in range(world)
        },
    }


def build_plan(cfg: MoelabConfig) -> dict[str, Any]:
    from moelab.flops import flops_per_token
    from moelab.models.sizing import count_params

    params = count_params(cfg.model)
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    return {
        "model": cfg.model.name,
        "ffn": cfg.model.ffn,
        "params_total": params.total,
        "params_active": params.active,
        "params": params.as_dict(),
        "seq_len": cfg.data.seq_len,
        "flops_per_token": flops.training,
        "flops_per_token_forward": flops.forward,
        "flops_forward_parts": flops.parts,
        "moe_layers": cfg.model.moe_layer_indices(),
        "ep_layout": ep_layout(cfg),
        "granularity": granularity_split(cfg, params.total, params.active),
    }


def format_text(plan: dict[str, Any]) -> str:
    p, ep = plan["params"], plan["ep_layout"]
    more = " ..." if len(ep["ep_groups"]) > 8 else ""
    lines = [
        f"model {plan['model']} (ffn={plan['ffn']})",
        f"  parameters  total {plan['params_total']:>16,}   active/token "
        f"{plan['params_active']:>16,}",
    ]
    lines += [f"    {k:<10} {v:>16,}" for k, v in p.items() if k not in ("total", "active") and v]
    lines += [
        f"  FLOPs/token (train, seq {plan['seq_len']}) {plan['flops_per_token']:,.0f}"
        f"   forward {plan['flops_per_token_forward']:,.0f}",
        f"  MoE layers  {plan['moe_layers'] or 'none'}",
        f"  world {ep['world_size']}  ep_size {ep['ep_size']}  experts/rank "
        f"{ep['experts_per_rank']}",
        f"    EP groups            {ep['ep_groups'][:8]}{more}",
        f"    expert-DP groups     {ep['expert_data_parallel_groups'][:8]}",
    ]
    return "\n".join(lines + granularity_lines(plan["granularity"]))


def granularity_split(cfg: MoelabConfig, total: int, active: int) -> dict[str, Any] | None:
    """Fine-grained experts against the unsplit model (G = 1): sizes and parameter deltas."""
    import dataclasses

    from moelab.models.sizing import count_params

    m = cfg.model
    if not m.is_moe or m.moe.granularity == 1:
        return None
    base = count_params(dataclasses.replace(m, moe=dataclasses.replace(m.moe, granularity=1)))
    router = m.d_model * m.moe.num_experts * (m.moe.granularity - 1) * len(m.moe_layer_indices())
    return {
        "granularity": m.moe.granularity,
        "experts": [m.moe.num_experts, m.moe.total_experts],
        "top_k": [m.moe.top_k, m.moe.active_experts],
        "expert_hidden": [m.base_expert_hidden, m.expert_hidden],
        "rounded": m.expert_hidden * m.moe.granularity != m.base_expert_hidden,
        "router_params_added": router,
        "delta_total": total - base.total,
        "delta_active": active - base.active,
        "rounding_delta_total": total - base.total - router,
        "rounding_delta_active": active - base.active - router,
    }


def granularity_lines(split: dict[str, Any] | None) -> list[str]:
    if split is None:
        return []
    (e0, e1), (k0, k1), (h0, h1) = split["experts"], split["top_k"], split["expert_hidden"]
    lines = [
        f"  granularity {split['granularity']}: experts {e0} -> {e1}, top_k {k0} -> {k1}, "
        f"expert hidden {h0} -> {h1}{' (rounded)' if split['rounded'] else ''}",
        f"    vs granularity 1: total {split['delta_total']:+,}   active {split['delta_active']:+,}"
        f"   (router {split['router_params_added']:+,})",
    ]
    if split["rounded"]:
        lines.append(
            f"    rounding the hidden size changed experts by {split['rounding_delta_total']:+,} "
            f"total, {split['rounding_delta_active']:+,} active"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # planning builds on the meta device only
    try:
        cfg = to_schema(compose_config(overrides))
        validate(cfg, planning=True)
    except (ConfigError, HydraException) as err:
        print(f"moelab-plan: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    plan = build_plan(cfg)
    print(json.dumps(plan) if cfg.plan.format == "json" else format_text(plan))


if __name__ == "__main__":
    main()
