"""Throughput, model TFLOP/s and MFU against the device's peak.

GPU peaks come from a table of vendor figures; on a CPU (or an unknown device) the peak is
measured once with a square fp32/bf16 matmul benchmark on this rank's threads and cached as
JSON keyed by CPU model, thread count and dtype.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

# Dense (no 2:4 sparsity) peak TFLOP/s per device from NVIDIA's datasheets:
# H100 SXM5 / H200 SXM: BF16/FP16 tensor 989.4 (1979 is the sparsity figure), FP32 66.9;
# H100 PCIe: BF16 756, FP32 51.2; A100 (SXM and PCIe): BF16 312 (624 sparse), FP32 19.5;
# A40: BF16 149.7 (299.4 sparse), FP32 37.4. "fp32" means plain FP32 (PyTorch's default
# matmul precision), not TF32.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "A40": {"bf16": 149.7, "fp16": 149.7, "fp32": 37.4},
}


@dataclass(frozen=True)
class Peak:
    """Peak TFLOP/s of one device at the run's precision, and where the figure comes from."""

    tflops: float
    source: str


def table_peak(device_name: str, precision: str) -> Peak | None:
    """Peak from GPU_PEAK_TFLOPS for a `torch.cuda.get_device_name()` string, if known."""
    name = device_name.upper()
    for key, peaks in GPU_PEAK_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if all(part.upper() in name for part in key.split()):
            return Peak(peaks[precision], f"table:{key}:{precision}")
    return None


def cpu_model() -> str:
    """CPU model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_tflops(n: int = 1024, repeats: int = 5, dtype: str = "fp32") -> float:
    """Best-of-`repeats` TFLOP/s of an n x n matmul with this process's torch threads."""
    import torch

    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a = torch.randn(n, n, dtype=tdtype)
    b = torch.randn(n, n, dtype=tdtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best / 1e12


def cpu_peak(cache_file: Path, threads: int, precision: str) -> Peak:
    """Measured CPU peak, cached in `cache_file` by CPU model + threads + dtype."""
    key = f"{cpu_model()}|threads={threads}|{precision}"
    cache: dict[str, float] = {}
    if cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    if key not in cache:
        cache[key] = measure_matmul_tflops(dtype=precision)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(cache_file)  # atomic: ranks measuring at once do not corrupt it
        return Peak(cache[key], f"measured:matmul:{key}")
    return Peak(cache[key], f"cached:matmul:{key}")


def device_peak(precision: str, cache_file: Path, override: float | None = None) -> Peak:
    """Peak TFLOP/s of this rank's device: override, GPU table, else measured matmul."""
    import torch

    if override:
        return Peak(override, "config")
    if torch.cuda.is_available():
        found = table_peak(torch.cuda.get_device_name(), precision)
        if found is not None:
            return found
    return cpu_peak(cache_file, torch.get_num_threads(), precision)


def perf_metrics(
    step_time_s: float,
    tokens_per_step: int,
    samples_per_step: int,
    flops_per_token: int,
    world_size: int,
    peak: Peak,
) -> dict[str, float]:
    """Global throughput, achieved model TFLOP/s per device and MFU for one window."""
    if step_time_s <= 0:
        return {"perf/step_time_s": 0.0}
    tokens_per_s = tokens_per_step / step_time_s
    tflops = flops_per_token * tokens_per_s / world_size / 1e12
    return {
        "perf/step_time_s": step_time_s,
        "perf/tokens_per_s": tokens_per_s,
        "perf/samples_per_s": samples_per_step / step_time_s,
        "perf/tflops_per_device": tflops,
        "perf/mfu": tflops / peak.tflops if peak.tflops > 0 else 0.0,
    }
