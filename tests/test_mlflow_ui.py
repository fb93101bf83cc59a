"""A real `mlflow server` (PostgreSQL backend from Debian's postgresql, artifacts served by the
server), real moelab runs logged to it over HTTP, and the MLflow UI in Debian's headless
Chromium (Playwright, never `playwright install`) showing them. The Debian packages come from
.ci/run; where one is missing the tests skip, and fail under CI=true.

Everything started here runs in its own process group and is stopped, also on failure.
"""

from __future__ import annotations

import contextlib
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

import pytest
from mlflow.tracking import MlflowClient

from helpers import free_port, run_launcher, unavailable, wait_healthy

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")
VARIANTS = ["tiny_dense", "tiny_moe_top1"]


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group of `proc`, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


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
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120)

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


@dataclass
class Server:
    url: str
    backend: str
    runs: dict[str, str]  # variant -> run id
    experiment_id: str
    run_names: dict[str, str]


@pytest.fixture(scope="module")
def backend_uri() -> Iterator[str]:
    """A PostgreSQL store, the backend of docker/compose.yaml's server (never sqlite)."""
    bindir = pg_bindir()
    if bindir is None:
        unavailable("PostgreSQL is not installed (Debian's postgresql; .ci/run installs it)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        unavailable("psycopg2 is not installed (pip install -e '.[dev]')")
    pg = Postgres(bindir)
    try:
        uri = pg.start()
        print(f"\nMLflow backend: PostgreSQL ({bindir.parent.name}) at {uri}")
        yield uri
    finally:
        pg.stop()


@pytest.fixture(scope="module")
def server(
    backend_uri: str, tmp_path_factory: pytest.TempPathFactory, shared_cache: Path
) -> Iterator[Server]:
    port = free_port()
    work = tmp_path_factory.mktemp("mlflow-server")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            backend_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            str(work / "mlartifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, work / "server.log")
        runs, names = {}, {}
        for variant in VARIANTS:
            workdir = work / variant
            workdir.mkdir()
            t0 = time.monotonic()
            out = run_launcher(
                workdir,
                shared_cache,
                f"model={variant}",
                "train=smoke",
                "train.steps=4",
                "train.log_every=2",
                f"tracking.uri={url}",
                "tracking.experiment=moelab-ui",
            )
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            print(f"launch {variant}: {time.monotonic() - t0:.0f} s")
            assert not (workdir / "mlflow.db").exists(), "logged locally, not to the server"
        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("moelab-ui")
        for run in client.search_runs([exp.experiment_id]):
            runs[run.data.tags["variant"]] = run.info.run_id
            names[run.data.tags["variant"]] = run.info.run_name
        yield Server(url, backend_uri, runs, exp.experiment_id, names)
    finally:
        stop_group(proc)
        log.close()


@pytest.mark.slow
def test_runs_logged_over_http_with_served_artifacts(server: Server) -> None:
    client = MlflowClient(tracking_uri=server.url)
    assert set(server.runs) == set(VARIANTS)
    for variant, run_id in server.runs.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED", variant
        assert run.data.tags["variant"] == variant
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4]
        # --serve-artifacts: the run's artifacts live behind the server, not on a local path
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        arts = {a.path for a in client.list_artifacts(run_id, "config")}
        assert "config/resolved.yaml" in arts
    import psycopg2

    assert server.backend.startswith("postgresql+psycopg2://"), server.backend
    with (
        psycopg2.connect(server.backend.replace("+psycopg2", "")) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'")
        assert cur.fetchone()[0] == len(VARIANTS)


@pytest.mark.slow
def test_mlflow_ui_shows_the_runs(server: Server, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is missing (Debian's chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "mlflow_runs.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(
                f"{server.url}/#/experiments/{server.experiment_id}/runs",
                wait_until="domcontentloaded",
                timeout=60_000,
            )
            for variant in VARIANTS:
                page.get_by_text(server.run_names[variant], exact=True).first.wait_for(
                    timeout=60_000
                )
            page.wait_for_timeout(1000)  # let the table settle for the screenshot
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    artifacts = REPO / "tests" / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / shot.name)
    print(f"\nscreenshot: {shot} (copied to {artifacts / shot.name})")
