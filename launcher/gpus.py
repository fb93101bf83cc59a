"""The GPUs this host offers its local ranks, found without importing torch (launcher side).

`nvidia-smi -L` counts the host's GPUs; CUDA_VISIBLE_DEVICES (set by the user or by Slurm)
narrows them to the devices it names, by physical index. DS_ACCELERATOR naming another
accelerator (`cpu`, ...) means no GPU, as it does for DeepSpeed. Measured on a CPU-only
machine: importing torch to ask `torch.cuda.device_count()` costs ~1.5 s, the probe below
nothing when `nvidia-smi` is absent.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

CPU_RANKS = 2
"""Local ranks on a host without GPUs (CPU processes)."""


@functools.cache
def _smi_gpu_count() -> int:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        proc = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if proc.returncode != 0:
        return 0
    return sum(line.startswith("GPU ") for line in proc.stdout.splitlines())


def gpu_count() -> int:
    """GPUs of this host (0 without a driver, or when DS_ACCELERATOR is not cuda)."""
    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        return 0
    return _smi_gpu_count()


def visible(count: int, cuda_visible_devices: str | None) -> list[str]:
    """Device ids the local ranks may use: none without GPUs, else the entries of
    CUDA_VISIBLE_DEVICES as given (physical indices), else every GPU of the host."""
    if count == 0:
        return []
    if cuda_visible_devices is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in cuda_visible_devices.split(",") if d.strip()]


def local_gpus() -> list[str]:
    """`visible` for this host and this environment."""
    return visible(gpu_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))


def not_indices(ids: list[str], count: int) -> list[str]:
    """Entries that are not the index of one of `count` GPUs (DeepSpeed selects by index)."""
    return [d for d in ids if not d.isdigit() or int(d) >= count]


def auto_ranks(gpus: int) -> int:
    """Local ranks for cluster.nproc_per_node=0: one per visible GPU, else CPU_RANKS."""
    return gpus if gpus > 0 else CPU_RANKS
