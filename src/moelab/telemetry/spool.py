"""The MLflow write-ahead spool: rank 0's record of its MLflow calls and their replay.

`MLflowSink` appends every call to the run dir's spool and a `Worker` thread replays it in
order; `moelab-sync` replays what is left after the run (the server was down).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from moelab.dscompat import load_mlflow
from moelab.rundir import RunDir

MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit


def bound_http_retries(max_retries: int = 0, timeout_s: int = 10) -> None:
    """Fail fast on an unreachable server (MLflow's defaults retry for minutes); env wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))


class Spool:
    """Append-only JSON-lines record of a run's MLflow calls, plus the replay offset."""

    def __init__(self, run_dir: Path) -> None:
        files = RunDir(run_dir)
        self.dir = files.root
        self.path = files.spool
        self.offset_path = files.spool_offset
        self.lock_path = files.spool_lock
        self.artifacts = files.spool_artifacts
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

    def report_left(self) -> None:
        """After the last replay: say how to send what the server did not take."""
        left = self.pending_records()
        if left:
            print(
                f"moelab: {left} MLflow records are still spooled in {self.path} (tracking "
                f"server unreachable); replay them with `moelab-sync {self.dir}`.",
                file=sys.stderr,
            )


class ServerDown(Exception):
    """The tracking server did not answer; retry later."""


class Replayer:
    """Sends spooled records in order, each exactly once (offset file + the store's dedup).

    A crash between a send and the offset write re-sends one batch: params already present
    are skipped, tags and artifacts overwrite themselves, and metrics carry their original
    timestamp, so the SQL store drops the repeated (key, step, timestamp, value) rows.
    """

    def __init__(self, spool: Spool, tracking_uri: str | None = None, client: Any = None) -> None:
        self.spool = spool
        self.uri_override = tracking_uri
        # `client`: one already open for `tracking_uri` (a SQLite store costs 1.3 s to open)
        self.clients: dict[str | None, Any] = {} if client is None else {tracking_uri: client}
        self.run_id: str | None = None
        self.uri: str | None = tracking_uri
        self.replayed = 0

    def _client(self) -> Any:
        load_mlflow()
        from mlflow.tracking import MlflowClient

        if self.uri not in self.clients:
            self.clients[self.uri] = MlflowClient(tracking_uri=self.uri)
        return self.clients[self.uri]

    def drain(self) -> int:
        """Replay everything after the offset; ServerDown if the server stops answering."""
        with open(self.spool.lock_path, "a") as lock:
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
    """Background thread draining the spool; retries at most every `retry_s` while down.

    It starts replaying once `release()`d (the run's first metrics, or MLflow loaded by the
    system-metrics thread) or after `hold_s`: importing MLflow and opening its store take
    seconds of CPU that the first training step needs on a machine whose cores are all busy
    with ranks; the records wait in the spool meanwhile. With `poll_s` it also looks for new
    records that often (another process appends them: the launcher replaying rank 0's spool)."""

    def __init__(
        self, replayer: Replayer, retry_s: float, hold_s: float = 0.0, poll_s: float | None = None
    ) -> None:
        self.replayer = replayer
        self.retry_s, self.hold_s, self.poll_s = retry_s, hold_s, poll_s
        self.event = threading.Event()
        self.released = threading.Event()
        self.stopping = threading.Event()
        self.down_since: float | None = None
        self.thread = threading.Thread(target=self._run, name="moelab-mlflow", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        self.event.set()

    def release(self) -> None:
        self.released.set()

    def _run(self) -> None:
        self.released.wait(self.hold_s)
        while True:
            if self.down_since is None:
                self.event.wait(self.poll_s)
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
        self.released.set()
        self.event.set()
        self.thread.join(timeout_s)
