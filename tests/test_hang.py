"""Hang diagnosis: stack dumps, the stalled collective and the silent ranks, exit code 4."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from helpers import run_launcher
from moelab import hang
from moelab.hang import HANG_EXIT, TAG, Watchdog, diagnosis, stalled_in

C10D = "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py"
TRAIN = "/repo/src/moelab/train.py"


def fake(filename: str, name: str) -> Callable[[Callable[[Any], Any], Any], Any]:
    """A function `name(probe, arg)` whose frame says it lives in `filename` (torch's c10d,
    moelab's train.py): it calls `probe(arg)` with the frame of `name` innermost but one."""
    source = f"def {name}(probe, arg):\n    return probe(arg)\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]  # type: ignore[no-any-return]


def outer_frame(_: object) -> FrameType:
    """The caller's frame (the fake function's), as the watchdog would find it innermost."""
    return sys._getframe(1)


class Recorder:
    """A sink that keeps what rank 0 logs."""

    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[Path, str | None]] = []
        self.closed = False

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags |= tags

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def close(self) -> None:
        self.closed = True


def test_stalled_in_names_the_collective_or_the_innermost_frame() -> None:
    frame = fake(C10D, "all_reduce")(outer_frame, None)
    assert stalled_in(frame) == ("all_reduce (torch/distributed/distributed_c10d.py)", True)
    # Deeper frames under the collective (a lock, a wrapper) still name it.
    inner = fake("/usr/lib/python3.11/threading.py", "wait")
    frame = fake(C10D, "broadcast")(lambda _: inner(outer_frame, None), None)
    assert stalled_in(frame) == ("broadcast (torch/distributed/distributed_c10d.py)", True)
    # NCCL: a GPU rank waits for its peers where the loop reads the step's flags back.
    where, waiting = stalled_in(fake(TRAIN, "train_step")(outer_frame, None))
    assert where.startswith("train_step (moelab/train.py:") and waiting
    where, waiting = stalled_in(sys._getframe())
    assert where.startswith("test_stalled_in_names_the_collective_or_the_innermost_frame (")
    assert "test_hang.py:" in where and not waiting


def test_diagnosis_names_the_silent_ranks() -> None:
    assert diagnosis(7, "all_reduce (x.py)", [1]) == (
        "step 7: stalled in all_reduce (x.py); rank 1 never reported step 7"
    )
    assert diagnosis(7, "w", [1, 3]).endswith("; ranks 1, 3 never reported step 7")
    assert diagnosis(7, "w", []) == "step 7: stalled in w; every rank is waiting in a collective"


@dataclass
class Rank:
    """A stand-in rank in this process: a 'main' thread and its real Watchdog."""

    dog: Watchdog
    main: threading.Thread
    release: threading.Event
    exits: list[int]


def start_rank(
    tmp_path: Path, rank: int, stall: Callable[[threading.Event], None], sink: Recorder | None
) -> Rank:
    """The main thread finishes steps 1 and 2, then stalls in `stall` until released; the
    watchdog (0.5 s) records its exit instead of leaving the process."""
    release, exits = threading.Event(), []

    def main() -> None:
        for step in (1, 2):
            dog.pet(step)
        stall(release)

    thread = threading.Thread(target=main, daemon=True)
    dog = Watchdog(tmp_path, rank, 2, 0.5, sink, target=thread, exit_fn=exits.append, peer_wait_s=5)
    thread.start()
    dog.start()
    return Rank(dog, thread, release, exits)


def test_a_stalled_step_is_dumped_diagnosed_and_exits(tmp_path: Path) -> None:
    """Rank 0 waits in a (stand-in) all_reduce, rank 1 never gets there: both dump their
    stacks, rank 0 tags the stalled step and rank 1, logs the dumps, and both exit 4."""
    all_reduce = fake(C10D, "all_reduce")

    def load_batch(release: threading.Event) -> None:
        while not release.is_set():
            time.sleep(0.05)

    sink = Recorder()
    started = time.monotonic()
    ranks = [
        start_rank(tmp_path, 0, lambda r: all_reduce(lambda e: e.wait(), r), sink),
        start_rank(tmp_path, 1, load_batch, None),
    ]
    for r in ranks:
        r.dog.thread.join(30)
    elapsed = time.monotonic() - started
    for r in ranks:
        r.release.set()
        r.main.join(5)
        assert r.exits == [HANG_EXIT]
    assert 0.5 <= elapsed < 10, elapsed
    d = tmp_path / "hang"
    assert (d / "heartbeat.rank0").read_text() == (d / "heartbeat.rank1").read_text() == "2\n"
    dump0, dump1 = (d / "rank0.txt").read_text(), (d / "rank1.txt").read_text()
    assert "main thread in all_reduce (torch/distributed/distributed_c10d.py)" in dump0
    assert f'File "{C10D}", line 2 in all_reduce' in dump0  # faulthandler's own lines
    assert "in load_batch" in dump1 and "main thread in load_batch (test_hang.py:" in dump1
    expected = (
        "step 3: stalled in all_reduce (torch/distributed/distributed_c10d.py); "
        "rank 1 never reported step 3"
    )
    assert sink.tags == {TAG: expected, f"{TAG}_step": "3", f"{TAG}_ranks": "1"}
    assert sink.artifacts == [(d / "rank0.txt", "hang"), (d / "rank1.txt", "hang")]
    assert sink.closed and (d / "reported").read_text() == "3\n"
    assert json.loads((d / "rank1.json").read_text())["waiting"] is False
    assert hang.describe(tmp_path) == (
        f"the run hung at step 3 (no rank finished a step for 0.5 s); stacks in {d}/"
    )
    assert hang.describe(tmp_path, since=time.time() + 60) is None  # an earlier attempt's


def test_steps_that_finish_keep_it_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps every 0.1 s under a 0.5 s timeout for 1.5 s: no dump, no exit, and the heartbeat
    file is written at most once a second, by the watchdog's thread."""
    writers: list[str] = []
    write = hang._write

    def counted(path: Path, text: str) -> None:
        writers.append(threading.current_thread().name)
        write(path, text)

    monkeypatch.setattr(hang, "_write", counted)
    exits: list[int] = []
    dog = Watchdog(tmp_path, 1, 2, 0.5, exit_fn=exits.append)
    dog.start()
    for step in range(1, 16):
        time.sleep(0.1)
        dog.pet(step)
    dog.stop()
    assert exits == [] and not list((tmp_path / "hang").glob("rank*"))
    assert 1 <= len(writers) <= 2 and set(writers) == {"moelab-hang"}, writers
    assert int((tmp_path / "hang" / "heartbeat.rank1").read_text()) > 0


def test_off_and_the_injected_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    off = Watchdog(tmp_path, 0, 2, 0)
    off.start()
    assert not off.thread.is_alive() and not (tmp_path / "hang").exists()
    slept: list[int] = []
    monkeypatch.setattr(hang, "sleep_forever", lambda: slept.append(1))
    for rank in (0, 1):
        dog = Watchdog(tmp_path, rank, 2, 0, inject=(3, 1))
        for step in (1, 2, 3, 4):
            dog.inject(step)
        assert slept == [1] * rank, f"rank {rank}"


# A real 2-rank run: rank 1 sleeps forever at step 3, rank 0 waits for it in a collective.

TIMEOUT_S = 10
AFTER_HANG_S = 90
"""How long the run may take from its hang to moelab-launch's exit, beyond the timeout."""


@pytest.mark.slow
def test_injected_hang_is_diagnosed_and_the_run_fails(tmp_path: Path, shared_cache: Path) -> None:
    run = ("model=tiny_dense", "train=smoke", "train.steps=6", "train.log_every=1")
    fault = (f"train.hang_timeout_s={TIMEOUT_S}", "train.inject_hang_step=3")
    proc = run_launcher(tmp_path, shared_cache, *run, "train.eval_every=0", *fault)
    ended = time.time()
    out = proc.stdout + proc.stderr
    (run_dir,) = (tmp_path / "runs" / "moelab").iterdir()
    d = run_dir / "hang"
    assert proc.returncode == HANG_EXIT, out[-3000:]
    sentence = (
        f"moelab-launch: error: the run hung at step 3 (no rank finished a step for "
        f"{TIMEOUT_S} s); stacks in {d}/"
    )
    assert proc.stderr.strip().splitlines()[-1] == sentence, out[-3000:]
    assert "exited first" not in out and "Traceback" not in out
    # Both ranks dumped every thread; rank 1 sleeps in the injection, rank 0 in a collective.
    dump0, dump1 = (d / "rank0.txt").read_text(), (d / "rank1.txt").read_text()
    assert "main thread in all_reduce (torch/distributed/distributed_c10d.py)" in dump0
    assert 'torch/distributed/distributed_c10d.py", line' in dump0 and " in all_reduce" in dump0
    assert 'moelab/hang.py", line' in dump1 and " in sleep_forever" in dump1
    for dump in (dump0, dump1):
        assert 'moelab/train.py", line' in dump and " in loop" in dump
        assert dump.count("Thread 0x") >= 2  # every thread, the watchdog's own too
    # The watchdog fired a timeout after the last finished step, and the launcher soon after.
    fired = json.loads((d / "rank0.json").read_text())["time"]
    last_step = (d / "heartbeat.rank0").stat().st_mtime  # written within 1 s of step 2
    assert (d / "heartbeat.rank0").read_text() == (d / "heartbeat.rank1").read_text() == "2\n"
    assert TIMEOUT_S - 1.5 <= fired - last_step <= TIMEOUT_S + 2, fired - last_step
    assert ended - last_step <= TIMEOUT_S + AFTER_HANG_S, ended - last_step
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("moelab").experiment_id])
    tags = found.data.tags
    assert found.info.status == "FAILED"
    assert tags[TAG] == (
        "step 3: stalled in all_reduce (torch/distributed/distributed_c10d.py); "
        "rank 1 never reported step 3"
    )
    assert tags[f"{TAG}_step"] == "3" and tags[f"{TAG}_ranks"] == "1"
    logged = client.download_artifacts(found.info.run_id, "hang/rank0.txt", str(tmp_path))
    assert Path(logged).read_text() == dump0
    losses = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2]  # what rank 0 logged before the hang
