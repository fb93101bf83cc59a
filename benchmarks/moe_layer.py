"""MoE layer cost: DeepSpeed's MoE layers forward+backward against a dense SwiGLU MLP with the
same active FLOPs (hidden = top_k x expert hidden), one process. Two implementations:
classic (deepspeed.moe through moelab.ds_moe.MoEFFN, capacity factor 1.25) and autoep
(DeepSpeed AutoEP through moelab.autoep.AutoEPFFN, dropless; moe_layer_autoep.py).

Grid: tokens per step x experts x top-k x (classic with drop_tokens on/off, autoep); per
cell the layer and the dense MLP are timed
alternately (A B A B) and the time ratio is the median of the per-pair ratios. Peak memory is
the growth of the bytes malloc has in use (glibc's mallinfo2, read after every aten op of one
fwd+bwd through a TorchDispatchMode; torch's CPU tensors are not seen by tracemalloc, and RSS
does not fall when a tensor is freed); gradients from the previous pass are dropped first.
Where the time ratio exceeds 1.3 (classic) or 1.15 (autoep) the MoE pass is profiled once
more with labelled phases (classic: gate, dispatch = _sparse_encode, experts, combine =
_sparse_decode; autoep: router, permute + combine, grouped experts; one process has no
all-to-all) and the top operators by self time are kept. A second table puts the two
implementations side by side per (tokens, experts, top-k).

    PYTHONPATH=src:. DS_ACCELERATOR=cpu .venv/bin/python benchmarks/moe_layer.py [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from benchlib import (
    RESULTS_DIR,
    append_jsonl,
    format_table,
    machine,
    median_ratio,
    note_end_load,
    progress,
    record,
)
from moe_layer_autoep import autoep_ffn
from moe_layer_autoep import profile_line as autoep_profile_line
from moe_layer_autoep import where_time_goes as autoep_where_time_goes
from moe_layer_report import (
    AUTOEP_TARGET,
    QUICK_FROM_TOKENS,
    Variant,
    classic_profile_line,
    expert_scaling,
    grid,
    impl_table,
    variant_label,
    variants,
)
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

from moelab import ds_moe as moelab_moe
from moelab import dscompat
from moelab.config import MoEConfig
from moelab.models.layers import SwiGLU

D_MODEL, EXPERT_HIDDEN = 256, 512
DEVICE, DTYPE = torch.device("cpu"), torch.float32
PROFILE_ABOVE = {"classic": 1.3, "autoep": AUTOEP_TARGET}


def init_single_process() -> None:
    """A world of one: drop_tokens=False all-reduces the capacity over the world."""
    import deepspeed
    from benchlib import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def build(experts: int, top_k: int, drop: bool, impl: str) -> tuple[nn.Module, nn.Module]:
    """The MoE FFN of `impl` (classic or autoep) and the dense SwiGLU of equal active FLOPs."""
    torch.manual_seed(0)
    if impl == "autoep":
        moe: nn.Module = autoep_ffn(D_MODEL, EXPERT_HIDDEN, experts, top_k)
    else:
        cfg = MoEConfig(num_experts=experts, top_k=top_k, drop_tokens=drop)
        moe = moelab_moe.MoEFFN(D_MODEL, SwiGLU(D_MODEL, EXPERT_HIDDEN), cfg, layer_idx=0).train()
    dense = SwiGLU(D_MODEL, top_k * EXPERT_HIDDEN).train()
    return moe.to(DEVICE, DTYPE), dense.to(DEVICE, DTYPE)


def moe_step(moe: nn.Module, x: torch.Tensor) -> None:
    moe.zero_grad(set_to_none=True)
    out, l_aux, _, _ = moe(x)
    (out.float().pow(2).mean() + l_aux).backward()


def dense_step(dense: nn.Module, x: torch.Tensor) -> None:
    dense.zero_grad(set_to_none=True)
    dense(x).float().pow(2).mean().backward()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost",
    )]  # fmt: skip


_LIBC = ctypes.CDLL(None)
_LIBC.mallinfo2.restype = _MallInfo2


def malloc_in_use() -> int:
    """Bytes the C allocator has handed out and not taken back (glibc >= 2.33): heap chunks in
    use plus mmapped chunks. Unlike RSS it falls when torch frees a tensor."""
    info = _LIBC.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class PeakAfterEachOp(TorchDispatchMode):
    """After every aten op (forward and backward: CPU autograd runs on the calling thread),
    note the bytes malloc has in use; the peak is exact at op granularity."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, malloc_in_use())
        return out


def peak_bytes(fn: Callable[[], None], module: nn.Module, x: torch.Tensor) -> int:
    """Peak growth of allocated memory during `fn` (one fwd+bwd of `module` on `x`) above the
    weights alone, gradients included: on a GPU torch.cuda's peak allocated bytes; on the CPU
    malloc's bytes in use after each op."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - before
    gc.collect()
    before = malloc_in_use()
    with PeakAfterEachOp() as mode:
        fn()
    return max(mode.peak, malloc_in_use()) - before


@contextmanager
def labelled_phases(moe: nn.Module) -> Iterator[None]:
    """record_function ranges around the gate, dispatch, experts and combine (forward)."""

    def wrap(fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        def inner(*a: Any, **k: Any) -> Any:
            with record_function(f"phase:{phase}"):
                return fn(*a, **k)

        return inner

    with dscompat.wrapped_moe_phases(moe.layer, wrap):
        yield


def where_time_goes(moe: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Forward phases (ms), backward (ms) and the top operators of one profiled MoE fwd+bwd."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with labelled_phases(moe), profile(activities=acts) as prof:
        with record_function("phase:forward"):
            out, l_aux, _, _ = moe(x)
            loss = out.float().pow(2).mean() + l_aux
        with record_function("phase:backward"):
            loss.backward()
    totals = {
        e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key.startswith("phase:")
    }
    phases = {k.split(":", 1)[1]: round(v, 2) for k, v in totals.items()}
    phases["all_to_all"] = 0.0  # one process: ep_size 1, no all-to-all runs
    ops = sorted(
        (e for e in prof.key_averages() if not e.key.startswith("phase:")),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    top = [[e.key, round(e.self_cpu_time_total / 1e3, 2)] for e in ops[:6]]
    return {"phases_ms": phases, "top_ops_self_ms": top}


def cell(tokens: int, experts: int, top_k: int, variant: Variant, reps: int) -> dict[str, Any]:
    impl, drop = variant
    moe, dense = build(experts, top_k, bool(drop), impl)
    x = torch.randn(1, tokens, D_MODEL, device=DEVICE, dtype=DTYPE, requires_grad=True)  # (B,T,D)
    run_moe, run_dense = (lambda: moe_step(moe, x)), (lambda: dense_step(dense, x))
    run_moe(), run_dense()  # warm-up
    t_moe, t_dense = [], []
    for _ in range(reps):
        t_moe.append(timed(run_moe))
        t_dense.append(timed(run_dense))
    ratio = median_ratio(t_moe, t_dense)
    mem_moe, mem_dense = peak_bytes(run_moe, moe, x), peak_bytes(run_dense, dense, x)
    out: dict[str, Any] = {
        "tokens": tokens,
        "experts": experts,
        "top_k": top_k,
        "impl": impl,
        "layer_class": type(moe.block if impl == "autoep" else moe.layer).__name__,
        "drop_tokens": drop,
        "moe_s": t_moe,
        "dense_s": t_dense,
        "time_ratio": ratio,
        "moe_peak_mb": mem_moe / 2**20,
        "dense_peak_mb": mem_dense / 2**20,
        "mem_ratio": mem_moe / mem_dense if mem_dense else float("nan"),
    }
    if ratio > PROFILE_ABOVE[impl]:
        out["profile"] = (
            autoep_where_time_goes(moe, x, run_moe)  # type: ignore[arg-type]
            if impl == "autoep"
            else where_time_goes(moe, x)
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", default="1024,4096,16384")
    p.add_argument("--experts", default="8,32,64")
    p.add_argument("--top-k", default="1,2", help="comma list of top-k")
    p.add_argument("--impls", default="classic,autoep", help="comma list: classic, autoep")
    p.add_argument("--drop", default="on,off", help="classic's drop_tokens settings: on, off")
    p.add_argument("--reps", type=int, default=3, help="A B pairs per cell")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"from {QUICK_FROM_TOKENS} tokens only top-2 with classic drop on and autoep",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--d-model", type=int, default=D_MODEL)
    p.add_argument("--expert-hidden", type=int, default=EXPERT_HIDDEN)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSONL goes")
    return p.parse_args(argv)


def row(c: dict[str, Any]) -> list[Any]:
    """One line of the per-cell table."""
    if "profile" not in c:
        prof = ""
    elif c["impl"] == "autoep":
        prof = autoep_profile_line(c["profile"])
    else:
        prof = classic_profile_line(c["profile"])
    label = variant_label(c["impl"], c["drop_tokens"])
    moe_ms, dense_ms = statistics.median(c["moe_s"]) * 1e3, statistics.median(c["dense_s"]) * 1e3
    return [c["tokens"], c["experts"], c["top_k"], label, moe_ms, dense_ms, c["time_ratio"],
            c["mem_ratio"], prof]  # fmt: skip


HEAD = ["tokens", "experts", "top_k", "layer", "MoE ms", "dense ms", "time ratio",
        "peak mem ratio", "where MoE time goes (classic > 1.3, autoep > 1.15)"]  # fmt: skip


def main() -> None:
    global DEVICE, DTYPE, D_MODEL, EXPERT_HIDDEN
    args = parse_args()
    cells_to_run = grid(
        args.tokens, args.experts, args.top_k, variants(args.impls, args.drop), args.quick
    )
    DEVICE = torch.device(args.device)
    DTYPE = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    D_MODEL, EXPERT_HIDDEN = args.d_model, args.expert_hidden
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    init_single_process()
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    env = machine(device) | {"threads": torch.get_num_threads(), "dtype": args.dtype}
    cells = []
    for i, (t, e, k, v) in enumerate(cells_to_run, 1):
        c = cell(t, e, k, v, args.reps)
        cells.append(c)
        progress(
            i,
            len(cells_to_run),
            f"tokens {t} experts {e} top-{k} {variant_label(*v)}: "
            f"time x{c['time_ratio']:.2f} memory x{c['mem_ratio']:.2f}",
        )
    note_end_load(env)
    table = format_table(HEAD, [row(c) for c in cells])
    side = impl_table(cells)
    experts_table = expert_scaling(cells)
    print(f"{table}\n\nLayer / dense time, implementations side by side:\n{side}")
    print(f"\nMoE fwd+bwd time vs experts at fixed tokens and top-k:\n{experts_table}")
    settings = {
        "d_model": D_MODEL,
        "expert_hidden": EXPERT_HIDDEN,
        "reps": args.reps,
        "capacity_factor": MoEConfig().capacity_factor,
        "quick": args.quick,
        "grid": {k: getattr(args, k) for k in ("tokens", "experts", "top_k", "impls", "drop")},
        "memory": "torch.cuda max_memory_allocated above the start"
        if DEVICE.type == "cuda"
        else "malloc bytes in use (mallinfo2) after each aten op of one fwd+bwd, above the "
        "weights (grads dropped first)",
    }
    result = {"settings": settings, "table": table, "impl_table": side}
    append_jsonl(
        args.results_dir / ("moe_layer_gpu.jsonl" if DEVICE.type == "cuda" else "moe_layer.jsonl"),
        record("moe_layer", result | {"experts_table": experts_table, "cells": cells}, env),
    )


if __name__ == "__main__":
    main()
