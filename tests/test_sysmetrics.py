"""MLflow on the ranks, off the training thread: the warm-up before step 1 (each case in a fresh
interpreter, where MLflow is deferred as on a rank)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from moelab import runref

REPO = Path(__file__).resolve().parents[1]

WARM_UP = """
import sys
from pathlib import Path
from moelab.dscompat import defer_mlflow_import
from moelab.engine import DistInfo
from moelab.telemetry.sysmetrics import warm_mlflow

defer_mlflow_import()
rank, local_rank, system_metrics = (int(x) for x in sys.argv[2:5])
info = DistInfo(rank=rank, world_size=4, local_rank=local_rank, local_world_size=2, ep_size=1)
wait = warm_mlflow(info, bool(system_metrics), Path(sys.argv[1]))
wait()
deferred = type(sys.modules.get("mlflow")).__name__ == "_DeferredMlflow"
print("mlflow", "deferred" if deferred else "loaded")
print("store", "open" if "mlflow.store.tracking.sqlalchemy_store" in sys.modules else "closed")
"""


def warm_up(run_dir: Path, uri: str, rank: int, local_rank: int, system_metrics: bool) -> str:
    """What a rank's MLflow holds once the warm-up's wait returned."""
    env = os.environ | {"PYTHONPATH": str(REPO / "src"), "MLFLOW_TRACKING_URI": uri}
    args = [str(rank), str(local_rank), str(int(system_metrics))]
    out = subprocess.run(
        [sys.executable, "-c", WARM_UP, str(run_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return " / ".join(out.stdout.splitlines())


@pytest.fixture
def sqlite_run(tmp_path: Path) -> tuple[Path, str]:
    """A run dir whose run ref names a run in a SQLite store: (run dir, tracking URI)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("warm-up"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runref.write(run_dir, uri, run.info.run_id)
    return run_dir, uri


def test_rank_0_is_warm_before_step_1(sqlite_run: tuple[Path, str]) -> None:
    run_dir, uri = sqlite_run
    assert warm_up(run_dir, uri, 0, 0, False) == "mlflow loaded / store open"


def test_each_hosts_sampler_is_warm_and_other_ranks_never_load_mlflow(
    sqlite_run: tuple[Path, str],
) -> None:
    run_dir, uri = sqlite_run
    assert warm_up(run_dir, uri, 2, 0, True) == "mlflow loaded / store open"
    assert warm_up(run_dir, uri, 2, 0, False) == "mlflow deferred / store closed"
    assert warm_up(run_dir, uri, 3, 1, True) == "mlflow deferred / store closed"


def test_a_tracking_server_is_not_contacted(tmp_path: Path) -> None:
    """Nothing listens on the URI's port: the warm-up imports MLflow and returns at once."""
    uri = "http://127.0.0.1:9"
    runref.write(tmp_path, uri, "0" * 32)
    assert warm_up(tmp_path, uri, 0, 0, True) == "mlflow loaded / store closed"


def test_a_rank_started_by_hand_loads_nothing(tmp_path: Path) -> None:
    """No run ref in the run dir: no MLflow run, nothing to warm up."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert warm_up(tmp_path, uri, 0, 0, True) == "mlflow deferred / store closed"
