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

from moelab.checkpoint import check_layout, read_meta, rng_state, set_rng_state


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
