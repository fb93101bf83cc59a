"""Rank-gated logging: rank 0 writes to the launcher's MLflow run, other ranks to a null sink."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm import tqdm

from moelab import runref

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


SPOOL_FILE = "mlflow_spool.jsonl"
OFFSET_FILE = "mlflow_spool.offset"
LOCK_FILE = "mlflow_spool.lock"
SPOOL_ARTIFACTS = "spool_artifacts"
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit


def bound_http_retries(max_retries: int = 0, timeout_s: int = 10) -> None:
    """Fail fast on an unreachable server (MLflow's defaults retry for minutes); env wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))


class Spool:
    """Append-only JSON-lines record of a run's MLflow calls, plus the replay offset."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.path = run_dir / SPOOL_FILE
        self.offset_path = run_dir / OFFSET_FILE
        self.artifacts = run_dir / SPOOL_ARTIFACTS
        self.lock = threading.Lock()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, allow_nan=True) + "\n"
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)

    def keep(self, path: Path) -> Path:
        """Files outside the run dir may be temporary: copy them into spool_artifacts/."""
        path = path.resolve()
        if path.is_relative_to(self.dir.resolve()):
            return path
        dest = self._slot() / path.name
        if path.is_dir():
            shutil.copytree(path, dest)
        else:
            shutil.copy2(path, dest)
        return dest

    def keep_text(self, text: str, name: str) -> Path:
        dest = self._slot() / name
        dest.write_text(text, encoding="utf-8")
        return dest

    def _slot(self) -> Path:
        with self.lock:
            self.count += 1
            slot = self.artifacts / f"{os.getpid()}-{time.time_ns()}-{self.count}"
        slot.mkdir(parents=True)
        return slot

    def offset(self) -> int:
        try:
            return int(self.offset_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def set_offset(self, offset: int) -> None:
        tmp = self.offset_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(f"{offset}\n")
        os.replace(tmp, self.offset_path)

    def read_from(self, offset: int) -> list[tuple[int, dict[str, Any]]]:
        """Complete records after `offset`, each with the offset just past it."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path, "rb") as f:
            f.seek(offset)
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # a record still being written
                offset += len(raw)
                out.append((offset, json.loads(raw)))
        return out

    def last_metric_step(self) -> int:
        """The highest step any spooled metric record has (-1 for a new spool)."""
        steps = [r["step"] for _, r in self.read_from(0) if r["kind"] == "metrics"]
        return max(steps, default=-1)

    def pending_records(self) -> int:
        return sum(1 for _, r in self.read_from(self.offset()) if r["kind"] != "open")


class ServerDown(Exception):
    """The tracking server did not answer; retry later."""


class Replayer:
    """Sends spooled records in order, each exactly once (offset file + the store's dedup).

    A crash between a send and the offset write re-sends one batch: params already present
    are skipped, tags and artifacts overwrite themselves, and metrics carry their original
    timestamp, so the SQL store drops the repeated (key, step, timestamp, value) rows.
    """

    def __init__(self, spool: Spool, tracking_uri: str | None = None) -> None:
        self.spool = spool
        self.uri_override = tracking_uri
        self.clients: dict[str | None, Any] = {}
        self.run_id: str | None = None
        self.uri: str | None = tracking_uri
        self.replayed = 0

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        if self.uri not in self.clients:
            self.clients[self.uri] = MlflowClient(tracking_uri=self.uri)
        return self.clients[self.uri]

    def drain(self) -> int:
        """Replay everything after the offset; ServerDown if the server stops answering."""
        lock_path = self.spool.dir / LOCK_FILE
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ServerDown("another process is replaying this spool") from None
            try:
                return self._drain()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _drain(self) -> int:
        start = self.spool.offset()
        records = self.spool.read_from(start)
        if start and self.run_id is None:
            # The run and server in effect at the offset: the last "open" record before it.
            for end, r in self.spool.read_from(0):
                if end > start:
                    break
                if r["kind"] == "open":
                    self._open(r)
        sent, i = 0, 0
        while i < len(records):
            end, record = records[i]
            if record["kind"] == "metrics":
                batch = [record]
                n = len(record["metrics"])
                while i + 1 < len(records) and records[i + 1][1]["kind"] == "metrics":
                    nxt = records[i + 1][1]
                    if n + len(nxt["metrics"]) > MAX_BATCH_METRICS:
                        break
                    i += 1
                    end = records[i][0]
                    batch.append(nxt)
                    n += len(nxt["metrics"])
                self._send_metrics(batch)
                sent += len(batch)
            else:
                self._send(record)
                sent += record["kind"] != "open"
            self.spool.set_offset(end)
            i += 1
        self.replayed += sent
        return sent

    def _open(self, record: dict[str, Any]) -> None:
        self.run_id = record["run_id"]
        self.uri = self.uri_override or record.get("tracking_uri")

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        from mlflow.exceptions import MlflowException

        try:
            fn(*args, **kwargs)
        except MlflowException as err:
            code = err.get_http_status_code()
            if code >= 500 or code == 429:
                raise ServerDown(str(err).splitlines()[0]) from None
            # A permanent rejection (e.g. a param logged twice with other values): report
            # it and move on rather than block the spool forever.
            print(f"moelab: MLflow rejected a spooled record: {err}", file=sys.stderr)
        except OSError as err:
            raise ServerDown(str(err)) from None

    def _send_metrics(self, batch: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, r["ts"], r["step"]) for r in batch for k, v in r["metrics"].items()]
        self._call(self._client().log_batch, self.run_id, metrics=metrics)

    def _send(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        kind = record["kind"]
        if kind == "open":
            self._open(record)
            return
        client = self._client()
        if kind == "params":
            existing: dict[str, str] = {}

            def fetch() -> None:
                existing.update(client.get_run(self.run_id).data.params)

            self._call(fetch)
            items = [Param(k, v) for k, v in record["params"].items() if k not in existing]
            for j in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self._call(client.log_batch, self.run_id, params=items[j : j + 100])
        elif kind == "tags":
            tags = [RunTag(k, v) for k, v in record["tags"].items()]
            self._call(client.log_batch, self.run_id, tags=tags)
        elif kind == "artifact":
            path = Path(record["path"])
            if not path.exists():
                print(f"moelab: spooled artifact {path} is gone; skipped.", file=sys.stderr)
            elif path.is_dir():
                self._call(client.log_artifacts, self.run_id, str(path), record["artifact_path"])
            else:
                self._call(client.log_artifact, self.run_id, str(path), record["artifact_path"])


class Worker:
    """Background thread draining the spool; retries at most every `retry_s` while down."""

    def __init__(self, replayer: Replayer, retry_s: float) -> None:
        self.replayer = replayer
        self.retry_s = retry_s
        self.event = threading.Event()
        self.stopping = threading.Event()
        self.down_since: float | None = None
        self.thread = threading.Thread(target=self._run, name="moelab-mlflow", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        self.event.set()

    def _run(self) -> None:
        while True:
            if self.down_since is None:
                self.event.wait()
            else:  # down: new records wait for the next retry, not every log call
                self.stopping.wait(self.retry_s)
            self.event.clear()
            stopping = self.stopping.is_set()
            try:
                self.replayer.drain()
                if self.down_since is not None:
                    print("moelab: MLflow reachable again, spool replayed.", file=sys.stderr)
                self.down_since = None
            except ServerDown as err:
                if self.down_since is None:
                    print(f"moelab: MLflow unreachable, spooling ({err}).", file=sys.stderr)
                self.down_since = time.monotonic()
            except Exception as err:  # never let telemetry kill training
                print(f"moelab: MLflow replay failed: {err!r}", file=sys.stderr)
                self.down_since = time.monotonic()
            if stopping:
                return

    def stop(self, timeout_s: float) -> None:
        """One last drain attempt (bounded by `timeout_s`), then the thread ends."""
        self.stopping.set()
        self.event.set()
        self.thread.join(timeout_s)


class MLflowSink:
    """Logs into the launcher's run (`moelab.runref`) through a write-ahead spool.

    Every call appends one JSON record to `<run dir>/mlflow_spool.jsonl` and returns: it never
    touches the network, so an unreachable tracking server cannot block or crash training.
    A background thread replays the spool in order with synchronous MLflow calls (failures are
    seen, unlike `log_batch(synchronous=False)`), advancing `mlflow_spool.offset` after each
    accepted batch; while the server is down it retries every `retry_s` seconds. `close()`
    drains what it can; whatever is left is replayed later by `moelab-sync <run dir>`.
    """

    def __init__(
        self,
        run_id: str,
        tracking_uri: str | None = None,
        run_dir: str | Path | None = None,
        retry_s: float = 2.0,
        close_timeout_s: float = 120.0,
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
        self.replayer = Replayer(self.spool, tracking_uri)
        self.worker = Worker(self.replayer, retry_s)
        self.worker.start()

    def log_params(self, params: dict[str, Any]) -> None:
        items = {k: str(v)[:MAX_PARAM_LEN] for k, v in params.items()}
        self.spool.append({"kind": "params", "params": items})
        self.worker.wake()

    def set_tags(self, tags: dict[str, str]) -> None:
        self.spool.append({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})
        self.worker.wake()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items()}
        self.spool.append({"kind": "metrics", "metrics": values, "step": step, "ts": now})
        self.worker.wake()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        local = self.spool.keep(Path(path))
        self.spool.append({"kind": "artifact", "path": str(local), "artifact_path": artifact_path})
        self.worker.wake()

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
        self.worker.wake()

    def progress(self, total: int, initial: int = 0) -> tqdm:
        return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def close(self) -> None:
        """Replay what the server takes now (bounded); warn about what is left for later."""
        self.worker.stop(self.close_timeout_s)
        left = self.spool.pending_records()
        if left:
            print(
                f"moelab: {left} MLflow records are still spooled in {self.spool.path} "
                f"(tracking server unreachable); replay them with `moelab-sync {self.spool.dir}`.",
                file=sys.stderr,
            )


def make_sink(is_rank0: bool, run_dir: str | Path | None = None) -> Sink:
    """MLflow on rank 0 when started by the launcher, a null sink elsewhere.

    The run id comes from the launcher (`moelab.runref`: normally written long before rank 0
    gets here; RunRefError if the launcher could not create the run). `run_dir` holds the
    spool (default: $MOELAB_RUN_DIR, else a temporary folder).
    """
    run_id = runref.launcher_run_id() if is_rank0 else None
    if run_id:
        return MLflowSink(run_id, os.environ.get("MLFLOW_TRACKING_URI"), run_dir)
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


class SystemMetrics(threading.Thread):
    """MLflow's SystemMetricsMonitor, built and started off the training thread.

    Building it opens a tracking client (1.3 s for a SQLite store) and takes a first sample:
    done inline, rank 0 would hold every other rank at the first collective that long.
    """

    def __init__(self, interval_s: float, node_id: str) -> None:
        super().__init__(name="moelab-system-metrics", daemon=True)
        self.interval_s, self.node_id = interval_s, node_id
        self.monitor: Any = None

    def run(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            run_id = runref.launcher_run_id()
        except runref.RunRefError:
            return  # rank 0 reports it and stops the run
        self.monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=self.interval_s,
            node_id=self.node_id,
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
        )
        self.monitor.start()

    def finish(self) -> None:
        self.join()
        if self.monitor is not None:
            self.monitor.finish()


def start_system_metrics(info: DistInfo, interval_s: float) -> SystemMetrics | None:
    """MLflow system metrics from every node: local rank 0 samples its host.

    Metrics are keyed `system/<host>-node<N>/...` (`set_system_metrics_node_id` per host), so
    hosts sharing a name (containers, namespaces) stay apart. None where nothing is sampled.
    """
    if info.local_rank != 0 or not (os.environ.get("MLFLOW_RUN_ID") or os.environ.get(runref.ENV)):
        return None
    # The deepspeed launcher's node index; mpirun sets no CROSS_RANK (ranks fill hosts in order).
    node = os.environ.get("CROSS_RANK") or str(info.rank // max(info.local_world_size, 1))
    monitor = SystemMetrics(interval_s, f"{socket.gethostname()}-node{node}")
    monitor.start()
    return monitor
