"""Helpers shared by the tests (not fixtures)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

import pytest

from moelab import startup

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def unavailable(reason: str) -> NoReturn:
    """A prerequisite (package, privilege, service) is missing: skip on a developer's machine,
    fail under CI=true, where .ci/run installed everything and a skip would hide a lost test."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_rank_env() -> dict[str, str]:
    """Environment of a one-rank gloo world for a child process (moelab and tests importable;
    moelab's start-up folder first, as in a rank's environment)."""
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{startup.FOLDER}:{REPO / 'src'}:{REPO}:{REPO / 'tests'}",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "OMP_NUM_THREADS": "1",
    }


def launcher_env(workdir: Path, cache: Path) -> dict[str, str]:
    """Environment for a moelab-launch subprocess working in `workdir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        {
            "PATH": f"{BIN}:{env.get('PATH', '')}",
            "MOELAB_CACHE": str(cache),
            "DS_ACCELERATOR": "cpu",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
        }
    )
    return env


def run_launcher(
    workdir: Path, cache: Path, *args: str, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """`python -m launcher ARGS` in `workdir` (its MLflow store and run dirs land there)."""
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=workdir,
        env=launcher_env(workdir, cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_launchers(
    cache: Path, runs: dict[str, tuple[Path, tuple[str, ...]]]
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Independent `run_launcher` calls at once, name -> (workdir, args): 1-rank runs with a
    thread each (`train.threads_per_rank=1`) share the cores without slowing each other."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {
            name: pool.submit(run_launcher, workdir, cache, *args)
            for name, (workdir, args) in runs.items()
        }
        return {name: future.result() for name, future in futures.items()}


def wait_healthy(url: str, proc: subprocess.Popen[Any], log: Path, timeout: float = 120) -> None:
    """Wait until an `mlflow server` answers /health (fail with its log if it died)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def moe_gates(model: Any) -> dict[int, Any]:
    """Block index -> that layer's DeepSpeed `TopKGate` (`.deepspeed_moe.gate`)."""
    from moelab.ds_moe import iter_moe_layers

    return {idx: moe.deepspeed_moe.gate for idx, moe in iter_moe_layers(model)}


def torch_twin_matches_deepspeed(cfg: Any, vocab: int) -> list[bool]:
    """Build `cfg` with DeepSpeed's MoE layer and with its pure-torch twin (same weights), both
    in eval mode; assert equal logits (1e-5), aux loss and exp_counts on one random batch.
    Returns, per router call of the twin, whether it dropped a route."""
    import torch

    from moelab.models import build_model
    from moelab.models.moe_torch import TopKRouter

    ds = build_model(cfg, seed=3).eval()
    pt = build_model(cfg, seed=4, moe_runtime="torch").eval()
    pt.load_state_dict(ds.state_dict())
    dropped: list[bool] = []
    for m in pt.modules():
        if isinstance(m, TopKRouter):
            m.register_forward_hook(lambda _m, _a, out: dropped.append(bool((out[1] < 0).any())))
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ds(ids), pt(ids)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=0)
    for a, b in zip(got.exp_counts, want.exp_counts, strict=True):
        assert torch.equal(a.long(), b.long())
    return dropped
