"""Checkpoint/resume building blocks (fast): layout check, RNG states, stop flag. The real
interrupted and resumed runs are in test_preemption."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moelab.checkpoint import check_layout, read_meta, rng_state, set_rng_state


def test_layout_mismatch_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    meta = {"step": 4, "tag": "global_step4", "world_size": 2, "ep_size": 2}
    (tmp_path / "checkpoints" / "meta.json").write_text(json.dumps(meta))
    assert read_meta(tmp_path) == meta
    check_layout(meta, 2, 2)
    with pytest.raises(ValueError, match=r"world size 2 and ep_size 2, not 4 and 2; resume"):
        check_layout(meta, 4, 2)
    with pytest.raises(ValueError, match=r"not 2 and 1 \(ep_size may change with model.moe.imp"):
        check_layout(meta, 2, 1)
    check_layout(meta, 2, 1, ep_changes=True)
    with pytest.raises(ValueError, match=r"not 4 and 1; resume"):  # the world size never
        check_layout(meta, 4, 1, ep_changes=True)
    assert read_meta(tmp_path / "nothing") is None


def run_dir_of(root: Path, *overrides: str) -> Path:
    """A run dir as the launcher renders it (config.yaml, ds_config.json), no checkpoint."""
    from launcher.compose import compose_config, to_schema
    from moelab.config import to_container
    from moelab.dsconfig import build_ds_config

    cfg = to_schema(compose_config(["model=tiny_moe_top2", "parallel=ep2", *overrides]))
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(to_container(cfg)))
    (root / "ds_config.json").write_text(json.dumps(build_ds_config(cfg)))
    return root


def test_resume_may_change_ep_size_of_autoep_below_zero3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """AutoEP at ZeRO-2 saves experts one file each: its resume may take another ep_size
    (config and ds_config's autoep_size follow); classic and ZeRO-3 runs refuse, unchanged."""
    from launcher.resume import resume_config
    from moelab.checkpoint import ep_may_change

    auto = run_dir_of(tmp_path / "autoep", "model.moe.impl=autoep", "zero=stage2")
    cfg = resume_config(auto, ["parallel.ep_size=1", "train.stop_after=3"])
    assert ep_may_change(cfg) and cfg.parallel.ep_size == 1 and cfg.train.stop_after == 3
    ds = json.loads((auto / "ds_config.json").read_text())
    assert ds["expert_parallel"]["autoep_size"] == 1
    for name, overrides in {
        "classic": ("zero=stage2",),
        "zero3": ("model.moe.impl=autoep", "zero=stage3"),
    }.items():
        run = run_dir_of(tmp_path / name, *overrides)
        before = {f: (run / f).read_text() for f in ("config.yaml", "ds_config.json")}
        with pytest.raises(SystemExit):
            resume_config(run, ["parallel.ep_size=1"])
        assert "parallel.ep_size cannot change on resume of this run" in capsys.readouterr().err
        assert before == {f: (run / f).read_text() for f in before}
        assert resume_config(run, ["parallel.ep_size=2"]).parallel.ep_size == 2  # unchanged


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

    from moelab.checkpoint import StopFlag
    from moelab.rundir import RunDir

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    flag = StopFlag(tmp_path, file_every_s=0.5)  # (installs its signal handlers: restored below)
    for s, handler in handlers.items():
        signal.signal(s, handler)
    cpu = torch.device("cpu")
    assert flag.local(cpu).tolist() == [0.0]
    RunDir(tmp_path).stop_request.touch()
    assert flag.local(cpu).tolist() == [0.0]  # within the interval: not looked at again
    time.sleep(0.6)
    assert flag.local(cpu).tolist() == [1.0]
    RunDir(tmp_path).stop_request.unlink()
    assert flag.local(cpu).tolist() == [1.0]
