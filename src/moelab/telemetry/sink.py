"""Rank-gated logging: rank 0 writes to the launcher's MLflow run, other ranks to a null sink."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from moelab import runref
from moelab.telemetry.spool import Replayer, Spool, Worker, bound_http_retries

MAX_PARAM_LEN = 6000  # MLflow's param value limit


class Sink(Protocol):
    """Where a rank's telemetry goes."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def progress(self, total: int, initial: int = 0) -> tqdm: ...
    def mlflow_ready(self) -> None: ...
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

    def mlflow_ready(self) -> None:
        pass

    def close(self) -> None:
        pass


CLOSE_TIMEOUT_S = 120.0
"""Longest `close()` replays what is left before the process goes on."""
FIRST_REPLAY_HOLD_S = 30.0
"""Longest the first replay waits for the run's first metrics (`spool.Worker`)."""


class MLflowSink:
    """Logs into the launcher's run (`moelab.runref`) through a write-ahead spool.

    Every call appends one JSON record to the run dir's spool (`RunDir.spool`) and returns: it
    never touches the network, so an unreachable tracking server cannot block or crash training.
    A background thread replays the spool in order with synchronous MLflow calls (failures are
    seen, unlike `log_batch(synchronous=False)`), advancing the spool offset after each
    accepted batch; while the server is down it retries every `retry_s` seconds. `close()`
    drains what it can; whatever is left is replayed later by `moelab-sync <run dir>`.
    With `replay=False` (the launcher beside the ranks replays the spool: `runref`) there is
    no thread, and MLflow is never imported here.
    """

    def __init__(
        self,
        run_id: str,
        tracking_uri: str | None = None,
        run_dir: str | Path | None = None,
        retry_s: float = 2.0,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
        replay: bool = True,
    ) -> None:
        bound_http_retries()
        if run_dir is None:
            run_dir = os.environ.get("MOELAB_RUN_DIR") or tempfile.mkdtemp(prefix="moelab-spool-")
        self.run_id = run_id
        self.spool = Spool(Path(run_dir))
        # A run resumed after a crash repeats the steps since its last checkpoint: those
        # steps' metrics are already spooled (with the same values, resume being exact).
        self.logged_through = self.spool.last_metric_step()
        self.close_timeout_s = close_timeout_s
        self.spool.append({"kind": "open", "run_id": run_id, "tracking_uri": tracking_uri})
        self.worker: Worker | None = None
        if replay:
            replayer = Replayer(self.spool, tracking_uri)
            self.worker = Worker(replayer, retry_s, hold_s=FIRST_REPLAY_HOLD_S)
            self.worker.start()

    def _wake(self, release: bool = False) -> None:
        if self.worker is not None:
            if release:
                self.worker.release()
            self.worker.wake()

    def log_params(self, params: dict[str, Any]) -> None:
        items = {k: str(v)[:MAX_PARAM_LEN] for k, v in params.items()}
        self.spool.append({"kind": "params", "params": items})
        self._wake()

    def set_tags(self, tags: dict[str, str]) -> None:
        self.spool.append({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})
        self._wake()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items()}
        self.spool.append({"kind": "metrics", "metrics": values, "step": step, "ts": now})
        self._wake(release=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        local = self.spool.keep(Path(path))
        self.spool.append({"kind": "artifact", "path": str(local), "artifact_path": artifact_path})
        self._wake()

    def log_text(self, text: str, artifact_file: str) -> None:
        local = self.spool.keep_text(text, Path(artifact_file).name)
        folder = str(Path(artifact_file).parent)
        self.spool.append(
            {
                "kind": "artifact",
                "path": str(local),
                "artifact_path": None if folder == "." else folder,
            }
        )
        self._wake()

    def progress(self, total: int, initial: int = 0) -> tqdm:
        return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def mlflow_ready(self) -> None:
        """MLflow is imported and its store open (the system-metrics thread did it): the first
        replay need not wait for the first metrics any more."""
        if self.worker is not None:
            self.worker.release()

    def close(self) -> None:
        """Replay what the server takes now (bounded); warn about what is left for later."""
        if self.worker is None:
            return  # the launcher replays the spool once the ranks are gone
        self.worker.stop(self.close_timeout_s)
        self.spool.report_left()


def make_sink(is_rank0: bool, run_dir: Path) -> Sink:
    """MLflow on rank 0 when started by the launcher, a null sink elsewhere.

    The run id comes from the launcher (`moelab.runref`: normally written long before rank 0
    gets here; RunRefError if the launcher could not create the run). `run_dir` holds the
    run ref and the spool.
    """
    run_id = runref.launcher_run_id(run_dir) if is_rank0 else None
    if run_id:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        return MLflowSink(run_id, uri, run_dir, replay=not runref.launcher_beside(run_dir))
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
