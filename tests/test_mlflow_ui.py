"""A real `mlflow server` (PostgreSQL backend from Debian's postgresql, artifacts served by the
server), real moelab runs logged to it over HTTP, and the MLflow UI in Debian's headless
Chromium (Playwright, never `playwright install`) showing them. The server and the runs are the
session's shared ones (tests/mlflow_server.py); the Debian packages come from .ci/run; where
one is missing the tests skip, and fail under CI=true.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import unavailable
from mlflow_server import (  # noqa: F401
    DENSE_STEPS,
    EXPERIMENT,
    VARIANTS,
    LoggedRuns,
    MlflowServer,
    logged_runs,
    mlflow_server,
    shared_mlflow_server,
)

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
LOSS_STEPS = {"tiny_dense": list(range(1, DENSE_STEPS + 1)), "tiny_moe_top1": [2, 4]}


@pytest.mark.slow
def test_runs_logged_over_http_with_served_artifacts(
    mlflow_server: MlflowServer,  # noqa: F811
    logged_runs: LoggedRuns,  # noqa: F811
) -> None:
    client = MlflowClient(tracking_uri=mlflow_server.url)
    assert set(logged_runs.runs) == set(VARIANTS) == set(LOSS_STEPS)
    for variant, run_id in logged_runs.runs.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED", variant
        assert run.data.tags["variant"] == variant
        steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
        assert steps == LOSS_STEPS[variant], (variant, steps)
        # --serve-artifacts: the run's artifacts live behind the server, not on a local path
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        arts = {a.path for a in client.list_artifacts(run_id, "config")}
        assert "config/resolved.yaml" in arts
    import psycopg2

    backend = mlflow_server.backend
    assert backend.startswith("postgresql+psycopg2://"), backend
    with psycopg2.connect(backend.replace("+psycopg2", "")) as conn, conn.cursor() as cur:
        # Other tests log other experiments to the same store: count this one's runs only.
        cur.execute(
            "SELECT r.status, count(*) FROM runs r JOIN experiments e"
            " ON r.experiment_id = e.experiment_id WHERE e.name = %s GROUP BY r.status",
            (EXPERIMENT,),
        )
        assert dict(cur.fetchall()) == {"FINISHED": len(VARIANTS)}
        cur.execute(
            "SELECT run_uuid, count(*) FROM metrics WHERE key = 'train/loss' AND run_uuid IN %s"
            " GROUP BY run_uuid",
            (tuple(logged_runs.runs.values()),),
        )
        rows = dict(cur.fetchall())
        assert rows == {logged_runs.runs[v]: len(LOSS_STEPS[v]) for v in VARIANTS}, rows


@pytest.mark.slow
def test_mlflow_ui_shows_the_runs(
    mlflow_server: MlflowServer,  # noqa: F811
    logged_runs: LoggedRuns,  # noqa: F811
    tmp_path: Path,
) -> None:
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is missing (Debian's chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "mlflow_runs.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(
                f"{mlflow_server.url}/#/experiments/{logged_runs.experiment_id}/runs",
                wait_until="domcontentloaded",
                timeout=60_000,
            )
            for variant in VARIANTS:
                page.get_by_text(logged_runs.run_names[variant], exact=True).first.wait_for(
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
