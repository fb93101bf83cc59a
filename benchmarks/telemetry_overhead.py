"""Telemetry overhead: the tiny MoE top-2 model, telemetry off vs on, phases A B A B in one process.

Single rank, ep_size 1 (no all-to-all, so this measures the hooks, timers, counters, the
per-window reduction and the plots, not the comms logger). The logging interval is the
default `train.log_every`, heatmaps every `telemetry.heatmap_every`. Prints the step-time
ratio on/off and appends a JSON line to benchmarks/results/telemetry_overhead.jsonl.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/telemetry_overhead.py [--steps 100]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from moelab.config import MoelabConfig, TelemetryConfig
from moelab.engine import DistInfo
from moelab.models import build_model
from moelab.telemetry.core import Telemetry
from moelab.telemetry.perf import cpu_model
from moelab.telemetry.sink import NullSink

RESULTS = Path(__file__).resolve().parent / "results" / "telemetry_overhead.jsonl"


class MemorySink(NullSink):
    """Keeps what rank 0 would log (plots are drawn and saved, as on rank 0)."""

    writes_artifacts = True

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.artifacts: list[str] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append(metrics)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(str(path))


def base_config() -> MoelabConfig:
    from launcher.compose import compose_config, to_schema

    cfg = to_schema(compose_config(["model=tiny_moe_top2", "parallel=ep1"]))
    cfg.train = dataclasses.replace(cfg.train, micro_batch_size=4, grad_accum=1)
    return cfg


def phase(cfg: MoelabConfig, model: Any, opt: Any, steps: int, on: bool) -> tuple[float, float]:
    """Mean seconds per step (whole loop, telemetry calls included) and seconds of close().

    close() (end-of-run plot) happens once per run, so it is reported apart from the steps.
    """
    cfg.telemetry = dataclasses.replace(cfg.telemetry, enabled=on, system_metrics=False)
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, ep_size=1)
    sink = MemorySink()
    tel = Telemetry(cfg, info, model, sink)
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        tel.begin_step(step)
        ids = torch.randint(0, 4000, shape, generator=gen)
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tel.on_micro_step(out)
        tel.end_step(updated=True)
        tel.maybe_log(step)
    per_step = (time.perf_counter() - start) / steps
    t0 = time.perf_counter()
    tel.close()
    return per_step, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50, help="steps per phase")
    parser.add_argument("--rounds", type=int, default=6, help="A B rounds")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    cfg = base_config()
    cfg.train = dataclasses.replace(cfg.train, steps=args.steps)
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, 0, 0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    phase(cfg, model, opt, 10, on=False)  # warm-up
    phase(cfg, model, opt, 10, on=True)  # warm-up (and the CPU peak measurement, cached)
    off, on, close_s = [], [], []
    for _ in range(args.rounds):
        off.append(phase(cfg, model, opt, args.steps, on=False)[0])
        per_step, closing = phase(cfg, model, opt, args.steps, on=True)
        on.append(per_step)
        close_s.append(closing)
    ratio = statistics.median(b / a for a, b in zip(off, on, strict=True))
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": cfg.model.name,
        "ep_size": 1,
        "ranks": 1,
        "steps_per_phase": args.steps,
        "log_every": cfg.train.log_every,
        "heatmap_every": TelemetryConfig().heatmap_every,
        "off_s_per_step": off,
        "on_s_per_step": on,
        "ratio": ratio,
        "ratio_of_means": statistics.mean(on) / statistics.mean(off),
        "load_avg": os.getloadavg(),
        "close_s": close_s,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"telemetry on/off step-time ratio (median of A/B pairs): {ratio:.4f}")
    print(f"off {off}\non  {on}")
    print(f"one-off close() (end-of-run plot): {statistics.mean(close_s):.3f} s")


if __name__ == "__main__":
    main()
