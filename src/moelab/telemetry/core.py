"""`Telemetry`: the one object the training loop talks to; it owns every train metric.

    tel = Telemetry(cfg, info, model, sink)
    ... every optimizer step: tel.begin_step(step); every micro-step: tel.on_micro_step(out);
        the guard's input: tel.step_loss(); after the update: tel.end_step(updated);
        eval and checkpoints inside `with tel.untimed():`
    tel.maybe_log(step, ds_engine)   # logging steps only: one collective, then the sink
    tel.close()

It owns the log cadence (`train.log_every` and the last step) and, per logging window, the
loss sums, the skipped steps, the perf counters and the MoE counters. At a logging step each
rank builds one float64 vector of all of them on its device and the ranks exchange it in one
`all_gather`; rank 0's sink logs the metrics read back from the gathered rows.

Time is measured per logging window, between two points where the device is synchronised
(the first step's start and the logging step), so it stays true on a GPU whose kernels run
ahead of the host; no step in between waits for the device on telemetry's behalf. Each
rank's own time (`perf.OwnClock`: the time it did not spend waiting for its peers) rides in the
same vector and names the slowest rank (`perf/slowest_rank`, `perf/straggler_lag`).

It runs the same code on every rank (collectives included); only the sink is rank-gated.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moelab.config import MoelabConfig
from moelab.engine import DistInfo, synchronize
from moelab.flops import flops_per_token
from moelab.rundir import RunDir
from moelab.telemetry import plots
from moelab.telemetry.experts import MoeTelemetry
from moelab.telemetry.losses import WIDTH, LossWindow, train_metrics
from moelab.telemetry.perf import OwnClock, Peak, device_peak, perf_metrics, straggler_metrics
from moelab.telemetry.sink import NullSink, Sink
from moelab.telemetry.sysmetrics import start_system_metrics


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def gather_rows(vec: torch.Tensor) -> torch.Tensor:
    """(world, n): every rank's vector, in one collective (just `vec` without a process group)."""
    dist = _dist()
    if dist is None:
        return vec.unsqueeze(0)
    rows = [torch.empty_like(vec) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, vec)
    return torch.stack(rows)


def version_tags() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    tags = {}
    for pkg in ("torch", "deepspeed", "transformers", "mlflow"):
        try:
            tags[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            tags[f"version.{pkg}"] = "missing"
    return tags


PERF_WIDTH = 4
"""Perf columns of the gathered vector: window seconds, steps, peak device memory (GiB), own
seconds (`OwnClock`)."""


class Telemetry:
    """Loss, perf, MoE and system telemetry of one rank, logged through the rank-gated `sink`."""

    def __init__(
        self, cfg: MoelabConfig, info: DistInfo, model: torch.nn.Module, sink: Sink
    ) -> None:
        t, self.tcfg, self.sink = cfg.train, cfg.telemetry, sink
        self.log_every, self.last_step = t.log_every, t.steps
        self.samples_per_step = t.micro_batch_size * t.grad_accum * info.world_size
        self.tokens_per_step = self.samples_per_step * cfg.data.seq_len
        self.world_size, self.device = info.world_size, next(model.parameters()).device
        self.enabled, self.run_dir = self.tcfg.enabled, Path(cfg.run_dir)
        self.seconds, self.steps, self.own_seconds = 0.0, 0, 0.0
        self.window_start: float | None = None  # perf_counter at the window's first step
        self.sample_start = 0.0  # perf_counter at the start of a sampled (MoE-timed) step
        self.history: list[tuple[int, torch.Tensor]] = []
        self.losses = LossWindow()
        self.bar: tqdm | None = None  # the progress bar, from the first step on
        self.show_progress = t.progress
        # No plots for a sink that drops them (other ranks' NullSink).
        self.writes = getattr(sink, "writes_artifacts", not isinstance(sink, NullSink))
        self.plot_dir = RunDir(self.run_dir).plots  # made by the first plot
        # Heatmaps are drawn and logged off the training thread (~50 ms each on a CPU core).
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moelab-plots")
        self.pending: list[Future[None]] = []
        self.moe: MoeTelemetry | None = None
        self.own: OwnClock | None = None  # the straggler measure
        self.monitor: Any = None
        if not self.enabled:
            return
        self.flops = flops_per_token(cfg.model, cfg.data.seq_len).training
        cache = self.tcfg.cpu_peak_cache or str(Path(cfg.data.cache_dir) / "peak_flops.json")
        self.peak = device_peak(t.precision, Path(cache), self.tcfg.peak_tflops, self.device)
        if cfg.model.is_moe:
            tokens = t.micro_batch_size * cfg.data.seq_len
            self.moe = MoeTelemetry(model, cfg.model.moe, tokens, info.ep_size, self.device)
        first_moe = next(iter(self.moe.impl.moe_ffns(model)), None) if self.moe else None
        self.own = OwnClock(model, first_moe, self.device)
        self._tags(info, self.peak)
        self._start_system_metrics(info)

    def _tags(self, info: DistInfo, peak: Peak) -> None:
        hosts = [socket.gethostname()]
        dist = _dist()
        if dist is not None:
            hosts = [""] * info.world_size
            dist.all_gather_object(hosts, socket.gethostname())
        tags = version_tags() | {
            "perf.peak_tflops": f"{peak.tflops:.4g}",
            "perf.peak_source": peak.source,
            "hostnames": ",".join(sorted(set(hosts))),
            "layout": f"world={info.world_size} local={info.local_world_size} "
            f"ep={info.ep_size} hosts={len(set(hosts))}",
            "telemetry.moe_timers": "layer+gate wall_clock_breakdown, backward a2a wrapped; "
            f"sampled every {self.tcfg.moe_timing_every or self.log_every} steps",
        }
        self.sink.set_tags(tags)

    def _start_system_metrics(self, info: DistInfo) -> None:
        if self.tcfg.system_metrics:
            self.monitor = start_system_metrics(
                info, self.tcfg.system_metrics_interval, self.run_dir, self.sink.mlflow_ready
            )

    def begin_step(self, step: int) -> None:
        """Before an optimizer step: start the window's clock (after a device sync) on its first
        step; time the MoE layers if this step is sampled."""
        if self.bar is None:  # the first step this process computes
            progress = self.sink.progress if self.show_progress else NullSink().progress
            self.bar = progress(self.last_step, step - 1)
        if self.window_start is None:
            synchronize(self.device)
            self.window_start = time.perf_counter()
        if self.moe is not None:
            self.moe.set_timing(self._sampled(step))
            if self.moe.timing:  # a sampled step is timed on its own too: the a2a fraction
                synchronize(self.device)
                self.sample_start = time.perf_counter()
        if self.own is not None:
            self.own.open()

    def _sampled(self, step: int) -> bool:
        every = self.tcfg.moe_timing_every
        if every:
            return step % every == 0
        return step % self.log_every == 0 or step == self.last_step

    def on_micro_step(self, out: Any) -> None:
        """After each training backward: the losses and the expert counts of every MoE layer
        (kept on the device)."""
        self.losses.on_micro_step(out)
        if self.moe is not None:
            self.moe.on_micro_step(getattr(out, "exp_counts", None))
        if self.own is not None:  # the next micro-step's own time starts here
            self.own.open()

    def step_loss(self) -> torch.Tensor:
        """The current step's summed loss on the device, for the non-finite guard."""
        return self.losses.step_loss()

    def end_step(self, updated: bool) -> None:
        """After each optimizer step (`updated`: False if the guard skipped it): count it and
        its losses; read the MoE timers of a sampled step."""
        self.steps += 1
        self.losses.end_step(updated)
        if self.moe is not None and self.moe.timing:
            synchronize(self.device)
            self.moe.on_step((time.perf_counter() - self.sample_start) * 1e3)
        if self.bar is not None:
            self.bar.update(1)

    @contextmanager
    def untimed(self) -> Iterator[None]:
        """Work inside a window that is not training (eval, checkpoints): its time is left out."""
        if self.window_start is None:
            yield
            return
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.window_start += time.perf_counter() - start

    def maybe_log(self, step: int, ds_engine: Any | None = None) -> dict[str, float]:
        """On logging steps (every rank): the metrics of the window ending at `step`, logged
        through the sink; else {}. `ds_engine` (DeepSpeed's; None for a bare model) adds the
        LR, gradient norm and fp16 loss scale."""
        if step % self.log_every and step != self.last_step:
            return {}
        synchronize(self.device)
        if self.window_start is not None:
            self.seconds = time.perf_counter() - self.window_start
        if self.own is not None:
            self.own_seconds = self.own.read_s()
        rows = gather_rows(self.window_vector()).cpu()
        metrics = self._collect(step, rows[:, WIDTH:]) if self.enabled else self._local_perf()
        metrics |= train_metrics(rows[:, :WIDTH], ds_engine)
        if self.bar is not None and "train/loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
        self.sink.log_metrics(metrics, step)
        self.seconds, self.steps, self.window_start = 0.0, 0, None
        self.losses.reset()
        return metrics

    def _local_perf(self) -> dict[str, float]:
        step_time = self.seconds / max(self.steps, 1)
        return {
            "perf/step_time_s": step_time,
            "perf/tokens_per_s": self.tokens_per_step / step_time if step_time else 0.0,
            "perf/samples_per_s": self.samples_per_step / step_time if step_time else 0.0,
        }

    def window_vector(self) -> torch.Tensor:
        """This rank's window as one float64 vector on its device (what `maybe_log` gathers):
        the loss part (`LossWindow.vector`), seconds, steps, peak device memory (GiB), own
        seconds, then the MoE part."""
        mem = 0.0
        if self.device.type == "cuda":  # the allocator's host-side counter: no device sync
            mem = torch.cuda.max_memory_allocated(self.device) / 2**30
        head = torch.tensor(
            [self.seconds, float(self.steps), mem, self.own_seconds],
            dtype=torch.float64,
            device=self.device,
        )
        parts = [self.losses.vector(self.device), head]
        return torch.cat(parts if self.moe is None else [*parts, self.moe.vector()])

    def _collect(self, step: int, rows: torch.Tensor) -> dict[str, float]:
        """Perf and MoE metrics from the gathered rows (the loss part cut off)."""
        step_time = float((rows[:, 0] / rows[:, 1].clamp_min(1)).max())
        metrics = perf_metrics(
            step_time,
            self.tokens_per_step,
            self.samples_per_step,
            self.flops,
            self.world_size,
            self.peak,
        )
        if self.device.type == "cuda":
            metrics["perf/device_mem_peak_gib"] = float(rows[:, 2].max())
        metrics |= straggler_metrics((rows[:, 3] / rows[:, 1].clamp_min(1)).tolist())
        if self.moe is not None:
            moe = self.moe.metrics(rows[:, PERF_WIDTH:])
            self._plots(step, moe.pop("_shares"))
            metrics |= moe
            self.moe.reset()
        return metrics

    def _plots(self, step: int, shares: torch.Tensor) -> None:
        self.history.append((step, shares))
        every = self.tcfg.heatmap_every
        previous = self.history[-2][0] if len(self.history) > 1 else 0
        if not (self.writes and every and step // every > previous // every):
            return
        layers = self.moe.layers if self.moe else []
        self.pending.append(self.pool.submit(self._heatmap, shares, layers, step))

    def _plot_path(self, name: str) -> Path:
        """Where rank 0 writes plot `name` (the run dir's plots/, made on first use)."""
        self.plot_dir.mkdir(parents=True, exist_ok=True)
        return self.plot_dir / name

    def _heatmap(self, shares: torch.Tensor, layers: list[int], step: int) -> None:
        path = self._plot_path(f"expert_load_step{step}.png")
        plots.load_heatmap(shares, layers, step, path)
        self.sink.log_artifact(path, "plots")

    def close(self) -> None:
        """Final plots, comms summary, stop the system-metrics thread (all ranks call it)."""
        if self.bar is not None:
            self.bar.close()
        for fut in self.pending:
            fut.result()
        self.pool.shutdown()
        if self.moe is not None:
            if self.writes and self.history:
                path = self._plot_path("expert_load_over_time.png")
                plots.load_over_time(self.history, self.moe.layers, path)
                self.sink.log_artifact(path, "plots")
            self.moe.close()
        if self.tcfg.comms_profile and _dist() is not None:
            self._comms_summary()
        if self.monitor is not None:
            self.monitor.finish()

    def _comms_summary(self) -> None:
        import json

        import deepspeed.comm

        summary = deepspeed.comm.log_summary(return_dict=True)  # synchronizes all ranks
        self.sink.log_text(json.dumps(summary, indent=1, default=str), "report/comms_summary.json")
