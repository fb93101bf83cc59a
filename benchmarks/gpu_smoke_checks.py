"""The GPU smoke test's verdicts: pure functions of logged figures (no torch, no launches).

Loss windows and their falling check, steady throughput, MFU and memory ratios, device tags,
and `check`, the one record every verdict becomes in the smoke's JSON.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

PASS, FAIL, NA_CPU, SKIPPED, INFO = "pass", "fail", "n/a on cpu", "skipped", "info"
STATUSES = (PASS, FAIL, NA_CPU, SKIPPED, INFO)
"""A check's status. `info`: a figure recorded without a target (no pass/fail)."""

TELEMETRY_MAX_RATIO = 1.03
"""Step time with telemetry on / off (steady tokens/s off / on)."""
MEMORY_TOLERANCE = 0.25
"""Measured peak device memory within +-25% of moelab-plan's per-device estimate."""
MFU_TOLERANCE = 0.02
"""Logged MFU against tokens/s x FLOPs/token / peak (relative)."""
FALL_SPAN = 5
"""Falling loss: mean loss over the last FALL_SPAN steps below that of the first FALL_SPAN."""
FP16_SCALE_POWER = 24
"""fp16 run: the loss scale starts at 2**24 (DeepSpeed's default 2**16) so that it overflows."""


def log_steps(steps: int, log_every: int) -> list[int]:
    """The steps at which the loop logs train metrics: every log_every-th and the last."""
    return [s for s in range(1, steps + 1) if s % log_every == 0 or s == steps]


def step_windows(points: Iterable[tuple[int, float]]) -> list[tuple[int, int, float]]:
    """(first step, last step, value) of each logging window: a value logged at step s is the
    mean over the steps since the previous logged step (train/loss is a window mean)."""
    out, prev = [], 0
    for step, value in sorted(dict(points).items()):
        out.append((prev + 1, step, value))
        prev = step
    return out


def span_mean(windows: Sequence[tuple[int, int, float]], lo: int, hi: int) -> float:
    """Step-weighted mean of the windows lying within steps lo..hi (NaN if none does)."""
    inside = [(end - start + 1, v) for start, end, v in windows if start >= lo and end <= hi]
    n = sum(k for k, _ in inside)
    return sum(k * v for k, v in inside) / n if n else math.nan


def loss_verdict(
    points: Sequence[tuple[int, float]], steps: int, log_every: int, span: int = FALL_SPAN
) -> dict[str, Any]:
    """Finite, complete (each logging step exactly once) and falling loss.

    Falling: the mean loss of the last `span` steps is below that of the first `span` steps
    (with log_every == span these are the first and the last logged values)."""
    logged = sorted(s for s, _ in points)
    expected = log_steps(steps, log_every)
    windows = step_windows(points)
    first = span_mean(windows, 1, span)
    last = span_mean(windows, steps - span + 1, steps)
    finite = bool(points) and all(math.isfinite(v) for _, v in points)
    complete = logged == expected
    falling = math.isfinite(first) and math.isfinite(last) and last < first
    problems = []
    if not finite:
        problems.append("no loss logged" if not points else "non-finite loss")
    if not complete:
        problems.append(f"logged steps {logged}, expected {expected} (each once)")
    if not falling:
        problems.append(f"not falling: first {span} steps {first:.4g}, last {span} {last:.4g}")
    return {
        "ok": finite and complete and falling,
        "finite": finite,
        "complete": complete,
        "falling": falling,
        "first_mean": first,
        "last_mean": last,
        "detail": "; ".join(problems),
    }


def steady(points: Iterable[tuple[int, float]], skip: Iterable[int] = ()) -> float:
    """Median of the logged values, leaving out the windows ending at `skip` (NaN if none)."""
    left = set(skip)
    values = [v for s, v in points if s not in left and math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def first_windows(launch_starts: Iterable[int], logged: Iterable[int]) -> list[int]:
    """The first logged step of each launch (`launch_starts`: the first step each one ran):
    it holds start-up effects, so steady figures leave it out."""
    steps = sorted(set(logged))
    return [next(s for s in steps if s >= start) for start in launch_starts if steps[-1] >= start]


def telemetry_ratio(tokens_on: float, tokens_off: float) -> float:
    """Step time with telemetry on over off: steady tokens/s off / on."""
    return tokens_off / tokens_on if tokens_on > 0 else math.nan


def expected_mfu(tokens_per_s: float, flops_per_token: float, world: int, peak: float) -> float:
    """MFU from throughput: model FLOP/s per device over the device's peak (TFLOP/s)."""
    return tokens_per_s * flops_per_token / world / (peak * 1e12) if peak > 0 else math.nan


def relative_gap(a: float, b: float) -> float:
    return abs(a / b - 1.0) if b and math.isfinite(a) and math.isfinite(b) else math.nan


def tag_verdict(tags: dict[str, str], device: str) -> dict[str, Any]:
    """The run ran where it should: accelerator and process-group backend of `device`
    (cuda: cuda/nccl; cpu: cpu/gloo), the rank's device and its parameters on it. A missing
    tag fails the check."""
    want = {"cuda": ("cuda", "nccl"), "cpu": ("cpu", "gloo")}[device]
    problems = []
    for key, value in zip(("accelerator", "dist_backend"), want, strict=True):
        got = tags.get(key)
        if got != value:
            problems.append(f"{key}={got!r}, expected {value!r}")
    for key in ("device", "params_device"):
        got = tags.get(key)
        if got is None and key == "params_device":
            got = tags.get("device")  # the rank's device, where its parameters are
        if got is None or not str(got).startswith(device):
            problems.append(f"{key}={got!r}, expected {device}[:N]")
    return {"ok": not problems, "detail": "; ".join(problems)}


def peak_source_expected(device_name: str | None, precision: str) -> str | None:
    """The `perf.peak_source` tag that a GPU in the datasheet table gets, e.g. table:h200:bf16."""
    if not device_name:
        return None
    try:
        from moelab.devices import device_key
    except ImportError:
        return None
    key = device_key(device_name)
    return f"table:{key}:{precision}" if key else None


def memory_ratio(peak_gib: float, plan_bytes: float) -> float:
    """Measured peak device memory over the planner's per-device estimate."""
    return peak_gib * 2**30 / plan_bytes if plan_bytes > 0 else math.nan


def count_overflows(log_text: str) -> int:
    """DeepSpeed's loss-scale overflow lines (rank 0 logs one per skipped fp16 step)."""
    return sum(1 for line in log_text.splitlines() if "OVERFLOW!" in line)


def check(
    name: str, status: str, value: Any = None, target: str = "", detail: str = ""
) -> dict[str, Any]:
    assert status in STATUSES, status
    return {
        "name": name,
        "status": status,
        "value": json_safe(value),
        "target": target,
        "detail": detail,
    }


def json_safe(value: Any) -> Any:
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
