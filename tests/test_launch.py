"""End-to-end: real `deepspeed` launches with 2 gloo ranks on CPU, logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import VARIANTS, VariantSweep
from helpers import run_launcher
from launcher.compose import compose_config, to_schema
from moelab.models.sizing import count_params


def launch(workdir: Path, cache: Path, *overrides: str, timeout: int = 600) -> str:
    proc = run_launcher(workdir, cache, *overrides, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_dry_run_renders_without_running(tmp_path: Path, shared_cache: Path) -> None:
    out = launch(
        tmp_path, shared_cache, "model=tiny_moe_top2", "parallel=ep2", "launch.dry_run=true"
    )
    (run_dir,) = (tmp_path / "runs" / "moelab").iterdir()
    assert {"config.yaml", "ds_config.json", "command.sh"} <= {p.name for p in run_dir.iterdir()}
    command = out.strip().splitlines()[-1]
    assert command.startswith("deepspeed --num_gpus=2 --master_port=")
    assert "--no_local_rank --module moelab.train --config" in command
    assert command in (run_dir / "command.sh").read_text()
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 * 1 * 2  # micro batch x grad accum x world
    assert ds["zero_optimization"]["stage"] == 0
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_two_rank_launch_logs_to_mlflow(variant: str, variant_sweep: VariantSweep) -> None:
    """Each variant's 2-rank ZeRO-2 ep2 launch of the shared sweep (conftest.VARIANT_SWEEP)."""
    client, run = variant_sweep.client, variant_sweep.run(variant)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["variant"] == variant and tags["zero_stage"] == "2"
    assert tags["world_size"] == "2"
    assert tags["ep_size"] == ("1" if variant == "tiny_dense" else "2")
    size = count_params(to_schema(compose_config([f"model={variant}"])).model)
    assert (int(tags["params_total"]), int(tags["params_active"])) == (size.total, size.active)
    loss = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(2, 17, 2)), "one value per logged step: only rank 0 logs"
    assert loss[-1] < loss[0] - 0.5, loss
    for key in ("train/lm_loss", "train/aux_loss", "train/lr", "eval/loss", "eval/ppl"):
        assert key in run.data.metrics, key
    assert run.data.metrics["perf/tokens_per_s"] > 0
    assert run.data.metrics["perf/step_time_s"] > 0
    aux = run.data.metrics["train/aux_loss"]
    assert aux == 0.0 if variant == "tiny_dense" else aux > 0.0
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert {"config/resolved.yaml", "config/ds_config.json"} <= arts
    assert run.data.params["model.name"] == variant


RANK_CHILD = """
import signal, sys, time
from moelab import lifeline
lifeline.connect()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a peer whose collective failed
print("connected", flush=True)
if sys.argv[1] == "wait":
    time.sleep(60)
"""


def test_rank_watch_names_the_killed_rank_even_when_a_peer_exits_at_once() -> None:
    """kill -9 of rank 1 while rank 0 leaves through Python at once (as a peer whose collective
    failed does): rank 1 is named, whichever connection the watch reads first; a later
    kill -9 of another rank does not take its place."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from launcher.launch import RankWatch

    watch = RankWatch()
    watch.start()

    def rank(n: int, mode: str) -> subprocess.Popen[str]:
        env = os.environ | watch.env() | {"RANK": str(n)}
        cmd = [sys.executable, "-c", RANK_CHILD, mode]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "connected\n"
        return proc

    peer, victim, late = rank(0, "wait"), rank(1, "wait"), rank(2, "wait")
    os.kill(victim.pid, signal.SIGKILL)
    peer.send_signal(signal.SIGTERM)
    victim.wait(timeout=30)
    peer.wait(timeout=30)
    time.sleep(0.5)
    late.kill()
    late.wait(timeout=30)
    watch.done.set()
    watch.join(timeout=10)
    assert watch.first_dead == f"rank 1 (pid {victim.pid}) exited first"


def test_rank_watch_blames_no_rank_that_exits_through_python() -> None:
    import os
    import subprocess
    import sys

    from launcher.launch import RankWatch

    watch = RankWatch()
    watch.start()
    env = os.environ | watch.env() | {"RANK": "0"}
    subprocess.run([sys.executable, "-c", RANK_CHILD, "exit"], env=env, check=True, timeout=60)
    watch.done.set()
    watch.join(timeout=10)
    assert watch.first_dead == ""
