"""Checkpoint/resume: layout checks (fast) and bit-exact resume of a real 2-rank run (slow)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import run_launcher
from moelab.checkpoint import check_layout, read_meta, rng_state, set_rng_state
from trained_moe import (
    RUN,
    STEPS,
    TrainedMoE,
    checkpoint_tensors,
    first_steps,
    trained_moe,  # noqa: F401
)


def test_layout_mismatch_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    meta = {"step": 4, "tag": "global_step4", "world_size": 2, "ep_size": 2}
    (tmp_path / "checkpoints" / "meta.json").write_text(json.dumps(meta))
    assert read_meta(tmp_path) == meta
    check_layout(meta, 2, 2)
    with pytest.raises(ValueError, match=r"world size 2 and ep_size 2, not 4 and 2; resume"):
        check_layout(meta, 4, 2)
    assert read_meta(tmp_path / "nothing") is None


def test_rng_state_restores_the_accelerators_draws() -> None:
    """The "device" part alone brings back the accelerator's stream (CUDA: every GPU's)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    acc.manual_seed_all(7)
    saved = rng_state()
    assert saved["device"]["accelerator"] == acc.device_name()
    expected = torch.rand(8, device=acc.device_name())
    acc.manual_seed_all(8)
    set_rng_state(rng_state() | {"device": saved["device"]})
    assert torch.equal(torch.rand(8, device=acc.device_name()), expected)


def test_other_accelerators_rng_is_a_note_not_a_crash(capsys: pytest.CaptureFixture[str]) -> None:
    """A GPU checkpoint on a CPU (or the reverse): host streams restored, device ones named."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    other = "cuda" if name == "cpu" else "cpu"
    torch.manual_seed(3)
    saved = rng_state()
    expected = torch.rand(4)
    foreign = {"accelerator": other, "states": [torch.zeros(16, dtype=torch.uint8)]}
    set_rng_state(saved | {"device": foreign})
    assert torch.equal(torch.rand(4), expected)
    assert (
        f"the checkpoint's {other} RNG states are not restored on {name}" in capsys.readouterr().out
    )


def run_dir_of(workdir: Path) -> Path:
    (run_dir,) = (workdir / "runs" / "moelab").iterdir()
    return run_dir


def only_run(workdir: Path) -> tuple[MlflowClient, object]:
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("moelab").experiment_id])
    return client, run


def losses(workdir: Path) -> dict[int, float]:
    client, run = only_run(workdir)
    history = client.get_metric_history(run.info.run_id, "train/loss")  # type: ignore[attr-defined]
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"duplicate steps: {sorted(steps)}"
    return {m.step: m.value for m in history}


def ok(proc: object) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # type: ignore[attr-defined]


@pytest.mark.slow
def test_stop_and_resume_is_bit_exact(
    tmp_path: Path,
    shared_cache: Path,
    trained_moe: TrainedMoE,  # noqa: F811
) -> None:
    """`train.stop_after=3`, then a resume to the end: the same losses and final tensors as the
    session's uninterrupted reference run (same overrides)."""
    ok(run_launcher(tmp_path, shared_cache, *RUN, "train.stop_after=3"))
    run_dir = run_dir_of(tmp_path)
    assert read_meta(run_dir)["step"] == 3  # type: ignore[index]
    _, run = only_run(tmp_path)
    assert run.info.status == "KILLED"  # type: ignore[attr-defined]
    assert run.data.tags["moelab.stopped_at_step"] == "3"  # type: ignore[attr-defined]
    assert "moelab.resumed_from_step" not in run.data.tags  # type: ignore[attr-defined]
    proc = run_launcher(tmp_path, shared_cache, "resume", str(run_dir), "train.stop_after=0")
    ok(proc)
    _, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"  # type: ignore[attr-defined]
    assert run.data.tags["moelab.resumed_from_step"] == "3"  # type: ignore[attr-defined]
    line = "moelab: resumed from checkpoint global_step3 at step 3; next step 4"
    assert line in (run_dir / "train.log").read_text()
    assert first_steps(run_dir) == [1, 4] and first_steps(trained_moe.run_dir) == [1]
    a, b = losses(trained_moe.workdir), losses(tmp_path)
    assert sorted(b) == list(range(1, STEPS + 1)) == sorted(a)
    delta = max(abs(a[s] - b[s]) for s in range(1, STEPS + 1))
    print(f"max |dloss| against the reference: {delta:.3g}")
    assert delta <= 1e-6, (a, b)
    wa, wb = checkpoint_tensors(trained_moe.run_dir, STEPS), checkpoint_tensors(run_dir, STEPS)
    assert wa.keys() == wb.keys() and len(wa) > 0
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} final tensors differ: {differ[:3]}"
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("global_step*"))
    last = f"global_step{STEPS}"
    assert kept == [f"global_step{STEPS - 5}", last]  # keep_checkpoints=2 pruned step 3
    assert (run_dir / "checkpoints" / "latest").read_text() == last


SECOND_SIGNAL = """
import os, signal, time
from moelab.checkpoint import StopFlag
flag = StopFlag('.')
os.kill(os.getpid(), signal.SIGTERM)
print("first signal: raised =", flag.raised, flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(10)
print("survived the second signal", flush=True)
"""


def test_first_signal_sets_the_flag_second_kills_at_once() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SECOND_SIGNAL], capture_output=True, text=True, timeout=60
    )
    assert "first signal: raised = True" in proc.stdout
    assert "survived" not in proc.stdout
    assert proc.returncode == -signal.SIGTERM


def test_stop_file_is_looked_at_once_per_interval(tmp_path: Path) -> None:
    """The stop file on the shared run dir is stat'ed at most once per `file_every_s`, not
    every step; once seen (or signalled) the flag stays up."""
    import time

    from moelab.checkpoint import STOP_FILE, StopFlag

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    flag = StopFlag(tmp_path, file_every_s=0.5)  # (installs its signal handlers: restored below)
    for s, handler in handlers.items():
        signal.signal(s, handler)
    cpu = torch.device("cpu")
    assert flag.local(cpu).tolist() == [0.0]
    (tmp_path / STOP_FILE).touch()
    assert flag.local(cpu).tolist() == [0.0]  # within the interval: not looked at again
    time.sleep(0.6)
    assert flag.local(cpu).tolist() == [1.0]
    (tmp_path / STOP_FILE).unlink()
    assert flag.local(cpu).tolist() == [1.0]
