"""The run dir's `mlflow_run.json`: how the launcher's MLflow run reaches the ranks.

The launcher starts `deepspeed` first and creates the MLflow run alongside (importing MLflow
and opening its store take seconds the ranks spend starting anyway), then writes the run id
here. Rank 0's sink and each host's system-metrics sampler read it from the run dir (shared by
every host, like the checkpoints) through `MOELAB_RUN_REF`; a resume reads it to continue the
same run. If the launcher could not create the run, the file says why and the ranks stop.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RUN_REF = "mlflow_run.json"
ENV = "MOELAB_RUN_REF"
"""The ranks' variable holding the path of the run dir's RUN_REF (set by the launcher)."""
WAIT_S = 300.0


class RunRefError(RuntimeError):
    """The launcher could not create the MLflow run, or never said so in time."""


def write(run_dir: Path, uri: str, run_id: str) -> None:
    """Atomically (a rank may be polling for it): the run id and its tracking URI."""
    _write(run_dir / RUN_REF, {"run_id": run_id, "tracking_uri": uri})


def write_failure(run_dir: Path, message: str) -> None:
    """Tell the waiting ranks that no run was created, and why (one sentence)."""
    _write(run_dir / RUN_REF, {"error": message})


def _write(path: Path, content: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(content) + "\n")
    tmp.replace(path)


def read(run_dir: Path) -> tuple[str, str]:
    """(tracking URI, run id) written by the launch that created `run_dir`."""
    ref = json.loads((run_dir / RUN_REF).read_text())
    return str(ref["tracking_uri"]), str(ref["run_id"])


def wait(path: Path, timeout_s: float = WAIT_S) -> str:
    """The run id in `path` once the launcher has written it; RunRefError if it says the run
    could not be created or nothing appears within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise RunRefError(
                f"the launcher wrote no MLflow run id to {path} within {timeout_s:.0f} s"
            )
        time.sleep(0.05)
    ref = json.loads(path.read_text())
    if "error" in ref:
        raise RunRefError(f"the launcher could not create the MLflow run: {ref['error']}")
    return str(ref["run_id"])


def launcher_run_id(timeout_s: float = WAIT_S) -> str | None:
    """The MLflow run this rank logs into: $MLFLOW_RUN_ID where someone set it (a run started
    by hand), else the run dir's RUN_REF named by $MOELAB_RUN_REF; None outside the launcher."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        return run_id
    path = os.environ.get(ENV)
    return wait(Path(path), timeout_s) if path else None
