"""Training entry point, run on every rank by the deepspeed CLI.

deepspeed --no_local_rank --module moelab.train --config <run dir>/config.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch

from moelab import data, engine, finetune, hang, lifeline
from moelab.checkpoint import BatchStream, Checkpointer, StopFlag
from moelab.config import MoelabConfig, load_config, to_container
from moelab.guard import NonFiniteError, StepGuard, injected_slow_s
from moelab.models import build_model
from moelab.models.sizing import ParamCount, count_model_params
from moelab.rundir import RunDir
from moelab.runref import RunRefError
from moelab.telemetry import Sink, make_sink
from moelab.telemetry.core import Telemetry
from moelab.telemetry.sink import flatten
from moelab.telemetry.sysmetrics import warm_mlflow

RESUMED_TAG = "moelab.resumed_from_step"
OPTIMIZER_TAG = "moelab.resume_optimizer"


def forward_backward(
    ds_engine: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    tel: Telemetry,
    guard: StepGuard,
    step: int,
) -> None:
    """The grad_accum micro-steps of one optimizer step (DeepSpeed steps itself between them;
    the boundary step is the caller's). `tel` keeps their losses on the device."""
    for _ in range(ds_engine.gradient_accumulation_steps()):
        micro_step(ds_engine, next(batches), tel, guard, step)
        if not ds_engine.is_gradient_accumulation_boundary():
            ds_engine.step()


def micro_step(
    ds_engine: Any, batch: dict[str, torch.Tensor], tel: Telemetry, guard: StepGuard, step: int
) -> None:
    """Forward and backward of one micro-batch. The output (with its B x T x V logits) is freed
    on return, before the next micro-step's forward."""
    guard.straggle()
    ids = batch["input_ids"].to(ds_engine.device, non_blocking=True)  # (B, T), pinned on GPUs
    out = guard.inject(ds_engine(ids, labels=ids), step)
    ds_engine.backward(out.loss)
    tel.on_micro_step(out)


def train_step(
    ds_engine: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    tel: Telemetry,
    guard: StepGuard,
    stop: StopFlag,
    step: int,
) -> tuple[bool, bool]:
    """One optimizer step: whether the update ran (False if the guard skipped it) and whether
    any rank was asked to stop. One small all-reduce decides both on every rank alike."""
    forward_backward(ds_engine, batches, tel, guard, step)
    flags = torch.cat([guard.local_flags(ds_engine, tel.step_loss()), stop.local(ds_engine.device)])
    loss_bad, grad_bad, stopping = (bool(x) for x in engine.any_rank(flags).tolist())
    return guard.apply(ds_engine, loss_bad, grad_bad, step), stopping


@torch.no_grad()
def evaluate(ds_engine: Any, loader: Any, max_batches: int) -> dict[str, float]:
    """Mean held-out LM loss over all ranks."""
    ds_engine.eval()
    total, n = torch.zeros((), device=ds_engine.device), 0
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        ids = batch["input_ids"].to(ds_engine.device)
        total += ds_engine(ids, labels=ids).lm_loss.float()
        n += 1
    ds_engine.train()
    loss = float(engine.all_reduce_mean(total / max(n, 1)))
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}


def log_run_inputs(sink: Sink, cfg: MoelabConfig, run_dir: RunDir, params: ParamCount) -> None:
    """Params, sizes and config artifacts (rank 0's sink writes, others ignore)."""
    sink.log_params(flatten(to_container(cfg)))
    sink.set_tags({"params_total": str(params.total), "params_active": str(params.active)})
    sink.log_text(run_dir.config.read_text(), "config/resolved.yaml")
    sink.log_artifact(run_dir.ds_config, "config")


def run(cfg: MoelabConfig) -> None:
    """Build everything and train for cfg.train.steps optimizer steps."""
    t = cfg.train
    info = engine.init_distributed(cfg.ep_size, cfg.cluster.timeout_minutes)
    engine.set_threads(t.threads_per_rank, info.local_world_size)
    engine.set_matmul_precision(t.allow_tf32)
    run_dir = RunDir(cfg.run_dir)
    mlflow_warm = warm_mlflow(info, cfg.telemetry.system_metrics, run_dir.root)
    # Prepared before any rank started (python -m moelab.data): the ranks only load the cache.
    dsets, _ = data.load_prepared(cfg.data)
    engine.barrier()
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, info.ep_size, info.ep_rank, t.seed)
    tuning = finetune.freeze(model, finetune.parse_trainable(t.trainable), info.ep_size)
    # Counted before deepspeed.initialize: ZeRO-3 then partitions the parameters (numel 0).
    params = count_model_params(model, cfg.model, info.ep_size)
    ds_engine = engine.initialize(model, json.loads(run_dir.ds_config.read_text()))
    engine.expert_ranks_check(info)
    sink = make_sink(info.is_rank0, run_dir.root)
    log_run_inputs(sink, cfg, run_dir, params)
    sink.set_tags(tuning.tags() | engine.run_tags(ds_engine))
    tel = Telemetry(cfg, info, ds_engine.module, sink)
    ckpt = Checkpointer(cfg, info.world_size, info.ep_size, info.rank)
    state = ckpt.load(ds_engine)
    if state is None:  # a new run; a resumed one keeps its own weights
        state = {"step": 0, "data": {"epoch": 0, "consumed": 0}}
        finetune.load_init(ds_engine, t.init_from)
    else:
        note_resume(sink, info.is_rank0, state)
    mlflow_warm()
    with hang.watch(cfg, info.rank, info.world_size, sink, state["step"]) as dog:
        loop(cfg, info, ds_engine, dsets, sink, tel, ckpt, state, dog)
    tel.close()
    sink.close()


def note_resume(sink: Sink, is_rank0: bool, state: dict[str, Any]) -> None:
    """A resume, told apart from a restart: the MLflow tags and train.log lines (rank 0),
    also when the optimizer restarted (another ep_size)."""
    tag, step, optimizer = state["tag"], state["step"], state.get("optimizer")
    sink.set_tags({RESUMED_TAG: str(step)} | ({OPTIMIZER_TAG: optimizer} if optimizer else {}))
    if not is_rank0:
        return
    print(f"moelab: resumed from checkpoint {tag} at step {step}; next step {step + 1}", flush=True)
    if optimizer:
        print(
            f"moelab: optimizer {optimizer}: the weights, schedule and step carry over; the "
            "moments saved at another ep_size would not give the same updates, so they start anew",
            flush=True,
        )


def note_first_step(is_rank0: bool, step: int) -> None:
    """train.log names the first step each attempt (first run or resume) really computed."""
    if is_rank0:
        print(f"moelab: step {step} is the first this attempt computed", flush=True)


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
    dog: hang.Watchdog,
) -> None:
    """Train from the restored step to cfg.train.steps, or until stopped (with a checkpoint);
    `dog` learns of every finished step."""
    t, stop, first = cfg.train, StopFlag(cfg.run_dir), state["step"] + 1
    slow = injected_slow_s(t.inject_slow_rank, t.inject_slow_ms, info.rank)
    guard = StepGuard(t.skip_nonfinite, cfg.zero.stage, t.precision, t.inject_nonfinite_step, slow)
    batches, val_loader = loaders(cfg, info, dsets, state["data"])
    for step in range(first, t.steps + 1):
        dog.inject(step)
        tel.begin_step(step)
        updated, stopping = train_step(ds_engine, batches, tel, guard, stop, step)
        if step == first:
            note_first_step(info.is_rank0, step)
        tel.end_step(updated)
        tel.maybe_log(step, ds_engine)
        stopping = stopping or step == t.stop_after
        with tel.untimed():  # eval and checkpoints are not training throughput
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                sink.log_metrics(evaluate(ds_engine, val_loader, t.eval_batches), step)
            if ckpt.due(step, stopping):
                ckpt.save(ds_engine, step, batches)
        dog.pet(step)
        if stopping and step < t.steps:
            sink.set_tags({"moelab.stopped_at_step": str(step)})
            break


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="moelab rank entry point")
    parser.add_argument("--config", required=True, help="resolved config.yaml of the run")
    args = parser.parse_args(argv)
    lifeline.connect()
    code = 0
    try:
        run(load_config(args.config))
    except NonFiniteError as err:  # every rank raises alike; the last checkpoint is intact
        print(f"moelab: error: {err}", file=sys.stderr, flush=True)
        code = 3
    except RunRefError as err:  # rank 0: no MLflow run to log into; the launcher says why
        print(f"moelab: error: {err}", file=sys.stderr, flush=True)
        code = 1
    engine.exit_rank(code)


if __name__ == "__main__":
    main()
