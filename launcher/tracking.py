"""The MLflow side of the launcher: the run is created here, ranks log into it."""

from __future__ import annotations

import functools
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moelab import runref
from moelab.config import MoelabConfig

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_TAG = "mlflow.parentRunId"


def absolute_uri(uri: str | None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; local sqlite paths absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def resolve_uri(cfg: MoelabConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; local paths absolute."""
    return absolute_uri(cfg.tracking.uri)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cfg: MoelabConfig) -> dict[str, str]:
    return {
        "variant": cfg.model.name,
        "ffn": cfg.model.ffn,
        "moe_impl": cfg.model.moe.impl if cfg.model.is_moe else "-",
        "zero_stage": str(cfg.zero.stage),
        "ep_size": str(cfg.ep_size),
        "world_size": str(cfg.world_size),
        "nodes": str(cfg.cluster.nodes),
        "git_commit": git_commit(),
        "run_dir": cfg.run_dir,
        **({"slurm_job_id": os.environ["SLURM_JOB_ID"]} if "SLURM_JOB_ID" in os.environ else {}),
    }


@functools.cache
def mlflow_client(uri: str) -> Any:
    """One client per URI for the launcher's life (a SQLite store costs 1.3 s to open)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment `name`, created if missing."""
    exp = client.get_experiment_by_name(name)
    return str(exp.experiment_id if exp else client.create_experiment(name))


def create_run(
    cfg: MoelabConfig,
    uri: str,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    run_name: str | None = None,
) -> str:
    """Create (or reuse) the experiment and a RUNNING run; return its id.

    With `parent_run_id` (a sweep job) the run is a child of that run in the MLflow UI.
    """
    client = mlflow_client(uri)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    name = cfg.tracking.run_name or run_name or Path(cfg.run_dir).name
    all_tags = {**run_tags(cfg), **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    return str(run.info.run_id)


def create_parent_run(uri: str, experiment: str, name: str, tags: dict[str, str]) -> str:
    """A RUNNING run that only groups the runs of a sweep (no metrics of its own)."""
    client = mlflow_client(uri)
    run = client.create_run(experiment_id(client, experiment), run_name=name, tags=tags)
    return str(run.info.run_id)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    mlflow_client(uri).log_text(run_id, text, artifact_file)


def end_run(uri: str, run_id: str, status: str) -> None:
    mlflow_client(uri).set_terminated(run_id, status)


def rank_env(cfg: MoelabConfig) -> dict[str, str]:
    """What the ranks need to log into the launch's run besides the run dir's mlflow_run.json
    (`moelab.runref`): the tracking URI."""
    return {"MLFLOW_TRACKING_URI": resolve_uri(cfg)}


class PendingRun:
    """The launch's MLflow run, created in a thread while `deepspeed` starts: importing MLflow
    and opening its store take seconds the ranks spend starting anyway. The id reaches the
    ranks through the run dir (`moelab.runref`: marked pending before the thread starts, so a
    rank never mistakes a run to come for none; `beside`: the launcher sends rank 0's records,
    `launcher.beside`); `id()` waits for it."""

    def __init__(
        self,
        run_dir: Path,
        uri: str,
        create: Callable[[], str] | None = None,
        on_failure: Callable[[str], None] | None = None,
        beside: bool = False,
    ) -> None:
        self.run_dir, self.uri, self.on_failure = run_dir, uri, on_failure
        self.error: str | None = None
        self._id: str | None = None
        self._thread: threading.Thread | None = None
        if create is not None:
            runref.write_pending(run_dir, uri, beside)
            self._thread = threading.Thread(target=self._create, args=(create,), daemon=True)
            self._thread.start()

    @classmethod
    def existing(cls, uri: str, run_id: str, run_dir: Path) -> PendingRun:
        """The run a resumed run dir already logs into."""
        run = cls(run_dir, uri)
        run._id = run_id
        return run

    def _create(self, create: Callable[[], str]) -> None:
        try:
            self._id = create()
        except Exception as err:  # reported by id(); the ranks are told through the run dir
            first = (str(err).splitlines() or [""])[0]
            self.error = f"{type(err).__name__}: {first[:300]}"
            runref.write_failure(self.run_dir, f"{self.uri}: {self.error}")
            if self.on_failure is not None:
                self.on_failure(self.error)
            return
        runref.write(self.run_dir, self.uri, self._id)
        print(f"moelab-launch: run {self._id} in {self.run_dir}", flush=True)

    def failure(self) -> str:
        """One sentence: why no run exists (after `id()` returned None)."""
        return f"could not create the MLflow run at {self.uri} ({self.error}); check tracking.uri"

    def id(self) -> str | None:
        """The run id once created; None if creating it failed (`error` says why)."""
        if self._thread is not None:
            self._thread.join()
        return self._id


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a stopped (KILLED/FAILED) run RUNNING again: a resume continues it."""
    mlflow_client(uri).update_run(run_id, status="RUNNING")
