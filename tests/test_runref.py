"""The run dir's mlflow_run.json: the run id a rank waits for, or the reason there is none."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from moelab import runref


def test_a_rank_waits_for_the_id_the_launcher_writes_later(tmp_path: Path) -> None:
    writer = threading.Timer(0.3, runref.write, (tmp_path, "sqlite:///x.db", "abc123"))
    t0 = time.monotonic()
    writer.start()
    assert runref.wait(tmp_path / runref.RUN_REF, timeout_s=30) == "abc123"
    assert 0.25 < time.monotonic() - t0 < 10
    assert runref.read(tmp_path) == ("sqlite:///x.db", "abc123")
    assert [p.name for p in tmp_path.iterdir()] == [runref.RUN_REF]  # no temp file left


def test_a_failed_creation_stops_the_wait_with_the_reason(tmp_path: Path) -> None:
    runref.write_failure(tmp_path, "http://h:5000: MlflowException: refused")
    with pytest.raises(runref.RunRefError, match="could not create the MLflow run: http://h"):
        runref.wait(tmp_path / runref.RUN_REF, timeout_s=5)


def test_nothing_written_times_out_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(runref.RunRefError, match=r"no MLflow run id to .*mlflow_run.json"):
        runref.wait(tmp_path / runref.RUN_REF, timeout_s=0.2)


def test_the_launchers_variables_decide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$MLFLOW_RUN_ID first (kept for runs started by hand), else the file $MOELAB_RUN_REF
    names, else no run: outside the launcher a rank logs nothing."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv(runref.ENV, raising=False)
    assert runref.launcher_run_id() is None
    runref.write(tmp_path, "sqlite:///x.db", "from-file")
    monkeypatch.setenv(runref.ENV, str(tmp_path / runref.RUN_REF))
    assert runref.launcher_run_id() == "from-file"
    monkeypatch.setenv("MLFLOW_RUN_ID", "from-env")
    assert runref.launcher_run_id() == "from-env"
