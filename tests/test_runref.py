"""The run dir's mlflow_run.json: the run id a rank waits for, or the reason there is none."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from moelab import runref
from moelab.rundir import RunDir


def test_a_rank_waits_for_the_id_the_launcher_writes_later(tmp_path: Path) -> None:
    runref.write_pending(tmp_path, "sqlite:///x.db")
    assert runref.expected(tmp_path)
    writer = threading.Timer(0.3, runref.write, (tmp_path, "sqlite:///x.db", "abc123"))
    t0 = time.monotonic()
    writer.start()
    assert runref.launcher_run_id(tmp_path, timeout_s=30) == "abc123"
    assert 0.25 < time.monotonic() - t0 < 10
    assert runref.read(tmp_path) == ("sqlite:///x.db", "abc123")
    assert [p.name for p in tmp_path.iterdir()] == [RunDir(tmp_path).run_ref.name]  # no temp


def test_a_failed_creation_stops_the_wait_with_the_reason(tmp_path: Path) -> None:
    runref.write_pending(tmp_path, "http://h:5000")
    runref.write_failure(tmp_path, "http://h:5000: MlflowException: refused")
    with pytest.raises(runref.RunRefError, match="could not create the MLflow run: http://h"):
        runref.launcher_run_id(tmp_path, timeout_s=5)


def test_a_pending_id_never_written_times_out_naming_the_file(tmp_path: Path) -> None:
    runref.write_pending(tmp_path, "sqlite:///x.db")
    with pytest.raises(runref.RunRefError, match=r"no MLflow run id to .*mlflow_run.json"):
        runref.launcher_run_id(tmp_path, timeout_s=0.2)


def test_no_file_means_no_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank started by hand (no launcher, no mlflow_run.json) logs nothing, whatever the
    environment says: the run dir is the only channel."""
    monkeypatch.setenv("MLFLOW_RUN_ID", "from-env")
    assert not runref.expected(tmp_path)
    assert runref.launcher_run_id(tmp_path, timeout_s=0.2) is None


def test_a_resume_keeps_the_id_the_run_dir_holds(tmp_path: Path) -> None:
    runref.write(tmp_path, "sqlite:///x.db", "first")
    runref.write_pending(tmp_path, "sqlite:///x.db")
    assert runref.launcher_run_id(tmp_path, timeout_s=0.2) == "first"
    assert "pending" not in json.loads(RunDir(tmp_path).run_ref.read_text())
