"""What the MoE layers' all-to-alls and timed phases did, for both MoE implementations.

Process-wide, training passes only (eval passes are left out). `sent` counts the bytes this
rank sends to the other ranks of the expert-parallel group, forward and backward, from the
tensors' shapes or the split sizes (Python ints: no device sync). Times are kept per MoE
layer and phase on sampled steps only: wall time on the CPU, CUDA events on a GPU (read, and
so synchronised, once per sampled step by `read_ms`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch


class MoEClock:
    """Process-wide all-to-all bytes and per-(layer, phase) times of sampled steps."""

    layer: ClassVar[int | None] = None  # block index of the MoE layer in a training forward
    active: ClassVar[bool] = False  # time phases (sampled steps)
    sent: ClassVar[int] = 0
    seconds: ClassVar[dict[tuple[int, str], float]] = {}
    events: ClassVar[list[tuple[int, str, Any, Any]]] = []  # CUDA (layer, phase, start, end)


def bytes_to_others(group: Any, tensor: torch.Tensor) -> int:
    """Bytes of `tensor` an equal-split all-to-all over `group` sends to other ranks."""
    n = torch.distributed.get_world_size(group)
    return tensor.numel() * tensor.element_size() * (n - 1) // n


def rows_to_others(group: Any, splits: list[int], row: torch.Tensor) -> int:
    """Bytes a variable-split all-to-all sends to other ranks: every split but this rank's,
    of rows like `row` (one row's elements x element size)."""
    own = splits[torch.distributed.get_rank(group)]
    return (sum(splits) - own) * row[0].numel() * row.element_size()


Mark = tuple[int, str, Any]
"""A started measurement: (layer, phase, CUDA start event or perf_counter seconds)."""


def start(layer: int | None, phase: str, device: torch.device) -> Mark | None:
    """Start timing (layer, phase) when timing is on; None (nothing to stop) otherwise."""
    if layer is None or not MoEClock.active:
        return None
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return layer, phase, event
    return layer, phase, time.perf_counter()


def stop(mark: Mark | None) -> None:
    """Add the time since `start` to its (layer, phase)."""
    if mark is None:
        return
    layer, phase, begun = mark
    if isinstance(begun, float):
        key = (layer, phase)
        MoEClock.seconds[key] = MoEClock.seconds.get(key, 0.0) + time.perf_counter() - begun
        return
    end = torch.cuda.Event(enable_timing=True)
    end.record()
    MoEClock.events.append((layer, phase, begun, end))


@contextmanager
def timed(layer: int | None, phase: str, device: torch.device) -> Iterator[None]:
    """Adds the time of the block to (layer, phase) when timing is on (a no-op otherwise)."""
    mark = start(layer, phase, device)
    yield
    stop(mark)


def read_ms() -> dict[int, dict[str, float]]:
    """Block index -> {phase: ms} since the last read, then reset (syncs CUDA events)."""
    ms: dict[int, dict[str, float]] = {}
    for (layer, phase), s in MoEClock.seconds.items():
        row = ms.setdefault(layer, {})
        row[phase] = row.get(phase, 0.0) + s * 1000.0
    for layer, phase, start, end in MoEClock.events:
        end.synchronize()
        row = ms.setdefault(layer, {})
        row[phase] = row.get(phase, 0.0) + float(start.elapsed_time(end))
    MoEClock.seconds, MoEClock.events = {}, []
    return ms


def a2a_bytes_sent() -> int:
    """Bytes this process has sent to other ranks in the all-to-alls of training passes
    (forward and backward, every MoE layer) since it started; never reset."""
    return MoEClock.sent
