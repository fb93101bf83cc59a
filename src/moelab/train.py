"""Training entry point, run on every rank by the deepspeed CLI.

deepspeed --no_local_rank --module moelab.train --config <run dir>/config.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moelab import data, engine, finetune, lifeline
from moelab.checkpoint import BatchStream, Checkpointer, StopFlag
from moelab.config import MoelabConfig, load_config, to_container
from moelab.guard import NonFiniteError, StepGuard
from moelab.models import build_model
from moelab.models.sizing import ParamCount, count_model_params
from moelab.telemetry import Sink, make_sink
from moelab.telemetry.core import Telemetry
from moelab.telemetry.sink import flatten


@dataclass
class Window:
    """Running sums between two metric logs."""

    loss: float = 0.0
    lm_loss: float = 0.0
    aux_loss: float = 0.0
    z_loss: float = 0.0
    micro_steps: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, out: Any) -> None:
        self.loss += float(out.loss.detach())
        self.lm_loss += float(out.lm_loss.detach())
        self.aux_loss += float(out.aux_loss.detach())
        self.z_loss += float(out.z_loss.detach())
        self.micro_steps += 1


def train_step(
    ds_engine: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    window: Window,
    tel: Telemetry,
    nonfinite: StepGuard,
    step: int,
) -> None:
    """One optimizer step: grad_accum micro-steps; DeepSpeed steps at the boundary, unless
    the loss or gradients are not finite (then NonFiniteError, or a skipped update)."""
    outs = []
    for _ in range(ds_engine.gradient_accumulation_steps()):
        ids = next(batches)["input_ids"].to(ds_engine.device)  # (B, T)
        out = nonfinite.inject(ds_engine(ids, labels=ids), step)
        ds_engine.backward(out.loss)
        tel.on_micro_step(out)
        outs.append(out)
        if not ds_engine.is_gradient_accumulation_boundary():
            ds_engine.step()
    if nonfinite.step(ds_engine, [float(o.loss.detach()) for o in outs], step):
        for out in outs:
            window.add(out)


@torch.no_grad()
def evaluate(ds_engine: Any, loader: Any, max_batches: int) -> dict[str, float]:
    """Mean held-out LM loss over all ranks."""
    ds_engine.eval()
    total, n = 0.0, 0
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        ids = batch["input_ids"].to(ds_engine.device)
        total += float(ds_engine(ids, labels=ids).lm_loss)
        n += 1
    ds_engine.train()
    (loss,) = engine.all_reduce_mean([total / max(n, 1)], ds_engine.device)
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}


def window_metrics(w: Window, ds_engine: Any) -> dict[str, float]:
    """Loss metrics of one logging window, averaged over micro-steps and ranks."""
    if w.micro_steps == 0:  # every step of the window was skipped (alike on all ranks)
        return {"train/lr": ds_engine.get_lr()[0]}
    n = w.micro_steps
    loss, lm, aux, z = engine.all_reduce_mean(
        [w.loss / n, w.lm_loss / n, w.aux_loss / n, w.z_loss / n], ds_engine.device
    )
    grad_norm = ds_engine.get_global_grad_norm()
    metrics = {
        "train/loss": loss,
        "train/lm_loss": lm,
        "train/aux_loss": aux,
        "train/z_loss": z,
        "train/lr": ds_engine.get_lr()[0],
    }
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    return metrics


def log_run_inputs(sink: Sink, cfg: MoelabConfig, run_dir: Path, params: ParamCount) -> None:
    """Params, sizes and config artifacts (rank 0's sink writes, others ignore)."""
    sink.log_params(flatten(to_container(cfg)))
    sink.set_tags({"params_total": str(params.total), "params_active": str(params.active)})
    sink.log_text((run_dir / "config.yaml").read_text(), "config/resolved.yaml")
    sink.log_artifact(run_dir / "ds_config.json", "config")


def prepare(cfg: MoelabConfig, world_size: int) -> None:
    """Tokenize and cache the corpus; fail with one sentence if it cannot feed this run."""
    prepared = data.prepare_data(cfg.data)
    if prepared.vocab_size > cfg.model.padded_vocab_size:
        data.check_vocab(data.load_prepared(cfg.data)[1], cfg.model.padded_vocab_size)
    data.ensure_enough(prepared, cfg.train.micro_batch_size, world_size)


def run(cfg: MoelabConfig) -> None:
    """Build everything and train for cfg.train.steps optimizer steps."""
    t = cfg.train
    info = engine.init_distributed(cfg.ep_size)
    engine.set_threads(t.threads_per_rank, info.local_world_size)
    engine.once_per_node(info, lambda: prepare(cfg, info.world_size))
    dsets, _ = data.load_prepared(cfg.data)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, info.ep_size, info.ep_rank, t.seed)
    tuning = finetune.freeze(model, finetune.parse_trainable(t.trainable), info.ep_size)
    run_dir = Path(cfg.run_dir)
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    ds_engine = engine.initialize(model, ds_config)
    engine.expert_ranks_check(info)
    sink = make_sink(info.is_rank0, run_dir)
    log_run_inputs(sink, cfg, run_dir, count_model_params(model, cfg.model, info.ep_size))
    sink.set_tags(tuning.tags())
    tel = Telemetry(cfg, info, ds_engine.module, sink)
    ckpt = Checkpointer(cfg, info.world_size, info.ep_size, info.rank)
    state = ckpt.load(ds_engine) or {"step": 0, "data": {"epoch": 0, "consumed": 0}}
    if state["step"] == 0:  # a resumed run keeps its own weights
        finetune.load_init(ds_engine, t.init_from)
    loop(cfg, info, ds_engine, dsets, sink, tel, ckpt, state)
    tel.close()
    sink.close()


def loaders(
    cfg: MoelabConfig, info: engine.DistInfo, dsets: Any, position: dict[str, int]
) -> tuple[BatchStream, Any]:
    """The training stream (at the restored data position) and the validation loader."""
    t = cfg.train

    def build(split: str, shuffle: bool) -> Any:
        return data.build_loader(
            dsets[split], t.micro_batch_size, info.rank, info.world_size, t.seed, shuffle=shuffle
        )

    return BatchStream(build("train", True), **position), build("validation", False)


def loop(
    cfg: MoelabConfig,
    info: engine.DistInfo,
    ds_engine: Any,
    dsets: Any,
    sink: Sink,
    tel: Telemetry,
    ckpt: Checkpointer,
    state: dict[str, Any],
) -> None:
    """Train from the restored step to cfg.train.steps, or until stopped (with a checkpoint)."""
    t, flag, first = cfg.train, StopFlag(cfg.run_dir), state["step"] + 1
    nonfinite = StepGuard(t.skip_nonfinite, cfg.zero.stage, t.inject_nonfinite_step)
    batches, val_loader = loaders(cfg, info, dsets, state["data"])
    window, bar = Window(), sink.progress(t.steps, first - 1)
    for step in range(first, t.steps + 1):
        start = time.perf_counter()
        train_step(ds_engine, batches, window, tel, nonfinite, step)
        tel.on_step(time.perf_counter() - start)  # train steps only: eval is not timed
        bar.update(1)
        window = log_window(tel, step, window, ds_engine, sink, bar, nonfinite)
        if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
            sink.log_metrics(evaluate(ds_engine, val_loader, t.eval_batches), step)
        stopping = flag.any_rank(ds_engine.device) or step == t.stop_after
        if ckpt.due(step, stopping):
            ckpt.save(ds_engine, step, batches)
        if stopping and step < t.steps:
            sink.set_tags({"moelab.stopped_at_step": str(step)})
            break
    bar.close()


def log_window(
    tel: Telemetry,
    step: int,
    window: Window,
    ds_engine: Any,
    sink: Sink,
    bar: Any,
    nonfinite: StepGuard,
) -> Window:
    """Log the window's metrics on logging steps (collectives: all ranks); the next window."""
    metrics = tel.maybe_log(step)  # {} except on logging steps
    if not metrics:
        return window
    metrics |= window_metrics(window, ds_engine) | nonfinite.metrics()
    if "train/loss" in metrics:  # not when every step of the window was skipped
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
    sink.log_metrics(metrics, step)
    return Window()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="moelab rank entry point")
    parser.add_argument("--config", required=True, help="resolved config.yaml of the run")
    args = parser.parse_args(argv)
    lifeline.connect()
    try:
        run(load_config(args.config))
    except NonFiniteError as err:  # every rank raises alike; the last checkpoint is intact
        print(f"moelab: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None


if __name__ == "__main__":
    main()
