"""Shared fixtures: the repo root, a clean environment for launcher subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psutil
import pytest
from mlflow.tracking import MlflowClient

from helpers import run_launcher, unavailable
from netns import TwoHosts, missing_prerequisite

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls: one thread is faster and immune to a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for all launches of the session (tokenizer trained once)."""
    return tmp_path_factory.mktemp("moelab-cache")


@pytest.fixture(scope="session")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    """Two namespaces on a veth link, an sshd in each; removed afterwards, also on failure."""
    reason = missing_prerequisite()
    if reason is not None:
        unavailable(f"two-host network unavailable: {reason}")
    hosts = TwoHosts(tmp_path_factory.mktemp("two-hosts"))
    try:
        hosts.setup()
        yield hosts
    finally:
        hosts.teardown()


VARIANTS = ("tiny_dense", "tiny_moe_top1", "tiny_moe_top2", "tiny_arctic")
SWEEP_EXPERIMENT = "variants"
VARIANT_SWEEP = (
    "-m",
    f"model={','.join(VARIANTS)}",
    "zero=stage2",
    "parallel=ep2",
    "train=smoke",
    "train.steps=16",
    "train.log_every=2",
    "telemetry.heatmap_every=8",
    "telemetry.system_metrics_interval=1",
    f"tracking.experiment={SWEEP_EXPERIMENT}",
)


# AutoEP at top-1 is covered in-process (test_autoep); one launch per variant costs ~30 s.
AUTOEP_VARIANTS = ("tiny_moe_top2", "tiny_arctic")
AUTOEP_EXPERIMENT = "variants-autoep"
AUTOEP_SWEEP = (
    "-m",
    f"model={','.join(AUTOEP_VARIANTS)}",
    "model.moe.impl=autoep",
    *[a for a in VARIANT_SWEEP[2:] if not a.startswith("tracking.")],
    f"tracking.experiment={AUTOEP_EXPERIMENT}",
)


@dataclass
class VariantSweep:
    """The launcher's result for VARIANT_SWEEP and the MLflow store it logged to."""

    work: Path
    proc: subprocess.CompletedProcess[str]
    client: MlflowClient

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.work / 'mlflow.db'}"

    experiment: str = SWEEP_EXPERIMENT

    def run(self, variant: str) -> Any:
        """The sweep's child run of `variant`."""
        exp = self.client.get_experiment_by_name(self.experiment)
        (run,) = [
            r for r in self.client.search_runs([exp.experiment_id])
            if r.data.tags.get("variant") == variant and "mlflow.parentRunId" in r.data.tags
        ]  # fmt: skip
        return run


@pytest.fixture(scope="session")
def variant_sweep(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> VariantSweep:
    """The four variants as one real sweep of 2-rank launches (ZeRO-2, ep_size 2, 16 steps),
    run once: the launch, telemetry, sweep and report tests all read it."""
    work = tmp_path_factory.mktemp("variant-sweep")
    proc = run_launcher(work, shared_cache, *VARIANT_SWEEP, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return VariantSweep(work, proc, MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}"))


@pytest.fixture(scope="session")
def autoep_sweep(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> VariantSweep:
    """VARIANT_SWEEP's MoE variants again with model.moe.impl=autoep (same settings)."""
    work = tmp_path_factory.mktemp("autoep-sweep")
    proc = run_launcher(work, shared_cache, *AUTOEP_SWEEP, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    return VariantSweep(work, proc, client, AUTOEP_EXPERIMENT)


Rejects = Callable[[list[str], str], None]


@pytest.fixture
def cli_rejects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Rejects:
    """`rejects(args, message)`: `moelab-launch ARGS` run in this process (the entry point
    `launcher.__main__.main`) in tmp_path exits 2 with one stderr line holding `message`, no
    traceback, and leaves tmp_path as it was (no run dir, no MLflow store); starting a process
    (subprocess.Popen, which every launch path goes through) fails the test there."""
    from launcher.__main__ import main

    started: list[str] = []

    def tripwire(args: Any, *_: Any, **__: Any) -> NoReturn:
        started.append(str(args))
        raise AssertionError(f"moelab-launch started a process: {args}")

    def rejects(args: list[str], message: str) -> None:
        before = sorted(tmp_path.rglob("*"))
        children = {p.pid for p in psutil.Process().children(recursive=True)}
        with monkeypatch.context() as m:
            m.chdir(tmp_path)
            m.setattr(sys, "argv", ["moelab-launch", *args])
            m.setattr(subprocess, "Popen", tripwire)
            for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
                m.delenv(key)
            m.setenv("HYDRA_FULL_ERROR", "0")
            with pytest.raises(SystemExit) as exit_:
                main()
        out, err = capsys.readouterr()
        assert started == [], f"processes started: {started}"
        assert "Traceback" not in out + err, err
        assert exit_.value.code == 2, out + err
        assert out == "" and err.count("\n") == 1 and err.endswith(".\n"), out + err
        assert err.startswith("moelab-launch: error: ") and message in err, err
        assert sorted(tmp_path.rglob("*")) == before, "left files behind (run dir, MLflow store)"
        new = {p.pid for p in psutil.Process().children(recursive=True)} - children
        assert not new, f"child processes appeared: {new}"

    return rejects
