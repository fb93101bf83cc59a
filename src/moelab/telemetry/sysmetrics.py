"""MLflow on the ranks, off the training thread: the warm-up before step 1, and the system
metrics (CPU, memory, disk, network, GPU) of every host of a run."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moelab import runref
from moelab.dscompat import load_mlflow

if TYPE_CHECKING:
    from moelab.engine import DistInfo


LOCAL_STORES = ("sqlite", "file")
"""Tracking URI schemes whose store is a local file: opening one cannot wait on a server."""


def warm_mlflow(info: DistInfo, system_metrics: bool, run_dir: Path) -> Callable[[], None]:
    """Import MLflow and open its store on a thread, where this rank will use them (rank 0's
    sink; each host's system-metrics sampler); returns the wait, called before step 1.

    Both take ~2 s of the interpreter: started after the first step, they would stall the
    training thread (the GIL) for up to half a second at a time and every other rank with it
    at the next collective, showing rank 0 as a straggler. Started here they overlap the model
    build and DeepSpeed's initialisation. A tracking server is not contacted (an unreachable
    one must not hold training back). Nothing to do when the launcher beside the ranks does
    both (`runref.launcher_beside`).
    """
    sampler = info.local_rank == 0 and system_metrics
    if not (info.is_rank0 or sampler) or not runref.expected(run_dir):
        return lambda: None
    if runref.launcher_beside(run_dir):
        return lambda: None
    thread = threading.Thread(
        target=_open_store, args=(run_dir,), name="moelab-mlflow-warm-up", daemon=True
    )
    thread.start()
    return thread.join


def _open_store(run_dir: Path) -> None:
    load_mlflow()
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: F401
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.split(":", 1)[0] not in LOCAL_STORES:
        return
    try:
        run_id = runref.launcher_run_id(run_dir)
        if run_id is not None:
            MlflowClient(tracking_uri=uri).get_run(run_id)
    except Exception:  # the sink and the sampler meet it again and report it
        return


class SystemMetrics(threading.Thread):
    """MLflow's SystemMetricsMonitor, built and started off the training thread.

    Building it opens a tracking client (1.3 s for a SQLite store) and takes a first sample:
    done inline, rank 0 would hold every other rank at the first collective that long.
    """

    def __init__(
        self,
        interval_s: float,
        node_id: str,
        run_dir: Path,
        on_started: Callable[[], None],
        tracking_uri: str | None = None,
    ) -> None:
        super().__init__(name="moelab-system-metrics", daemon=True)
        self.interval_s, self.node_id, self.run_dir = interval_s, node_id, run_dir
        self.on_started = on_started
        self.uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")  # the ranks' env has it
        self.monitor: Any = None

    def run(self) -> None:
        load_mlflow()
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            run_id = runref.launcher_run_id(self.run_dir)
        except runref.RunRefError:
            return  # rank 0 reports it and stops the run
        if run_id is None:
            return
        self.monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=self.interval_s,
            node_id=self.node_id,
            tracking_uri=self.uri,
        )
        self.monitor.start()
        self.on_started()

    def finish(self) -> None:
        self.join()
        if self.monitor is not None:
            self.monitor.finish()


def start_system_metrics(
    info: DistInfo, interval_s: float, run_dir: Path, on_started: Callable[[], None]
) -> SystemMetrics | None:
    """MLflow system metrics from every node: local rank 0 samples its host; `on_started` is
    called once the monitor runs (MLflow imported, its store open).

    Metrics are keyed `system/<host>-node<N>/...` (`set_system_metrics_node_id` per host), so
    hosts sharing a name (containers, namespaces) stay apart. None where nothing is sampled
    here (the launcher beside the ranks samples their host: `runref.launcher_beside`).
    """
    if info.local_rank != 0 or not runref.expected(run_dir) or runref.launcher_beside(run_dir):
        return None
    # The deepspeed launcher's node index; mpirun sets no CROSS_RANK (ranks fill hosts in order).
    node = os.environ.get("CROSS_RANK") or str(info.rank // max(info.local_world_size, 1))
    monitor = SystemMetrics(interval_s, node_id(node), run_dir, on_started)
    monitor.start()
    return monitor


def node_id(node: str) -> str:
    """The system metrics' host key: `system/<host>-node<N>/...`."""
    return f"{socket.gethostname()}-node{node}"
