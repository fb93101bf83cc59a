"""One real 2-rank ep2 MoE training run with a checkpoint, and its export, shared by
test_export, test_eval and test_routing (import the fixtures from here)."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import run_launcher

RUN_ARGS = (
    "model=tiny_moe_top2",
    "parallel=ep2",
    "train=smoke",
    "train.steps=4",
    "train.checkpoint_every=4",
    "train.eval_every=4",
)


@dataclass(frozen=True)
class TrainedMoE:
    workdir: Path
    run_dir: Path
    cache: Path
    hf_dir: Path


_RUNS: dict[str, TrainedMoE] = {}  # one run per session, whichever test module asks first


def _train(workdir: Path, cache: Path) -> TrainedMoE:
    proc = run_launcher(workdir, cache, *RUN_ARGS)
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


def subprocess_env(workdir: Path) -> dict[str, str]:
    """A plain process: no MOELAB/DeepSpeed variables, offline hub, its own HF_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MOELAB_"))}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(workdir / "hf_home")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env
