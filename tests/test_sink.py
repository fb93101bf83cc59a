"""MLflow outages: logging never blocks, the spool replays every record exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import free_port, launcher_env, wait_healthy
from launcher import sync
from moelab.telemetry.sink import MLflowSink

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MAX_CALL_S = 2.0


class Server:
    """`mlflow server` on 127.0.0.1 in its own process group; sqlite store in `work`."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        log = (self.work / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.work / 'mlflow.db'}",
                "--serve-artifacts",
                "--artifacts-destination",
                str(self.work / "mlartifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            cwd=self.work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_healthy(self.url, self.proc, self.work / "server.log")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def clear_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sink under test must use only what it is given, not the caller's MLFLOW_*."""
    for key in list(os.environ):
        if key.startswith("MLFLOW_"):
            monkeypatch.delenv(key)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    work = tmp_path / "server"
    work.mkdir()
    srv = Server(work)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


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
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_mlflow_env(monkeypatch)
    run_id = new_run(server.url)
    run_dir = tmp_path / "run"
    sink = MLflowSink(run_id, server.url, run_dir, retry_s=0.5, close_timeout_s=60)
    latencies: list[float] = []
    try:
        sink.log_params({"before": 1})
        for step in range(1, 11):
            latencies.append(
                timed(sink.log_metrics, {"train/loss": 1.0 / step, "train/lr": 0.1}, step)
            )
        server.stop()
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
        server.start()
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
    assert_complete(server.url, run_id, 40)
    # Running the replay again sends nothing twice.
    assert sync.main([str(run_dir)]) == 0
    assert_complete(server.url, run_id, 40)


def test_moelab_sync_replays_a_spool_written_while_down(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_mlflow_env(monkeypatch)
    run_id = new_run(server.url)
    run_dir = tmp_path / "run"
    server.stop()
    sink = MLflowSink(run_id, server.url, run_dir, retry_s=0.5, close_timeout_s=20)
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
    server.start()
    cmd = [str(BIN / "moelab-sync"), str(run_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "replayed 24 records" in out.stdout
    assert_complete(server.url, run_id, 20)
    assert sync.main([str(run_dir)]) == 0
    assert_complete(server.url, run_id, 20)


def spooled_steps(workdir: Path) -> int:
    """The highest step a training run under `workdir` has spooled so far (0: none yet)."""
    best = 0
    for spool in (workdir / "runs").glob("*/*/mlflow_spool.jsonl"):
        for line in spool.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "metrics":
                best = max(best, int(record["step"]))
    return best


def wait_for_step(workdir: Path, proc: subprocess.Popen[str], step: int) -> None:
    deadline = time.monotonic() + 300
    while spooled_steps(workdir) < step:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.2)


def test_training_run_survives_a_server_restart(
    server: Server, tmp_path: Path, shared_cache: Path
) -> None:
    steps = 40
    work = tmp_path / "work"
    work.mkdir()
    args = ("model=tiny_dense", "cluster.nproc_per_node=1", "train=smoke", f"train.steps={steps}")
    args += ("train.log_every=1", "train.eval_every=10", f"tracking.uri={server.url}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", *args, "tracking.experiment=outage"],
        cwd=work,
        env=launcher_env(work, shared_cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_step(work, proc, 5)
        server.stop()
        down_from = spooled_steps(work)
        wait_for_step(work, proc, down_from + 10)  # training goes on while the server is down
        server.start()
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    client = MlflowClient(tracking_uri=server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "perf/tokens_per_s"):
        got = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert got == list(range(1, steps + 1)), f"{key}: {got}"
    evals = sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/loss"))
    assert evals == [10, 20, 30, 40]
