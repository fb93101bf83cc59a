"""Hang diagnosis: every rank dumps its stacks when no step has finished for a while.

Each rank runs a daemon watchdog thread. The training loop pets it once per finished step with
the step number (a plain int: no device sync, no collective); the thread itself notes when the
number last changed and writes `<run dir>/hang/heartbeat.rank<N>` (the step) at most once a
second. When no step has finished for `train.hang_timeout_s`, every rank's thread

- writes `hang/rank<N>.txt`: a header naming where its main thread is, then every thread's
  Python stack (faulthandler), and `hang/rank<N>.json`, the same header for rank 0 to read;
- on rank 0, waits (bounded) for the other ranks' records, lists the ranks that never reached
  the stalled step (no record, or a record not waiting in a collective, and a heartbeat
  behind), tags the MLflow run (`moelab.hang`) and logs the dumps through the sink, lets the
  sink drain (bounded), then writes `hang/reported`; the other ranks wait for that file;
- leaves through `os._exit(HANG_EXIT)`, which ends a process whose main thread is stuck in a
  collective (`sys.exit` would wait for it).

The run dir is shared by all hosts, as checkpoints require, so rank 0 reads every rank's files.
A rank whose main thread holds the GIL in C code cannot dump: its record is missing and its
heartbeat tells how far it got.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from moelab.rundir import RunDir

if TYPE_CHECKING:
    from moelab.config import MoelabConfig
    from moelab.telemetry import Sink

HANG_EXIT = 4
"""A rank's (and moelab-launch's) exit code after a hang."""
TAG = "moelab.hang"
REPORTED = "reported"
"""Rank 0 writes `hang/reported` once the diagnosis is logged: the other ranks may exit."""
PEER_WAIT_S = 10.0
"""How long rank 0 waits for the other ranks' records."""
DRAIN_S = 30.0
"""How long rank 0 waits for the sink to send the diagnosis to MLflow."""
HEARTBEAT_S = 1.0

COLLECTIVE_FILES = ("torch/distributed/", "deepspeed/comm/")
SYNC_POINTS = (("moelab/engine.py", ""), ("moelab/train.py", "train_step"))
"""(file, function; "" = any) where a rank waits for its peers outside a collective's own
frames: NCCL collectives are asynchronous, so a GPU rank waits at the next host read of their
result (the loop's flags in `train_step`, the helpers of moelab.engine)."""


def short_path(filename: str) -> str:
    """A frame's file, from its package down (torch/distributed/distributed_c10d.py)."""
    for root in ("site-packages/", "dist-packages/", "src/"):
        if root in filename:
            return filename.rpartition(root)[2]
    return Path(filename).name


def stalled_in(frame: FrameType | None) -> tuple[str, bool]:
    """Where a stack (its innermost frame) is stuck, and whether that is waiting on peers:
    the innermost collective frame, else the innermost frame."""
    innermost = frame
    while frame is not None:
        path = short_path(frame.f_code.co_filename)
        if path.startswith(COLLECTIVE_FILES):
            return f"{frame.f_code.co_name} ({path})", True
        frame = frame.f_back
    if innermost is None:
        return "no Python frame", False
    code, path = innermost.f_code, short_path(innermost.f_code.co_filename)
    waiting = any(path == f and fn in ("", code.co_name) for f, fn in SYNC_POINTS)
    return f"{code.co_name} ({path}:{innermost.f_lineno})", waiting


def sleep_forever() -> None:
    """The injected hang (train.inject_hang_step): this rank never finishes its step."""
    while True:
        time.sleep(60)


class Watchdog:
    """One rank's hang watchdog (see the module's docstring); `timeout_s` 0 = off."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world_size: int,
        timeout_s: float,
        sink: Sink | None = None,
        *,
        step: int = 0,
        inject: tuple[int, int] = (0, 1),
        target: threading.Thread | None = None,
        exit_fn: Callable[[int], Any] = os._exit,
        peer_wait_s: float = PEER_WAIT_S,
    ) -> None:
        self.dir, self.rank, self.world_size = RunDir(run_dir).hang, rank, world_size
        self.timeout_s, self.sink, self.step = timeout_s, sink, step
        self.inject_step, self.inject_rank = inject
        self.target = target or threading.main_thread()
        self.exit_fn, self.peer_wait_s = exit_fn, peer_wait_s
        self.tick = min(HEARTBEAT_S, timeout_s / 10)
        self.stopped, self.started = threading.Event(), time.time()
        self.thread = threading.Thread(target=self._run, name="moelab-hang", daemon=True)

    def start(self) -> None:
        if self.timeout_s <= 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in (f"rank{self.rank}.txt", f"rank{self.rank}.json", self._beat_name(self.rank)):
            (self.dir / name).unlink(missing_ok=True)  # an earlier attempt's
        if self.rank == 0:
            (self.dir / REPORTED).unlink(missing_ok=True)
        self.started = time.time()
        self.thread.start()

    def pet(self, step: int) -> None:
        """The loop finished `step`."""
        self.step = step

    def inject(self, step: int) -> None:
        """Fault injection: the chosen rank sleeps forever at the chosen step."""
        if step == self.inject_step and self.rank == self.inject_rank:
            sleep_forever()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()

    def _run(self) -> None:
        seen, since, beat, beat_at = self.step, time.monotonic(), None, -HEARTBEAT_S
        while not self.stopped.wait(self.tick):
            now, step = time.monotonic(), self.step
            if step != seen:
                seen, since = step, now
            if step != beat and now - beat_at >= HEARTBEAT_S:
                with suppress(OSError):  # a shared filesystem's hiccup: the next beat retries
                    _write(self.dir / self._beat_name(self.rank), f"{step}\n")
                    beat = step
                beat_at = now
            if now - since >= self.timeout_s:
                self._fire(step)
                return

    def _fire(self, last: int) -> None:
        try:
            record = self._dump(last)
            where = f"{record['where']}; stacks in {self.dir}/"
            print(
                f"moelab: rank {self.rank}: no step finished after step {last} for "
                f"{self.timeout_s:g} s, stalled in {where}",
                file=sys.stderr,
                flush=True,
            )
            if self.rank == 0:
                self._report(record)
            else:
                _wait_for(lambda: (self.dir / REPORTED).exists(), self.peer_wait_s + DRAIN_S + 5)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            self.exit_fn(HANG_EXIT)

    def _dump(self, last: int) -> dict[str, Any]:
        """hang/rank<N>.txt (header and every thread's stack) and hang/rank<N>.json."""
        where, waiting = stalled_in(sys._current_frames().get(self.target.ident or 0))
        record = {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": last,
            "where": where,
            "waiting": waiting,
            "timeout_s": self.timeout_s,
            "time": time.time(),
        }
        with open(self.dir / f"rank{self.rank}.txt", "w") as f:
            f.write(
                f"moelab hang dump: rank {self.rank} on {record['host']} (pid {os.getpid()}), "
                f"no step finished after step {last} for {self.timeout_s:g} s; main thread in "
                f"{where}\n\n"
            )
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        _write(self.dir / f"rank{self.rank}.json", json.dumps(record) + "\n")
        return record

    def _report(self, own: dict[str, Any]) -> None:
        """Rank 0: the diagnosis to stderr and MLflow (tags, dumps), then hang/reported."""
        records = self._peer_records()
        records[0] = own
        step = own["step"] + 1
        behind = [r for r in range(self.world_size) if not self._reached(records.get(r), step, r)]
        text = diagnosis(step, own["where"], behind)
        print(f"moelab: error: {text}", file=sys.stderr, flush=True)
        if self.sink is not None:
            ranks = ",".join(map(str, behind))
            self.sink.set_tags({TAG: text, f"{TAG}_step": str(step), f"{TAG}_ranks": ranks})
            for dump in sorted(self.dir.glob("rank*.txt")):
                self.sink.log_artifact(dump, self.dir.name)
            drain(self.sink, DRAIN_S)
        _write(self.dir / REPORTED, f"{step}\n")

    def _peer_records(self) -> dict[int, dict[str, Any]]:
        """The other ranks' records of this attempt (a dead rank may have left an older one)."""

        def read() -> dict[int, dict[str, Any]]:
            records = {}
            for r in range(1, self.world_size):
                with suppress(OSError, ValueError):
                    records[r] = json.loads((self.dir / f"rank{r}.json").read_text())
            return {r: rec for r, rec in records.items() if rec["time"] >= self.started}

        _wait_for(lambda: len(read()) == self.world_size - 1, self.peer_wait_s)
        return read()

    def _reached(self, record: dict[str, Any] | None, step: int, rank: int) -> bool:
        """A rank reached `step` if it waits on its peers there, or its heartbeat is past it."""
        if record is not None and record["waiting"]:
            return True
        beat = self.dir / self._beat_name(rank)
        with suppress(FileNotFoundError, ValueError):
            return int(beat.read_text().strip() or -1) >= step
        return False

    @staticmethod
    def _beat_name(rank: int) -> str:
        return f"heartbeat.rank{rank}"


def diagnosis(step: int, where: str, behind: list[int]) -> str:
    """The `moelab.hang` tag: the step, rank 0's place and the ranks that never got there."""
    if not behind:
        return f"step {step}: stalled in {where}; every rank is waiting in a collective"
    ranks = ", ".join(map(str, behind))
    return (
        f"step {step}: stalled in {where}; rank{'s' * (len(behind) > 1)} {ranks} never "
        f"reported step {step}"
    )


def drain(sink: Sink, timeout_s: float) -> None:
    """Close the sink (it sends what it holds) from a helper thread, waiting at most `timeout_s`."""
    closer = threading.Thread(target=sink.close, name="moelab-hang-drain", daemon=True)
    closer.start()
    closer.join(timeout_s)


def describe(run_dir: Path, since: float = 0.0) -> str | None:
    """For moelab-launch: the hang written into `run_dir` at or after `since` (time.time()),
    in one sentence, or None if there was none."""
    records, hang_dir = [], RunDir(run_dir).hang
    for path in hang_dir.glob("rank*.json"):
        with suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    records = [r for r in records if r.get("time", 0) >= since]
    if not records:
        return None
    first = min(records, key=lambda r: (r["rank"] != 0, r["step"]))
    return (
        f"the run hung at step {first['step'] + 1} (no rank finished a step for "
        f"{first['timeout_s']:g} s); stacks in {hang_dir}/"
    )


@contextmanager
def watch(
    cfg: MoelabConfig, rank: int, world_size: int, sink: Sink, step: int
) -> Iterator[Watchdog]:
    """The training loop's watchdog, started at `step` (the last finished one) and stopped after."""
    t = cfg.train
    dog = Watchdog(
        Path(cfg.run_dir),
        rank,
        world_size,
        t.hang_timeout_s,
        sink,
        step=step,
        inject=(t.inject_hang_step, t.inject_hang_rank),
    )
    dog.start()
    try:
        yield dog
    finally:
        dog.stop()


def _wait_for(ready: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.2)


def _write(path: Path, text: str) -> None:
    """Atomically: another host may read it at any time."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
