"""The launcher beside the ranks (cluster=local): it sends rank 0's MLflow records and samples
the host's system metrics, so that no rank imports MLflow (`moelab.runref.launcher_beside`).

Rank 0 appends its MLflow calls to the run dir's spool as ever (`MLflowSink(replay=False)`);
a thread here replays the spool every `POLL_S` into the launch's run, with the client the
launcher opened to create it, and once more after the ranks are gone, before the run ends.
Importing MLflow and opening its store cost a rank about 2 s of its interpreter before step 1
and its replays stole the training thread's GIL after it; the launcher has both already.
"""

from __future__ import annotations

import threading
from pathlib import Path

from launcher import tracking
from launcher.tracking import PendingRun
from moelab import runref
from moelab.config import MoelabConfig
from moelab.telemetry.sink import CLOSE_TIMEOUT_S
from moelab.telemetry.spool import Replayer, Spool, Worker
from moelab.telemetry.sysmetrics import SystemMetrics, node_id

POLL_S = 1.0
"""How often the launcher looks for new records in rank 0's spool."""
RETRY_S = 2.0
"""How often it retries while the tracking server does not answer."""


class BesideRanks:
    """Rank 0's spool replayed and the host sampled from here, once the MLflow run exists."""

    def __init__(self, cfg: MoelabConfig, run: PendingRun, run_dir: Path) -> None:
        self.cfg, self.run, self.spool = cfg, run, Spool(run_dir)
        self.worker: Worker | None = None
        self.monitor: SystemMetrics | None = None
        self.thread = threading.Thread(target=self._start, name="moelab-beside", daemon=True)

    def _start(self) -> None:
        if self.run.id() is None:
            return  # no run: the ranks are being stopped
        client = tracking.mlflow_client(self.run.uri)
        self.worker = Worker(Replayer(self.spool, self.run.uri, client), RETRY_S, poll_s=POLL_S)
        self.worker.start()
        t = self.cfg.telemetry
        if t.system_metrics:
            interval, run_dir = t.system_metrics_interval, self.spool.dir
            self.monitor = SystemMetrics(interval, node_id("0"), run_dir, _none, self.run.uri)
            self.monitor.start()

    def stop(self) -> None:
        """After the ranks: the sampler's end, the last replay (bounded), what is left said."""
        self.thread.join()
        if self.monitor is not None:
            self.monitor.finish()
        if self.worker is not None:
            self.worker.stop(CLOSE_TIMEOUT_S)
            self.spool.report_left()


def _none() -> None:
    pass


def start(cfg: MoelabConfig, run: PendingRun, run_dir: Path) -> BesideRanks | None:
    """Replay and sample from here when the run dir says the launcher is beside its ranks."""
    if not runref.launcher_beside(run_dir):
        return None
    beside = BesideRanks(cfg, run, run_dir)
    beside.thread.start()
    return beside
