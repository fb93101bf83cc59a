"""DeepSpeed's config for a run: plain arithmetic on moelab's config, torch-free.

The launcher renders ds_config.json on a head node without torch or DeepSpeed; the ranks
read that file (`moelab.rundir.RunDir.ds_config`).
"""

from __future__ import annotations

from typing import Any

from moelab.config import MoelabConfig


def build_ds_config(cfg: MoelabConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (written to ds_config.json by the launcher)."""
    t, z = cfg.train, cfg.zero
    zero: dict[str, Any] = {
        "stage": z.stage,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": z.contiguous_gradients,
        "reduce_bucket_size": z.reduce_bucket_size,
    }
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": z.offload_optimizer}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * cfg.world_size,
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10**9,  # moelab logs its own metrics
        "optimizer": {
            "type": "AdamW",
            # torch_adam: DeepSpeed's FusedAdam would JIT-compile a CPU op for ~30 s.
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "eps": t.eps,
                "weight_decay": t.weight_decay,
                "torch_adam": True,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.steps,
                "warmup_num_steps": t.warmup_steps,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": t.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": zero,
        # check_grad_overflow: ZeRO 1/2 then skip a bf16 update whose gradient norm is NaN/inf.
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        "fp16": {
            "enabled": t.precision == "fp16",
            "initial_scale_power": t.fp16_initial_scale_power,
        },
        # Engine-wide timers sync every micro-step; moelab turns on only the MoE layers' own.
        "wall_clock_breakdown": False,
    }
    if cfg.model.is_moe and cfg.model.moe.impl == "autoep":
        ds["expert_parallel"] = expert_parallel_section(cfg)
    if cfg.telemetry.comms_profile:
        # Times (and synchronizes) every collective, with message sizes: profiling runs only.
        ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    return ds


AUTOEP_BLOCKS = r"model\.layers\.\d+\.moe\.block"
"""Module names of the blocks AutoEP replaces: `moelab.autoep.AutoEPFFN.block` (a regex)."""


def expert_parallel_section(cfg: MoelabConfig) -> dict[str, Any]:
    """AutoEP's ds_config section for moelab's dropless block (`models.moe_dropless`): custom
    patterns, fused gate+up experts, softmax scores applied after the experts, renormalised
    over the k routes when k > 1 (GShard/Mixtral) and not for top-1 (Switch)."""
    k = cfg.model.moe.active_experts
    return {
        "enabled": True,
        "autoep_size": cfg.parallel.ep_size,
        "moe_layer_pattern": AUTOEP_BLOCKS,
        "router_pattern": "gate",
        "expert_pattern": "experts",
        "expert_storage": "fused_3d",
        "expert_w1": "gate_up_proj",
        "expert_w2": "down_proj",
        "expert_w3": None,
        "top_k": k,
        "score_func": "softmax",
        "score_apply": "post",
        "route_norm": k > 1,
    }
