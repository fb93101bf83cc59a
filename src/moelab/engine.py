"""DeepSpeed engine and process groups on every rank.

The ds_config itself is built torch-free by `moelab.dsconfig` on the head node; this
module imports torch and deepspeed lazily and runs on the ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from moelab import dscompat, fastexit, shapes

REQUEUES_TAG = "moelab.requeues"
"""Times Slurm requeued the job this run lives in (cluster.slurm_requeue; unset if never)."""

if TYPE_CHECKING:
    import torch


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
        return shapes.ep_rank(self.rank, self.ep_size)


def set_threads(threads_per_rank: int, local_world_size: int) -> int:
    """Give each rank its share of the cores (2 ranks on 2 cores run ~5x slower otherwise)."""
    import torch

    n = shapes.threads_per_rank(os.cpu_count(), local_world_size, threads_per_rank)
    torch.set_num_threads(n)
    return n


def init_distributed(ep_size: int, timeout_minutes: int = 30) -> DistInfo:
    """Initialise torch.distributed the DeepSpeed way (gloo on CPU, NCCL on GPUs); a collective
    that waits longer than `timeout_minutes` on a peer fails instead of hanging. Refuses a
    DeepSpeed other than the supported one (`dscompat.check_deepspeed`)."""
    dscompat.check_deepspeed()
    dscompat.defer_mlflow_import()
    import deepspeed

    timeout = timedelta(minutes=timeout_minutes)
    # Under mpirun DeepSpeed rendezvouses on its default port unless told cluster.master_port.
    port = int(os.environ.get("MASTER_PORT", "29500"))
    deepspeed.init_distributed(timeout=timeout, distributed_port=port)
    import torch.distributed as dist

    # Groups made later (DeepSpeed's expert-parallel ones) get torch's default, not the world's.
    dscompat.set_default_group_timeout(timeout)

    from deepspeed.accelerator import get_accelerator

    # Before the first collective: NCCL binds a rank to its current device.
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.barrier()  # every rank has mapped the others' shared-memory buffers
    dscompat.unlink_shm_buffer(dist.get_rank())
    if dist.get_rank() == 0:
        got = dscompat.process_group_timeout()
        shown = f"{got.total_seconds() / 60:g}" if got else f"{timeout_minutes} (requested)"
        print(f"moelab: process-group timeout {shown} min", flush=True)
    local_world = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=local_world,
        ep_size=ep_size,
    )


def exit_rank(code: int) -> NoReturn:
    """End this rank: its process groups and MPI (mpirun counts a rank that exits without
    MPI_Finalize as failed; mpi4py would call it only in the teardown skipped here), then the
    process without the interpreter's teardown (`fastexit`), which DeepSpeed's launcher would
    wait out for every rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    mpi = sys.modules.get("mpi4py.MPI")  # DeepSpeed's MPI discovery under mpirun imports it
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    fastexit.exit_now(code)


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over all ranks of a tensor on the engine's device (one collective, no host read)."""
    import torch
    import torch.distributed as dist

    out = values.to(torch.float64, copy=True)  # the caller's tensor is left as it was
    dist.all_reduce(out)
    return out / dist.get_world_size()


def any_rank(flags: torch.Tensor) -> torch.Tensor:
    """Each 0/1 flag ORed over all ranks, in place: one MAX all-reduce on the flags' device.
    The training loop's only per-step collective: it folds every per-step decision into it."""
    import torch.distributed as dist

    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU, whose ops finish before they return)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def initialize(model: torch.nn.Module, ds_config: dict[str, Any]) -> Any:
    """deepspeed.initialize with optimizer and scheduler from ds_config.

    The ds_config optimizer gets MoE parameter groups automatically; expert-parallel and
    expert-data-parallel groups (`ep_size_{N}`) are created here. Frozen parameters
    (requires_grad False) are left out of the optimizer: they get no optimizer state.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    trainable = [p for p in model.parameters() if p.requires_grad]
    hide = ds_config["zero_optimization"]["stage"] in (1, 2) and experts_all_frozen(model)
    ds_config = pick_optimizer(ds_config, get_accelerator().device_name())
    dscompat.skip_muon_import()
    with dscompat.zero_optimizer_without_moe() if hide else contextlib.nullcontext():
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=trainable, config=ds_config
        )
    return engine


def pick_optimizer(
    ds_config: dict[str, Any], device_type: str, cpu_adam: Callable[[], bool] | None = None
) -> dict[str, Any]:
    """ds_config with the AdamW implementation for this rank's device (a copy).

    The launcher renders torch's AdamW (`torch_adam`), which runs anywhere. On a GPU it becomes
    torch's fused AdamW (one kernel per step, no op to build). With optimizer offload it
    becomes DeepSpeedCPUAdam (DeepSpeed's choice when `torch_adam` is off) if that op builds
    here; torch's AdamW would be a slow Python loop over CPU tensors.
    """
    out = json.loads(json.dumps(ds_config))
    params = out["optimizer"]["params"]
    if "offload_optimizer" in out["zero_optimization"]:
        params["torch_adam"] = not (cpu_adam or cpu_adam_builds)()
    elif device_type == "cuda":
        params["fused"] = True
    return out


def cpu_adam_builds() -> bool:
    """Whether DeepSpeed's CPU Adam op is prebuilt or JIT-compiles here (cached once built)."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        builder = CPUAdamBuilder()
        if not builder.is_compatible(verbose=False):
            return False
        builder.load(verbose=False)
    except Exception:  # any build failure (no compiler, no headers) means: use torch's
        return False
    return True


def optimizer_name(ds_engine: Any) -> str:
    """The optimizer class DeepSpeed built, e.g. `torch.optim.adamw.AdamW(fused)`."""
    opt = getattr(ds_engine, "basic_optimizer", None) or ds_engine.optimizer
    cls = type(opt)
    fused = bool(getattr(opt, "defaults", {}).get("fused"))
    return f"{cls.__module__}.{cls.__qualname__}" + ("(fused)" if fused else "")


def run_tags(ds_engine: Any) -> dict[str, str]:
    """Where this rank ran: device, DeepSpeed accelerator, process-group backend, optimizer;
    in a Slurm job that was requeued, how often (`moelab.requeues`, Slurm's restart count)."""
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    device = torch.device(ds_engine.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": str(device),
        "device_name": name,
        "accelerator": get_accelerator().device_name(),
        "dist_backend": str(dist.get_backend()),
        "params_device": str(next(ds_engine.module.parameters()).device),
        "moelab.optimizer": optimizer_name(ds_engine),
    } | ({REQUEUES_TAG: restarts} if (restarts := os.environ.get("SLURM_RESTART_COUNT")) else {})


def experts_all_frozen(model: torch.nn.Module) -> bool:
    """True for an MoE model none of whose local expert parameters train."""
    from moelab.moe_impls import all_moe_ffns

    ffns = list(all_moe_ffns(model))
    return bool(ffns) and not any(p.requires_grad for ffn in ffns for p in ffn.expert_params())


def expert_ranks_check(info: DistInfo) -> None:
    """Internal invariant: our ep_rank formula matches DeepSpeed's groups."""
    if info.ep_size <= 1:
        return
    got = dscompat.expert_parallel_rank(info.ep_size)
    assert got == info.ep_rank, f"ep rank {got} != {info.ep_rank}"


def set_matmul_precision(allow_tf32: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions (Ampere+ GPUs; CPU matmuls are unaffected)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
