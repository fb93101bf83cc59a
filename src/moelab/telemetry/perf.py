"""Throughput, model TFLOP/s and MFU against the device's peak.

A GPU's peak comes from the datasheet table in `moelab.devices`; a GPU not in the table is
measured once with a bf16/fp16/fp32 square matmul on that GPU, and a CPU with one on this
rank's threads. Measurements are cached as JSON: a GPU's by device name and dtype, a CPU's by
CPU model, thread count and dtype.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelab.devices import DEVICES, device_key

GPU_MATMUL_N = 8192
"""Side of the square matmul that measures an unknown GPU (1.1 TFLOP per product)."""


@dataclass(frozen=True)
class Peak:
    """Peak TFLOP/s of one device at the run's precision, and where the figure comes from."""

    tflops: float
    source: str


def table_peak(device_name: str, precision: str) -> Peak | None:
    """Datasheet peak for a `torch.cuda.get_device_name()` string, if the table has it."""
    key = device_key(device_name)
    if key is None:
        return None
    return Peak(DEVICES[key].tflops[precision], f"table:{key}:{precision}")


def cpu_model() -> str:
    """CPU model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_tflops(
    n: int = 1024, repeats: int = 5, dtype: str = "fp32", device: Any = "cpu"
) -> float:
    """Best-of-`repeats` TFLOP/s of an n x n matmul on `device` (a CPU: this process's threads)."""
    import torch

    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    dev = torch.device(device)
    a = torch.randn(n, n, dtype=tdtype, device=dev)
    b = torch.randn(n, n, dtype=tdtype, device=dev)

    def sync() -> None:  # CUDA kernels are asynchronous: time them to completion
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    torch.mm(a, b)  # warm-up (cuBLAS picks its kernel, the clocks ramp up)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        sync()
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best / 1e12


def cached_peak(cache_file: Path, key: str, what: str, measure: Callable[[], float]) -> Peak:
    """`measure()` once per `key` in the JSON `cache_file`; the source says which happened."""
    cache: dict[str, float] = {}
    if cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    if key in cache:
        return Peak(cache[key], f"cached:{what}:{key}")
    cache[key] = measure()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    tmp.replace(cache_file)  # atomic: ranks measuring at once do not corrupt it
    return Peak(cache[key], f"measured:{what}:{key}")


def cpu_peak(cache_file: Path, threads: int, precision: str) -> Peak:
    """Measured CPU peak, cached in `cache_file` by CPU model + threads + dtype."""
    key = f"{cpu_model()}|threads={threads}|{precision}"
    return cached_peak(cache_file, key, "matmul", lambda: measure_matmul_tflops(dtype=precision))


def gpu_peak(
    device_name: str, precision: str, cache_file: Path, device: Any, n: int = GPU_MATMUL_N
) -> Peak:
    """A GPU's datasheet peak; a GPU not in the table is measured on `device`, cached by name."""
    found = table_peak(device_name, precision)
    if found is not None:
        return found

    def measure() -> float:
        return measure_matmul_tflops(n, dtype=precision, device=device)

    return cached_peak(cache_file, f"{device_name}|{precision}", "cuda-matmul", measure)


def device_peak(
    precision: str, cache_file: Path, override: float | None = None, device: Any = None
) -> Peak:
    """Peak TFLOP/s of this rank's device: override, GPU (table or measured), else CPU.

    `device` defaults to the current CUDA device when CUDA is available, else the CPU.
    """
    import torch

    if override:
        return Peak(override, "config")
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is not None and torch.device(device).type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), precision, cache_file, device)
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


class OwnClock:
    """This rank's own time per logging window: the straggler measure (`straggler_metrics`).

    A span opens where the rank's step starts (`open`: at the step's start and after each
    micro-step's backward, the points where the ranks last waited for each other) and closes
    where its micro-step first waits for its peers: the entry of the first MoE layer, whose
    all-to-all needs every rank of the group, or the end of a dense model's forward (the
    gradient reduction follows in the backward). The time between is the rank's alone. Wall
    time on a CPU; CUDA events on a GPU, read (synchronised) once per window by `read_s`, so a
    slow device and a host that feeds its device late both count.
    """

    def __init__(self, model: Any, first_moe: Any | None, device: Any) -> None:
        self.cuda = device.type == "cuda"
        self.mark: Any = None  # the open span's start: perf_counter seconds or a CUDA event
        self.seconds = 0.0
        self.events: list[tuple[Any, Any]] = []
        if first_moe is not None:
            first_moe.register_forward_pre_hook(lambda mod, _: self._close(mod.training))
        else:
            model.register_forward_hook(lambda mod, _, __: self._close(mod.training))

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def open(self) -> None:
        """A span starts (a previous open span that never closed is dropped)."""
        self.mark = self._now()

    def _close(self, training: bool) -> None:
        # Eval forwards, and recomputed forwards of activation checkpointing, find no open span.
        if not training or self.mark is None:
            return
        end, start, self.mark = self._now(), self.mark, None
        if self.cuda:
            self.events.append((start, end))
        else:
            self.seconds += end - start

    def read_s(self) -> float:
        """Own seconds since the last read (waits for the window's CUDA events), then reset."""
        total = self.seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1e3
        self.seconds, self.events, self.mark = 0.0, [], None
        return float(total)


def straggler_metrics(own_s: list[float]) -> dict[str, float]:
    """`perf/slowest_rank` and `perf/straggler_lag` from each rank's own time (`OwnClock`) per
    step, indexed by global rank; {} for a single rank.

    - `perf/slowest_rank`: the global rank with the most own time (the lowest such rank on a tie).
    - `perf/straggler_lag`: its own time over the median rank's, minus 1 (0.25: 25 % slower);
      with an even number of ranks the median rank is the lower of the two middle ones, so with
      two ranks it is the other rank. 0 when the median rank measured no own time.
    """
    if len(own_s) < 2:
        return {}
    slowest = max(range(len(own_s)), key=lambda r: (own_s[r], -r))
    median = sorted(own_s)[(len(own_s) - 1) // 2]
    lag = own_s[slowest] / median - 1 if median > 0 else 0.0
    return {"perf/slowest_rank": float(slowest), "perf/straggler_lag": lag}
