"""The launcher beside its ranks (cluster=local, `launcher.beside`): it replays rank 0's spool
into the run while the ranks train and samples the host, and no rank loads MLflow."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from launcher import beside, tracking
from launcher.backends import BACKENDS
from launcher.compose import compose_config, to_schema
from moelab import runref
from moelab.telemetry.sink import make_sink

REPO = Path(__file__).resolve().parents[1]

# What a rank does with MLflow, in a fresh interpreter where MLflow is deferred as on a rank:
# the warm-up, rank 0's sink (params, a metric, a text artifact), the host's sampler.
RANK = """
import json, sys, threading
from pathlib import Path
from moelab.dscompat import defer_mlflow_import
from moelab.engine import DistInfo
from moelab.telemetry.sink import make_sink
from moelab.telemetry.sysmetrics import start_system_metrics, warm_mlflow

defer_mlflow_import()
run_dir, rank = Path(sys.argv[1]), int(sys.argv[2])
info = DistInfo(rank=rank, world_size=2, local_rank=rank, local_world_size=2, ep_size=1)
warm_mlflow(info, True, run_dir)()
sink = make_sink(info.is_rank0, run_dir)
monitor = start_system_metrics(info, 0.2, run_dir, sink.mlflow_ready)
sink.log_params({"lr": 0.1})
sink.log_metrics({"train/loss": 2.0}, 1)
sink.log_text("hello\\n", "notes/hello.txt")
sink.close()
if monitor is not None:
    monitor.finish()
print(json.dumps({
    "mlflow": type(sys.modules.get("mlflow")).__name__,
    "store_open": "mlflow.store.tracking.sqlalchemy_store" in sys.modules,
    "threads": sorted(t.name for t in threading.enumerate() if t.name != "MainThread"),
}))
"""


def run_in_sqlite(tmp_path: Path, launcher_beside: bool) -> tuple[Path, str, str]:
    """A run dir whose run ref names a new run of a SQLite store: (run dir, URI, run id)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("beside")).info.run_id
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runref.write_pending(run_dir, uri, launcher_beside)
    runref.write(run_dir, uri, run_id)
    return run_dir, uri, run_id


def rank(run_dir: Path, uri: str, rank: int) -> dict[str, Any]:
    env = os.environ | {"PYTHONPATH": str(REPO / "src"), "MLFLOW_TRACKING_URI": uri}
    out = subprocess.run(
        [sys.executable, "-c", RANK, str(run_dir), str(rank)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return report


def test_ranks_beside_the_launcher_never_load_mlflow(tmp_path: Path) -> None:
    run_dir, uri, _ = run_in_sqlite(tmp_path, launcher_beside=True)
    for r in (0, 1):
        report = rank(run_dir, uri, r)
        assert report == {"mlflow": "_DeferredMlflow", "store_open": False, "threads": []}, r
    spooled = [json.loads(line)["kind"] for line in (run_dir / "mlflow_spool.jsonl").open()]
    assert spooled == ["open", "params", "metrics", "artifact"], "rank 0 still spools it all"
    assert not (run_dir / "mlflow_spool.offset").exists(), "and leaves it to the launcher"


def test_rank_0_of_a_run_on_other_hosts_sends_its_own_records(tmp_path: Path) -> None:
    """Without `beside` in the run ref (Slurm, hostfile runs) rank 0 replays, as before."""
    run_dir, uri, run_id = run_in_sqlite(tmp_path, launcher_beside=False)
    report = rank(run_dir, uri, 0)
    assert (report["mlflow"], report["store_open"]) == ("module", True)
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.params == {"lr": "0.1"} and run.data.metrics["train/loss"] == 2.0


def wait_for(what: str, ok: Any, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.1)


def test_the_launcher_replays_rank_0s_spool_live_and_samples_its_host(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = to_schema(compose_config(["telemetry.system_metrics_interval=0.2"]))
    cfg.run_dir = str(tmp_path / "run")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir()
    pending = tracking.PendingRun(
        run_dir, uri, lambda: tracking.create_run(cfg, uri), beside=BACKENDS["local"].ranks_beside
    )
    replay = beside.start(cfg, pending, run_dir)
    assert replay is not None
    sink = make_sink(True, run_dir)  # rank 0's, in this process for the test
    client, run_id = MlflowClient(tracking_uri=uri), pending.id()
    assert run_id is not None
    sink.log_params({"lr": 0.1})
    for step in (1, 2):
        sink.log_metrics({"train/loss": 1.0 / step}, step)

    def replayed(step: int) -> bool:
        return len(client.get_metric_history(run_id, "train/loss")) == step

    wait_for("live replay of step 2", lambda: replayed(2))  # while rank 0 trains on
    sink.log_metrics({"train/loss": 1.0 / 3}, 3)
    sink.log_text("hello\n", "notes/hello.txt")
    sink.close()
    time.sleep(0.5)  # a few samples of the host
    replay.stop()  # the ranks are gone: the last replay
    run = client.get_run(run_id)
    assert replayed(3) and run.data.params["lr"] == "0.1"
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/hello.txt"]
    host = f"system/{socket.gethostname()}-node0/"
    assert f"{host}cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)
    assert sink.spool.pending_records() == 0
    assert [b.ranks_beside for b in BACKENDS.values()].count(True) == 1, "cluster=local only"
