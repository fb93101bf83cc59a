"""Shared fixtures: the repo root, a clean environment for launcher subprocesses."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from helpers import run_launcher
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
        print(f"\nSKIPPED two-host tests: {reason}")
        pytest.skip(f"two-host network unavailable: {reason}")
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


@dataclass
class VariantSweep:
    """The launcher's result for VARIANT_SWEEP and the MLflow store it logged to."""

    work: Path
    proc: subprocess.CompletedProcess[str]
    client: MlflowClient

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.work / 'mlflow.db'}"

    def run(self, variant: str) -> Any:
        """The sweep's child run of `variant`."""
        exp = self.client.get_experiment_by_name(SWEEP_EXPERIMENT)
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
