"""One real 2-rank ep2 MoE training run and its export, run once per session: the
uninterrupted reference of the preemption tests, and the trained model of test_export,
test_eval and test_routing (import the fixtures from here)."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import run_launcher

STEPS = 30  # enough for the SIGTERM test to see a checkpoint, signal, and stop before the end
RUN = (
    "model=tiny_moe_top2",
    "zero=stage2",
    "parallel=ep2",
    "train=smoke",
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=0",  # eval only at the last step (the loop always evaluates there)
    "train.checkpoint_every=5",
)
"""The preemption tests' run; interrupted and resumed, it must end as REFERENCE_RUN does."""
REFERENCE_RUN = (*RUN, f"train.eval_every={STEPS // 2}")
"""RUN plus an eval half-way: matching the preemption runs (which evaluate at the last step
only) shows that evaluating does not change training."""


@dataclass(frozen=True)
class TrainedMoE:
    workdir: Path
    run_dir: Path
    cache: Path
    hf_dir: Path


_RUNS: dict[str, TrainedMoE] = {}  # one run per session, whichever test module asks first


def _train(workdir: Path, cache: Path) -> TrainedMoE:
    proc = run_launcher(workdir, cache, *REFERENCE_RUN)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (run_dir,) = (workdir / "runs" / "moelab").iterdir()
    _remove_shm_buffers(run_dir)
    assert json.loads((run_dir / "checkpoints" / "meta.json").read_text())["ep_size"] == 2
    from moelab.export import export

    hf_dir = export(run_dir, workdir / "hf")
    return TrainedMoE(workdir, run_dir, cache, hf_dir)


def _remove_shm_buffers(run_dir: Path) -> None:
    """DeepSpeed's CPU all-reduce leaves /dev/shm buffers named by the run's master port."""
    port = re.search(r"master_port=(\d+)", (run_dir / "command.sh").read_text())
    if port:
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port.group(1)}_*"):
            f.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def trained_moe(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> TrainedMoE:
    if "run" not in _RUNS:
        _RUNS["run"] = _train(tmp_path_factory.mktemp("trained-moe"), shared_cache)
    return _RUNS["run"]


def the_run(workdir: Path) -> tuple[MlflowClient, str]:
    """The MLflow client of `workdir`'s store and the id of its one run."""
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("moelab").experiment_id])
    return client, run.info.run_id


def loss_history(workdir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) of every logged value, sorted; a step logged twice comes twice."""
    client, run_id = the_run(workdir)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))


def first_steps(run_dir: Path) -> list[int]:
    """The first step each attempt (first run, resumes) computed, in order: the training
    loop's own line in train.log, whatever the MLflow sink kept or dropped."""
    log = (run_dir / "train.log").read_text(errors="replace")
    return [
        int(s) for s in re.findall(r"moelab: step (\d+) is the first this attempt computed", log)
    ]


def checkpoint_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor in every file of checkpoint `step` (model and expert states of both
    ranks, ZeRO optimizer shards, the saved RNG states), keyed by file and path inside it."""
    files = sorted((run_dir / "checkpoints" / f"global_step{step}").glob("*.pt"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        _collect(torch.load(f, map_location="cpu", weights_only=False), f.name, out)
    return out


def _collect(obj: Any, key: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[key] = obj
    elif isinstance(obj, np.ndarray):  # numpy's saved RNG state
        out[key] = torch.from_numpy(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _collect(v, f"{key}/{k}", out)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _collect(v, f"{key}/{i}", out)


def subprocess_env(workdir: Path) -> dict[str, str]:
    """A plain process: no MOELAB/DeepSpeed variables, offline hub, its own HF_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MOELAB_"))}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(workdir / "hf_home")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env
