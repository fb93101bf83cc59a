"""The run dir's `mlflow_run.json`: the one channel by which the launcher's MLflow run reaches
the ranks.

Before it starts `deepspeed` the launcher writes the file as pending (the tracking URI, no id
yet; a resumed run dir keeps the id it holds), then creates the MLflow run alongside the ranks
(importing MLflow and opening its store take seconds the ranks spend starting anyway) and
rewrites the file with the run id, or with why the run could not be created. Rank 0's sink and
each host's system-metrics sampler read it from the run dir (shared by every host, like the
checkpoints): no file means no MLflow run (a rank script started by hand).

When every rank runs on the launcher's host (cluster=local) the file also says `beside`: the
launcher, which has MLflow loaded and the store open anyway, replays rank 0's spool and samples
the host's system metrics, and no rank imports MLflow.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from moelab.rundir import RunDir

WAIT_S = 300.0


class RunRefError(RuntimeError):
    """The launcher could not create the MLflow run, or never said so in time."""


def write_pending(run_dir: Path, uri: str, beside: bool = False) -> None:
    """Announce a run to come (the ranks wait for its id), unless the file already holds an
    id (a resume continues that run); `beside`: the launcher sends rank 0's MLflow records."""
    path = RunDir(run_dir).run_ref
    if path.exists() and "run_id" in _load(path):
        return
    _write(path, {"tracking_uri": uri, "pending": True} | ({"beside": True} if beside else {}))


def write(run_dir: Path, uri: str, run_id: str) -> None:
    """Atomically (a rank may be polling for it): the run id and its tracking URI (`beside`
    kept from the pending file)."""
    beside = {"beside": True} if launcher_beside(run_dir) else {}
    _write(RunDir(run_dir).run_ref, {"run_id": run_id, "tracking_uri": uri} | beside)


def write_failure(run_dir: Path, message: str) -> None:
    """Tell the waiting ranks that no run was created, and why (one sentence)."""
    _write(RunDir(run_dir).run_ref, {"error": message})


def _write(path: Path, content: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(content) + "\n")
    tmp.replace(path)


def _load(path: Path) -> dict[str, Any]:
    ref = json.loads(path.read_text())
    return ref if isinstance(ref, dict) else {}


def read(run_dir: Path) -> tuple[str, str]:
    """(tracking URI, run id) written by the launch that created `run_dir`."""
    ref = _load(RunDir(run_dir).run_ref)
    return str(ref["tracking_uri"]), str(ref["run_id"])


def launcher_beside(run_dir: Path) -> bool:
    """Whether the launcher replays rank 0's spool and samples the host (every rank on its
    host): then no rank opens MLflow."""
    path = RunDir(run_dir).run_ref
    return path.exists() and _load(path).get("beside") is True


def expected(run_dir: Path) -> bool:
    """Whether the launcher started this run with an MLflow run (pending or created)."""
    return RunDir(run_dir).run_ref.exists()


def launcher_run_id(run_dir: Path, timeout_s: float = WAIT_S) -> str | None:
    """The MLflow run this rank logs into: None when `run_dir` has no mlflow_run.json (no
    launcher, no run), else its run id once written; RunRefError if the launcher says the run
    could not be created or writes no id within `timeout_s`."""
    path = RunDir(run_dir).run_ref
    if not path.exists():
        return None
    deadline = time.monotonic() + timeout_s
    while True:
        ref = _load(path)
        if "error" in ref:
            raise RunRefError(f"the launcher could not create the MLflow run: {ref['error']}")
        if "run_id" in ref:
            return str(ref["run_id"])
        if time.monotonic() > deadline:
            raise RunRefError(
                f"the launcher wrote no MLflow run id to {path} within {timeout_s:.0f} s"
            )
        time.sleep(0.05)
