"""MLflow outages: logging never blocks, the spool replays every record exactly once.

The server is the session's shared one (tests/mlflow_server.py, PostgreSQL store); each outage
test stops and starts it around its own experiment and run, and `mlflow_server` has it running
again afterwards, also on failure. The training run that lives through a server restart is the
shared tiny_dense run of that module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from launcher import sync
from mlflow_server import (  # noqa: F401
    DENSE_STEPS,
    LoggedRuns,
    MlflowServer,
    logged_runs,
    mlflow_server,
    shared_mlflow_server,
)
from moelab.telemetry.sink import MLflowSink

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MAX_CALL_S = 2.0


def clear_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sink under test must use only what it is given, not the caller's MLFLOW_*."""
    for key in list(os.environ):
        if key.startswith("MLFLOW_"):
            monkeypatch.delenv(key)


def new_run(url: str) -> str:
    client = MlflowClient(tracking_uri=url)
    exp = client.create_experiment(f"sink-{time.time_ns()}")
    return str(client.create_run(exp).info.run_id)


def timed(fn: object, *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return time.perf_counter() - t0


def assert_complete(url: str, run_id: str, steps: int) -> None:
    client = MlflowClient(tracking_uri=url)
    for key in ("train/loss", "train/lr"):
        got = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert got == list(range(1, steps + 1)), f"{key}: {got}"
    params = client.get_run(run_id).data.params
    assert params["before"] == "1" and params["during"] == "2"
    assert client.get_run(run_id).data.tags["outage"] == "yes"
    names = {a.path for a in client.list_artifacts(run_id, "spooled")}
    assert "spooled/during.txt" in names and "spooled/note.txt" in names, names


def test_outage_spools_and_replays_exactly_once(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clear_mlflow_env(monkeypatch)
    run_id = new_run(mlflow_server.url)
    run_dir = tmp_path / "run"
    sink = MLflowSink(run_id, mlflow_server.url, run_dir, retry_s=0.5, close_timeout_s=60)
    latencies: list[float] = []
    try:
        sink.log_params({"before": 1})
        for step in range(1, 11):
            latencies.append(
                timed(sink.log_metrics, {"train/loss": 1.0 / step, "train/lr": 0.1}, step)
            )
        mlflow_server.stop()
        outside = tmp_path / "tmpfile" / "during.txt"  # a temp file, deleted after logging
        outside.parent.mkdir()
        outside.write_text("logged while the server was down\n")
        latencies.append(timed(sink.log_artifact, outside, "spooled"))
        outside.unlink()
        latencies.append(timed(sink.log_params, {"during": 2}))
        latencies.append(timed(sink.set_tags, {"outage": "yes"}))
        latencies.append(timed(sink.log_text, "note\n", "spooled/note.txt"))
        for step in range(11, 31):
            latencies.append(
                timed(sink.log_metrics, {"train/loss": 1.0 / step, "train/lr": 0.1}, step)
            )
            time.sleep(0.1)  # let the worker retry against the dead server meanwhile
        assert (run_dir / "mlflow_spool.jsonl").exists()
        mlflow_server.start()
        for step in range(31, 41):
            latencies.append(
                timed(sink.log_metrics, {"train/loss": 1.0 / step, "train/lr": 0.1}, step)
            )
        t0 = time.perf_counter()
        sink.close()
        print(
            f"close: {time.perf_counter() - t0:.2f} s; worst log call {max(latencies) * 1e3:.2f} ms"
        )
    finally:
        sink.worker.stop(5)
    assert max(latencies) < MAX_CALL_S, latencies
    assert sink.spool.pending_records() == 0
    assert_complete(mlflow_server.url, run_id, 40)
    # Running the replay again sends nothing twice.
    assert sync.main([str(run_dir)]) == 0
    assert_complete(mlflow_server.url, run_id, 40)


def test_moelab_sync_replays_a_spool_written_while_down(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clear_mlflow_env(monkeypatch)
    run_id = new_run(mlflow_server.url)
    run_dir = tmp_path / "run"
    mlflow_server.stop()
    sink = MLflowSink(run_id, mlflow_server.url, run_dir, retry_s=0.5, close_timeout_s=20)
    latencies = [timed(sink.log_params, {"before": 1, "during": 2})]
    latencies.append(timed(sink.set_tags, {"outage": "yes"}))
    for step in range(1, 21):
        latencies.append(timed(sink.log_metrics, {"train/loss": 1.0 / step, "train/lr": 0.1}, step))
    outside = tmp_path / "during.txt"
    outside.write_text("x\n")
    latencies.append(timed(sink.log_artifact, outside, "spooled"))
    outside.unlink()
    sink.log_text("note\n", "spooled/note.txt")
    t0 = time.perf_counter()
    sink.close()
    close_s = time.perf_counter() - t0
    assert max(latencies) < MAX_CALL_S and close_s < 30, (latencies, close_s)
    assert sink.spool.pending_records() == 24
    # A sync while the server is still down fails cleanly and keeps the spool.
    assert sync.main([str(run_dir)]) == 1
    mlflow_server.start()
    cmd = [str(BIN / "moelab-sync"), str(run_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "replayed 24 records" in out.stdout
    assert_complete(mlflow_server.url, run_id, 20)
    assert sync.main([str(run_dir)]) == 0
    assert_complete(mlflow_server.url, run_id, 20)


def test_training_run_survives_a_server_restart(
    mlflow_server: MlflowServer,  # noqa: F811
    logged_runs: LoggedRuns,  # noqa: F811
) -> None:
    # The server was killed after step 5 and came back 10 steps later, the run still training.
    assert logged_runs.down_at >= 5 and logged_runs.down_at + 10 <= logged_runs.up_at
    assert logged_runs.alive_at_restart and logged_runs.up_at < DENSE_STEPS, logged_runs
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = client.get_run(logged_runs.runs["tiny_dense"])
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "perf/tokens_per_s"):
        got = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert got == list(range(1, DENSE_STEPS + 1)), f"{key}: {got}"
    evals = sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/loss"))
    assert evals == [10, 20, 30, 40]


def test_first_replay_waits_for_metrics_or_a_ready_mlflow(tmp_path: Path) -> None:
    """Params alone are held in the spool (MLflow's import and store cost the first step CPU);
    `mlflow_ready()` (the system-metrics thread has loaded both) lets them go before any metric."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("hold")).info.run_id
    sink = MLflowSink(run_id, uri, tmp_path / "run", close_timeout_s=20)
    sink.log_params({"a": 1})
    time.sleep(1.5)
    assert client.get_run(run_id).data.params == {}, "replayed before metrics or mlflow_ready"
    sink.mlflow_ready()
    deadline = time.monotonic() + 20
    while client.get_run(run_id).data.params != {"a": "1"} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get_run(run_id).data.params == {"a": "1"}
    sink.close()
