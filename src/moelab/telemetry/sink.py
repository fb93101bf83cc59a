"""Rank-gated logging: rank 0 writes to the launcher's MLflow run, other ranks to a null sink."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm import tqdm

if TYPE_CHECKING:
    from moelab.engine import DistInfo

MAX_PARAM_LEN = 6000  # MLflow's param value limit


class Sink(Protocol):
    """Where a rank's telemetry goes."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def progress(self, total: int, initial: int = 0) -> tqdm: ...
    def close(self) -> None: ...


class NullSink:
    """Ranks other than 0 log nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def progress(self, total: int, initial: int = 0) -> tqdm:
        return tqdm(total=total, initial=initial, disable=True)

    def close(self) -> None:
        pass


class MLflowSink:
    """Logs into the run the launcher created (MLFLOW_RUN_ID, MLFLOW_TRACKING_URI)."""

    def __init__(self, run_id: str, tracking_uri: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        # Asynchronous: an HTTP round trip per call would stall the training step.
        self.client.log_batch(self.run_id, metrics=batch, synchronous=False)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def progress(self, total: int, initial: int = 0) -> tqdm:
        return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def close(self) -> None:
        import mlflow

        mlflow.flush_async_logging()


def make_sink(is_rank0: bool) -> Sink:
    """MLflow on rank 0 when the launcher passed a run id, a null sink elsewhere."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if is_rank0 and run_id:
        return MLflowSink(run_id, os.environ.get("MLFLOW_TRACKING_URI"))
    return NullSink()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def start_system_metrics(info: DistInfo, interval_s: float) -> Any:
    """MLflow system metrics from every node: local rank 0 samples its host.

    Metrics are keyed `system/<host>-node<N>/...` (`set_system_metrics_node_id` per host), so
    hosts sharing a name (containers, namespaces) stay apart. None where nothing is sampled.
    """
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if info.local_rank != 0 or not run_id:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    node = os.environ.get("CROSS_RANK", "0")  # the deepspeed launcher's node index
    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=interval_s,
        node_id=f"{socket.gethostname()}-node{node}",
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
    )
    monitor.start()
    return monitor
