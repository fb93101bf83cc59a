"""moelab-plan: parameters, FLOPs, memory per device, EP layout and serving of a config.

The arithmetic lives in moelab.memory and moelab.flops; this module presents it, next to
DeepSpeed's own ZeRO estimator.

moelab-plan model=seed_600m_moe
moelab-plan model=seed_600m_moe plan.format=json
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from hydra.errors import HydraException

from launcher.compose import compose_config, to_schema
from launcher.errors import ConfigError
from launcher.validate import validate
from moelab.config import ModelConfig, MoelabConfig
from moelab.devices import DEVICES
from moelab.flops import flops_per_token
from moelab.memory import (
    GIB,
    Sizes,
    TrainSetup,
    all_to_all_bytes,
    estimate_memory,
    fixes_that_fit,
    inference_view,
)
from moelab.shapes import ep_rank, experts_of_rank


def deepspeed_estimate(sizes: Sizes, s: TrainSetup, gpus_per_node: int, largest_layer: int) -> Any:
    """DeepSpeed's own ZeRO model-state estimate (GPU bytes) for this cluster, or None."""
    if s.stage == 0:
        return None
    offload = s.offload_optimizer != "none"
    nodes = max(1, s.world // gpus_per_node)
    if s.stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(
            sizes.total, gpus_per_node, nodes, cpu_offload=offload
        )
        return gpu
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        sizes.total,
        largest_layer,
        gpus_per_node,
        nodes,
        cpu_offload=offload,
        cpu_offload_params=False,
    )
    return gpu


def deepspeed_differences(m: ModelConfig, s: TrainSetup) -> list[str]:
    """Why moelab's model-state figure differs from DeepSpeed's estimator."""
    notes = ["DeepSpeed's figure covers model states only (no activations, no bucket buffers)."]
    if s.precision == "fp32":
        notes.append(
            "DeepSpeed assumes 16-bit weights and gradients; this run trains in fp32 "
            "(4-byte weights and gradients)."
        )
    if s.stage == 1:
        notes.append("DeepSpeed's estimator is ZeRO-2's: ZeRO-1 keeps whole gradients per rank.")
    if m.is_moe:
        notes.append(
            f"DeepSpeed counts every expert on every rank and shards over all {s.world} ranks; "
            f"with ep_size={s.ep_size} a rank holds 1/{s.ep_size} of the experts, and ZeRO "
            f"partitions their states over the {s.expert_dp}-rank expert-data-parallel group."
        )
    return notes


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
            str(r): list(experts_of_rank(ep_rank(r, ep), ep, n_exp)) if ep else []
            for r in range(world)
        },
    }


def _sizes(params: Any) -> Sizes:
    return Sizes(
        total=params.total,
        active=params.active,
        experts=params.experts,
        embedding=params.embedding,
        lm_head=params.lm_head,
    )


def memory_plan(cfg: MoelabConfig, sizes: Sizes) -> dict[str, Any]:
    """Training memory per device, DeepSpeed's own estimate, all-to-all bytes, fixes."""
    m, seq = cfg.model, cfg.data.seq_len
    setup = TrainSetup.from_config(cfg)
    mem = estimate_memory(m, sizes, setup, seq)
    budget = cfg.cluster.device_memory_gb * GIB
    gpus = cfg.cluster.nproc_per_node
    ds = deepspeed_estimate(sizes, setup, gpus, max(sizes.embedding, sizes.lm_head))
    return {
        "memory_per_device": mem.as_dict(),
        "device_memory_bytes": budget,
        "fits": mem.total <= budget,
        "fixes": [] if mem.total <= budget else fixes_that_fit(m, sizes, setup, seq, budget, gpus),
        "deepspeed_estimate": {
            "model_states_bytes_per_device": ds,
            "moelab_model_states_bytes": mem.total - mem.activations - mem.buffers,
            "differences": deepspeed_differences(m, setup),
        },
        "all_to_all_bytes": all_to_all_bytes(m, setup, seq),
    }


@contextlib.contextmanager
def _without_mlflow() -> Iterator[None]:
    """Hide mlflow while DeepSpeed is imported for sizing: DeepSpeed's autotuner imports it
    when present (2.4 s of a planner run that needs no tracking); it copes with its absence."""
    if "mlflow" in sys.modules:
        yield
        return
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` -> ImportError
    try:
        yield
    finally:
        del sys.modules["mlflow"]


def build_plan(cfg: MoelabConfig) -> dict[str, Any]:
    from moelab.models.sizing import count_params

    params = count_params(cfg.model)
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    sizes = _sizes(params)
    device = DEVICES[cfg.plan.device]
    return {
        "model": cfg.model.name,
        "ffn": cfg.model.ffn,
        "moe_impl": cfg.model.moe.impl if cfg.model.is_moe else None,
        "params_total": params.total,
        "params_active": params.active,
        "params": params.as_dict(),
        "seq_len": cfg.data.seq_len,
        "micro_batch_size": cfg.train.micro_batch_size,
        "precision": cfg.train.precision,
        "zero_stage": cfg.zero.stage,
        "flops_per_token": flops.training,
        "flops_per_token_forward": flops.forward,
        "flops_forward_parts": flops.parts,
        "moe_layers": cfg.model.moe_layer_indices(),
        "ep_layout": ep_layout(cfg),
        **memory_plan(cfg, sizes),
        "inference": inference_view(cfg.model, sizes, device, cfg.data.seq_len, cfg.ep_size),
        "granularity": granularity_split(cfg, params.total, params.active),
    }


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def _ranks(group: list[int]) -> str:
    """A rank group, short: 0-63 for a block, 0,8,...,56 for a long strided one."""
    if len(group) > 2 and group == list(range(group[0], group[-1] + 1)):
        return f"{group[0]}-{group[-1]}"
    if len(group) > 6:
        return f"{group[0]},{group[1]},...,{group[-1]}"
    return ",".join(map(str, group))


def _groups(groups: list[list[int]]) -> str:
    shown = " ".join(f"[{_ranks(g)}]" for g in groups[:8])
    return shown + (f" ... ({len(groups)} groups)" if len(groups) > 8 else "")


def format_params(plan: dict[str, Any]) -> list[str]:
    p = plan["params"]
    impl = f", moe.impl={plan['moe_impl']}" if plan["moe_impl"] else ""
    lines = [
        f"model {plan['model']} (ffn={plan['ffn']}{impl})",
        f"  parameters  total {plan['params_total']:>16,}   active/token "
        f"{plan['params_active']:>16,}",
    ]
    lines += [f"    {k:<10} {v:>16,}" for k, v in p.items() if k not in ("total", "active") and v]
    moe_layers = plan["moe_layers"]
    more = " ..." if len(moe_layers) > 12 else ""
    return [
        *lines,
        f"  FLOPs/token (train, seq {plan['seq_len']}) {plan['flops_per_token']:,.0f}"
        f"   forward {plan['flops_per_token_forward']:,.0f}",
        f"  MoE layers  {len(moe_layers)}: {moe_layers[:12]}{more}"
        if moe_layers
        else "  MoE layers  none",
    ]


def format_layout(plan: dict[str, Any]) -> list[str]:
    ep, a2a = plan["ep_layout"], plan["all_to_all_bytes"]
    return [
        f"  world {ep['world_size']}  ep_size {ep['ep_size']}  experts/rank "
        f"{ep['experts_per_rank']}",
        f"    EP groups            {_groups(ep['ep_groups'])}",
        f"    expert-DP groups     {_groups(ep['expert_data_parallel_groups'])}",
        f"    all-to-all per step  {_gib(a2a['per_rank_per_step'])} sent per rank, "
        f"{_gib(a2a['world_per_step'])} in all",
    ]


def format_memory(plan: dict[str, Any]) -> list[str]:
    mem, ds = plan["memory_per_device"], plan["deepspeed_estimate"]
    head = (
        f"  memory per GPU (ZeRO-{plan['zero_stage']}, {plan['precision']}, micro-batch "
        f"{plan['micro_batch_size']} x {plan['seq_len']}): {_gib(mem['total'])} of "
        f"{_gib(plan['device_memory_bytes'])}"
    )
    lines = [head] + [f"    {k:<20} {_gib(v):>14}" for k, v in mem.items() if k != "total"]
    if ds["model_states_bytes_per_device"] is not None:
        lines.append(
            f"    DeepSpeed's ZeRO estimator: {_gib(ds['model_states_bytes_per_device'])} of "
            f"model states (moelab: {_gib(ds['moelab_model_states_bytes'])})"
        )
        lines += [f"      - {note}" for note in ds["differences"]]
    if not plan["fits"]:
        lines.append(f"  WARNING: {_gib(mem['total'])} per GPU does not fit the device memory.")
        fixes = plan["fixes"]
        lines += [f"    fits with {f['fix']} ({_gib(f['bytes_per_device'])})" for f in fixes]
        lines += (
            [] if fixes else ["    no change of one or two knobs fits: add GPUs (cluster.nodes)."]
        )
    return lines


def format_inference(plan: dict[str, Any]) -> list[str]:
    inf = plan["inference"]
    return [
        f"  serving (bf16) on {inf['device']} ({inf['peak_tflops']:g} TFLOP/s, "
        f"{inf['hbm_tb_s']:g} TB/s)",
        f"    weights              {_gib(inf['weights_bytes'])} "
        f"({_gib(inf['weights_bytes_per_device'])} per GPU with ep_size)",
        f"    KV cache per token   {inf['kv_bytes_per_token']:,} bytes",
        f"    read per token, b=1  {inf['bytes_per_decoded_token_weights'] / 1e9:,.3f} GB weights"
        f", {inf['bytes_per_decoded_token'] / 1e9:,.3f} GB with {inf['context']} tokens of KV"
        f" (<= {inf['batch1_tokens_per_s_bound']:,.0f} tokens/s)",
        f"    decode turns compute-bound at batch {inf['compute_bound_batch']:,}",
    ]


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


def format_granularity(plan: dict[str, Any]) -> list[str]:
    split = plan["granularity"]
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


SECTIONS = (format_params, format_granularity, format_layout, format_memory, format_inference)


def format_text(plan: dict[str, Any]) -> str:
    return "\n".join(line for section in SECTIONS for line in section(plan))


def main(argv: list[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # planning builds on the meta device only
    try:
        cfg = to_schema(compose_config(overrides))
        validate(cfg, planning=True)
    except (ConfigError, HydraException) as err:
        print(f"moelab-plan: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    with _without_mlflow():
        plan = build_plan(cfg)
    print(json.dumps(plan) if cfg.plan.format == "json" else format_text(plan))


if __name__ == "__main__":
    main()
