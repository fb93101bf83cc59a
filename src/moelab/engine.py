"""DeepSpeed engine, ds_config and process groups.

`build_ds_config` is plain arithmetic on the config so the launcher can render
ds_config.json on a head node without torch; everything else imports torch and
deepspeed lazily and runs on the ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from moelab.config import MoelabConfig

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


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
        "fp16": {"enabled": t.precision == "fp16"},
        # Engine-wide timers sync every micro-step; moelab turns on only the MoE layers' own.
        "wall_clock_breakdown": False,
    }
    if cfg.telemetry.comms_profile:
        # Times (and synchronizes) every collective, with message sizes: profiling runs only.
        ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    return ds


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the world."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    ep_size: int

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def ep_rank(self) -> int:
        # DeepSpeed builds EP groups from consecutive rank blocks.
        return self.rank % self.ep_size


def set_threads(threads_per_rank: int, local_world_size: int) -> int:
    """Give each rank its share of the cores (2 ranks on 2 cores run ~5x slower otherwise)."""
    import torch

    n = threads_per_rank or max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(n)
    return n


def init_distributed(ep_size: int) -> DistInfo:
    """Initialise torch.distributed the DeepSpeed way (gloo on CPU, NCCL on GPUs)."""
    import deepspeed

    deepspeed.init_distributed()
    import torch.distributed as dist

    dist.barrier()  # every rank has mapped the others' shared-memory buffers
    unlink_shm_buffer(dist.get_rank())
    local_world = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=local_world,
        ep_size=ep_size,
    )


def unlink_shm_buffer(rank: int) -> None:
    """Remove this rank's /dev/shm name of DeepSpeed's CPU all-reduce buffer (64 MiB).

    DeepSpeed never unlinks it, so every run would leave one file per rank in /dev/shm until
    the RAM-backed folder fills up; once all ranks have mapped it the mapping outlives the name.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    with contextlib.suppress(OSError):
        os.unlink(f"/dev/shm/{name}")


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def once_per_node(info: DistInfo, fn: Callable[[], T]) -> None:
    """Run `fn` on local rank 0 of every node while the others wait (e.g. data caching)."""
    if info.local_rank == 0:
        fn()
    barrier()


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean of each value over all ranks (one collective for the whole list)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def initialize(model: torch.nn.Module, ds_config: dict[str, Any]) -> Any:
    """deepspeed.initialize with optimizer and scheduler from ds_config.

    The ds_config optimizer gets MoE parameter groups automatically; expert-parallel and
    expert-data-parallel groups (`ep_size_{N}`) are created here. Frozen parameters
    (requires_grad False) are left out of the optimizer: they get no optimizer state.
    """
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    hide = ds_config["zero_optimization"]["stage"] in (1, 2) and experts_all_frozen(model)
    with zero_optimizer_without_moe() if hide else contextlib.nullcontext():
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=trainable, config=ds_config
        )
    return engine


def experts_all_frozen(model: torch.nn.Module) -> bool:
    """True for an MoE model none of whose local expert parameters train."""
    from moelab.moe import moe_ffns

    ffns = list(moe_ffns(model))
    return bool(ffns) and not any(
        p.requires_grad for ffn in ffns for p in ffn.local_experts.parameters()
    )


@contextlib.contextmanager
def zero_optimizer_without_moe() -> Iterator[None]:
    """Build the ZeRO 1/2 optimizer as for a dense model (all experts frozen).

    DeepSpeed's ZeRO 1/2 optimizer asserts a non-empty MoE parameter group whenever the
    model has MoE layers. With every expert frozen there is nothing to put in one: the
    trainable parameters are all data-parallel, which is what the dense optimizer reduces.
    The engine keeps `has_moe_layers` for everything else (expert checkpoint files, groups).
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._configure_zero_optimizer

    def dense(self: Any, optimizer: Any) -> Any:
        self.has_moe_layers = False
        try:
            return original(self, optimizer)
        finally:
            self.has_moe_layers = True

    DeepSpeedEngine._configure_zero_optimizer = dense
    try:
        yield
    finally:
        DeepSpeedEngine._configure_zero_optimizer = original


def expert_ranks_check(info: DistInfo) -> None:
    """Internal invariant: our ep_rank formula matches DeepSpeed's groups."""
    if info.ep_size <= 1:
        return
    from deepspeed.utils import groups

    got = groups._get_expert_parallel_rank(f"ep_size_{info.ep_size}")
    assert got == info.ep_rank, f"ep rank {got} != {info.ep_rank}"
