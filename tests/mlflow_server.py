"""One real `mlflow server` per session (PostgreSQL backend from Debian's postgresql, artifacts
served by the server) that tests may stop and start again on the same port and store to
simulate an outage, and the runs logged to it over HTTP: a tiny_dense run that lives through a
server restart, then a short tiny_moe_top1 run. test_mlflow_ui and test_sink read both
(import the fixtures from here).

Everything started here runs in its own process group and is stopped at session end, also on
failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from helpers import free_port, launcher_env, unavailable, wait_healthy
from moelab.rundir import RunDir

BIN = Path(sys.executable).parent
EXPERIMENT = "moelab-ui"
DENSE_STEPS = 40
DENSE_RUN = (
    "model=tiny_dense",
    "cluster.nproc_per_node=1",
    "train=smoke",
    f"train.steps={DENSE_STEPS}",
    "train.log_every=1",
    "train.eval_every=10",
)
"""Logged through a server restart: down from step 5 on, for 10 steps, back before the end."""
MOE_RUN = ("model=tiny_moe_top1", "train=smoke", "train.steps=4", "train.log_every=2")
VARIANTS = ("tiny_dense", "tiny_moe_top1")
"""The variants of DENSE_RUN and MOE_RUN, in launch order."""


def stop_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGKILL the process group of `proc` (started with start_new_session=True)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def pg_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@dataclass
class Postgres:
    """A throwaway cluster (initdb/pg_ctl) in a temp dir, as `nobody` when we are root."""

    bindir: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="moelab-pg-")))
    port: int = field(default_factory=free_port)

    def run(self, *cmd: str) -> None:
        argv = [str(self.bindir / cmd[0]), *cmd[1:]]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "nobody", "--", *argv]
        subprocess.run(
            argv, check=True, capture_output=True, text=True, timeout=120, start_new_session=True
        )

    def start(self) -> str:
        if os.geteuid() == 0:
            shutil.chown(self.root, "nobody")
        data = self.root / "data"
        self.run("initdb", "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8")
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.root}"
        self.run(
            "pg_ctl", "-D", str(data), "-o", opts, "-l", str(self.root / "pg.log"), "-w", "start"
        )
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", "mlflow")
        return f"postgresql+psycopg2://mlflow@127.0.0.1:{self.port}/mlflow"

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """`mlflow server --serve-artifacts` on 127.0.0.1 over `backend`, in its own process group.
    stop() kills it (an outage); start() brings it back on the same port, store and artifacts."""

    def __init__(self, backend: str, work: Path) -> None:
        self.backend = backend
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.running, "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with (self.work / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--backend-store-uri",
                    self.backend,
                    "--serve-artifacts",
                    "--artifacts-destination",
                    str(self.work / "mlartifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                ],
                cwd=self.work,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        wait_healthy(self.url, self.proc, self.work / "server.log")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_group(proc)

    def ensure_running(self) -> None:
        if not self.running:
            self.stop()  # reap a server that died by itself
            self.start()


_SHARED: dict[str, object] = {}  # one server and one pair of runs per session


@pytest.fixture(scope="session")
def shared_mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The session's server; whichever test module asks first starts it and stops it at the
    end of the session. Tests use `mlflow_server`, which makes sure it is running."""
    if "server" in _SHARED:
        yield _SHARED["server"]  # type: ignore[misc]
        return
    bindir = pg_bindir()
    if bindir is None:
        unavailable("PostgreSQL is not installed (Debian's postgresql; .ci/run installs it)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        unavailable("psycopg2 is not installed (pip install -e '.[dev]')")
    pg = Postgres(bindir)
    server: MlflowServer | None = None
    try:
        backend = pg.start()
        print(f"\nMLflow backend: PostgreSQL ({bindir.parent.name}) at {backend}")
        server = MlflowServer(backend, tmp_path_factory.mktemp("mlflow-server"))
        server.start()
        _SHARED["server"] = server
        yield server
    finally:
        _SHARED.pop("server", None)
        if server is not None:
            server.stop()
        pg.stop()


@pytest.fixture
def mlflow_server(shared_mlflow_server: MlflowServer) -> Iterator[MlflowServer]:
    """The shared server, running; running again after the test, whatever the test did."""
    shared_mlflow_server.ensure_running()
    yield shared_mlflow_server
    shared_mlflow_server.ensure_running()


def spooled_steps(workdir: Path) -> int:
    """The highest step a training run under `workdir` has spooled so far (0: none yet)."""
    best = 0
    for spool in (workdir / "runs").glob("*/*/mlflow_spool.jsonl"):
        for line in spool.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "metrics":
                best = max(best, int(record["step"]))
    return best


def wait_for_step(workdir: Path, proc: subprocess.Popen[str], step: int) -> None:
    deadline = time.monotonic() + 300
    while spooled_steps(workdir) < step:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.2)


def launch(workdir: Path, cache: Path, *args: str) -> subprocess.Popen[str]:
    """`python -m launcher ARGS` in `workdir`, in its own process group."""
    workdir.mkdir()
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", *args],
        cwd=workdir,
        env=launcher_env(workdir, cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def ranks_start(proc: subprocess.Popen[str], timeout_s: float = 120) -> bool:
    """Whether a rank of `proc`'s launch starts within `timeout_s` (20 s on an idle machine)."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        children = psutil.Process(proc.pid).children(recursive=True)
        with contextlib.suppress(psutil.Error):
            if any("moelab.train" in c.cmdline() for c in children):
                return True
        time.sleep(0.2)
    return False


def finish(proc: subprocess.Popen[str], workdir: Path) -> None:
    out, _ = proc.communicate(timeout=600)
    (workdir / "out.txt").write_text(out)
    assert proc.returncode == 0, out[-4000:]
    assert not (workdir / "mlflow.db").exists(), "logged locally, not to the server"


@dataclass(frozen=True)
class LoggedRuns:
    """The runs of EXPERIMENT on the shared server and how the dense run's outage went."""

    experiment_id: str
    runs: dict[str, str]  # variant -> run id
    run_names: dict[str, str]  # variant -> run name
    down_at: int  # the highest step spooled when the server was killed
    up_at: int  # the highest step spooled when it was started again
    alive_at_restart: bool  # the dense run was still training when the server came back
    frozen: FrozenStart  # how the MoE run started while the server was frozen


@dataclass(frozen=True)
class FrozenStart:
    """MOE_RUN was launched with the server stopped (SIGSTOP) until its ranks had started."""

    ranks_started: bool  # a rank process appeared while no MLflow call could be answered
    run_ref_written: bool  # mlflow_run.json held a run id then (it cannot, if created alongside)
    output: str  # the launcher's output


def _log_runs(server: MlflowServer, work: Path, cache: Path) -> LoggedRuns:
    tracking = (f"tracking.uri={server.url}", f"tracking.experiment={EXPERIMENT}")
    dense = work / "tiny_dense"
    t0 = time.monotonic()
    proc = launch(dense, cache, *DENSE_RUN, *tracking)
    try:
        wait_for_step(dense, proc, 5)
        server.stop()
        down_at = spooled_steps(dense)
        wait_for_step(dense, proc, down_at + 10)  # training goes on while the server is down
        up_at = spooled_steps(dense)
        alive = proc.poll() is None
        server.start()
        finish(proc, dense)
    finally:
        stop_group(proc)
        server.ensure_running()
    took = time.monotonic() - t0
    print(f"\nlaunch tiny_dense (server down from step {down_at} to {up_at}): {took:.0f} s")
    moe = work / "tiny_moe_top1"
    t0 = time.monotonic()
    assert server.proc is not None
    group = server.proc.pid
    os.killpg(group, signal.SIGSTOP)  # frozen: the launcher cannot create its run
    try:
        proc = launch(moe, cache, *MOE_RUN, *tracking)
        try:
            ranks_while_frozen = ranks_start(proc)
            refs = [RunDir(d).run_ref for d in (moe / "runs").glob("*/*")]
            ref_while_frozen = any("run_id" in r.read_text() for r in refs if r.exists())
            os.killpg(group, signal.SIGCONT)
            finish(proc, moe)
        finally:
            stop_group(proc)
    finally:
        os.killpg(group, signal.SIGCONT)
    print(f"launch tiny_moe_top1 (server frozen at its start): {time.monotonic() - t0:.0f} s")
    client = MlflowClient(tracking_uri=server.url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, f"no experiment {EXPERIMENT}"
    runs, names = {}, {}
    for run in client.search_runs([exp.experiment_id]):
        runs[run.data.tags["variant"]] = run.info.run_id
        names[run.data.tags["variant"]] = run.info.run_name
    frozen = FrozenStart(ranks_while_frozen, ref_while_frozen, (moe / "out.txt").read_text())
    return LoggedRuns(exp.experiment_id, runs, names, down_at, up_at, alive, frozen)


@pytest.fixture(scope="session")
def logged_runs(
    shared_mlflow_server: MlflowServer,
    tmp_path_factory: pytest.TempPathFactory,
    shared_cache: Path,
) -> LoggedRuns:
    """DENSE_RUN (with the server restart) then MOE_RUN, logged over HTTP, launched once per
    session; a failed attempt fails every later asker with its error instead of relaunching."""
    if "runs" not in _SHARED:
        shared_mlflow_server.ensure_running()
        try:
            _SHARED["runs"] = _log_runs(
                shared_mlflow_server, tmp_path_factory.mktemp("mlflow-runs"), shared_cache
            )
        except BaseException as err:
            _SHARED["runs"] = f"{type(err).__name__}: {err}"
            raise
    found = _SHARED["runs"]
    if isinstance(found, str):
        pytest.fail(f"the shared MLflow runs failed earlier: {found}", pytrace=False)
    assert isinstance(found, LoggedRuns)
    return found
