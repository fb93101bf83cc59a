"""The MLflow side of the launcher: the run is created here, ranks log into it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from moelab.config import MoelabConfig

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_uri(cfg: MoelabConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; local paths absolute."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


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
        "zero_stage": str(cfg.zero.stage),
        "ep_size": str(cfg.ep_size),
        "world_size": str(cfg.world_size),
        "nodes": str(cfg.cluster.nodes),
        "git_commit": git_commit(),
        "run_dir": cfg.run_dir,
    }


def create_run(cfg: MoelabConfig, uri: str) -> str:
    """Create (or reuse) the experiment and a RUNNING run; return its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    name = cfg.tracking.run_name or Path(cfg.run_dir).name
    run = client.create_run(exp_id, run_name=name, tags=run_tags(cfg))
    return str(run.info.run_id)


def end_run(uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).set_terminated(run_id, status)
